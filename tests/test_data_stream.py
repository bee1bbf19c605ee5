"""Streaming batches: per-epoch order, mid-epoch resume of the stream and of training, the same batches
with any number of worker processes, in-memory and image-folder data alike."""

from __future__ import annotations

import pytest
import torch

from adasmooth.core.errors import ConfigError
from adasmooth.core.io import load_resume_state
from adasmooth.data import ImageOptions, load_dataset
from adasmooth.data.stream import EpochBatchSampler, epoch_permutation
from adasmooth.models.checkpoint import load_checkpoint
from adasmooth.train.loop import TrainConfig, result_config, train_base
from adasmooth.train.methods import TRAINING_METHODS

from test_data_folder import write_class_folders


def _batches(stream):
    return [(x.clone(), y.clone(), idx.clone()) for x, y, idx in stream]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b))


def test_epoch_permutation_depends_on_seed_and_epoch():
    p = epoch_permutation(50, seed=3, epoch=2)
    assert sorted(p.tolist()) == list(range(50))
    assert torch.equal(p, epoch_permutation(50, 3, 2))
    assert not torch.equal(p, epoch_permutation(50, 3, 1)) and not torch.equal(p, epoch_permutation(50, 4, 2))


def test_sampler_batches_and_bounds():
    sampler = EpochBatchSampler(10, 4, seed=0, epoch=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert list(EpochBatchSampler(10, 4, 0, 0, start_batch=2)) == batches[2:] and len(sampler) == 3
    assert [len(b) for b in EpochBatchSampler(10, 4, 0, 0, drop_last=True)] == [4, 4]
    assert list(EpochBatchSampler(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ConfigError, match=r"start_batch must lie in \[0, 3\]"):
        EpochBatchSampler(10, 4, start_batch=4)


def test_in_memory_stream_covers_the_epoch_and_resumes_mid_epoch(digits_train):
    data = digits_train.subset(50)
    full = _batches(data.stream(8, seed=1, epoch=3, augment="crop-flip"))
    assert [len(i) for _, _, i in full] == [8] * 6 + [2]
    assert sorted(torch.cat([i for _, _, i in full]).tolist()) == list(range(50))
    for x, y, idx in full:
        assert torch.equal(y, data.y[idx])
    assert _same(full, _batches(data.stream(8, seed=1, epoch=3, augment="crop-flip")))
    assert _same(full[4:], _batches(data.stream(8, seed=1, epoch=3, augment="crop-flip", start_batch=4)))
    assert not _same(full, _batches(data.stream(8, seed=1, epoch=4, augment="crop-flip")))
    plain = _batches(data.stream(8, seed=1, epoch=3))
    assert all(torch.equal(x, data.x[i]) for x, _, i in plain)


@pytest.fixture
def image_folder(tmp_path):
    write_class_folders(tmp_path / "train", per_class=(4, 3, 3), size=(12, 10))
    return load_dataset("folder", "train", tmp_path, image=ImageOptions(crop=8, resize=9))


@pytest.mark.parametrize("augment", ["none", "resized-crop-flip", "crop-flip"])
def test_folder_stream_is_the_same_with_workers_and_resumes(image_folder, augment):
    serial = _batches(image_folder.stream(4, seed=2, epoch=1, augment=augment))
    assert [x.shape for x, _, _ in serial] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert sorted(torch.cat([i for _, _, i in serial]).tolist()) == list(range(10))
    assert _same(serial, _batches(image_folder.stream(4, seed=2, epoch=1, augment=augment, workers=2)))
    assert _same(serial[1:], _batches(image_folder.stream(4, seed=2, epoch=1, augment=augment, start_batch=1,
                                                          workers=1)))
    if augment == "none":
        for x, _, idx in serial:
            assert torch.equal(x, image_folder.x[idx])
    else:
        x, _, idx = serial[0]
        assert not torch.equal(x, image_folder.x[idx])
        # per example: another batch size gives each example the same augmented image
        regrouped = _batches(image_folder.stream(3, seed=2, epoch=1, augment=augment))
        by_index = {int(i): img for x, _, ids in regrouped for img, i in zip(x, ids)}
        assert all(torch.equal(img, by_index[int(i)]) for x, _, ids in serial for img, i in zip(x, ids))


# ---------------------------------------------------------------------------- training resumes mid-epoch


@pytest.fixture
def interruptible():
    """Registers "interruptible-<method>": the method, raising KeyboardInterrupt at call ``state["stop"]``
    (1-based, counted from the last reset of ``state["calls"]``)."""
    state, added = {"stop": None, "calls": 0}, []

    def add(method: str) -> str:
        original = TRAINING_METHODS.get(method)

        def interrupting(*args):
            state["calls"] += 1
            if state["calls"] == state["stop"]:
                raise KeyboardInterrupt
            return original(*args)

        name = f"interruptible-{method}"
        TRAINING_METHODS.add(name, interrupting, **TRAINING_METHODS.info(method))
        added.append(name)
        return name

    yield add, state
    for name in added:  # added last, removed: the built-in methods keep their order
        TRAINING_METHODS.remove(name)


@pytest.mark.parametrize("method", ["gaussian", "pgd"])
def test_training_resumed_mid_epoch_gives_the_same_weights(tmp_path, caplog, digits_train, interruptible, method):
    data = digits_train.subset(160)  # 5 steps per epoch
    add, state = interruptible
    over = dict(dataset="digits", method=add(method), epochs=2, batch_size=32, attack_steps=2, eval_examples=20,
                eval_pgd_steps=1, seed=7, augment="crop-flip", save_every=2, progress=False,
                model_kwargs={"width": 4})
    straight = TrainConfig(output=str(tmp_path / "straight"), **over)
    train_base(straight, train_data=data)
    cfg = TrainConfig(output=str(tmp_path / "resumed"), **over)
    # call 9 is step 4 of epoch 2 (index 3): the last resume file was written after step 2 of that epoch
    state.update(stop=9, calls=0)
    with pytest.raises(KeyboardInterrupt):
        train_base(cfg, train_data=data)
    state.update(stop=None)
    state = load_resume_state(tmp_path / "resumed.resume.pt", result_config(cfg))
    assert (state["epoch"], state["step"]) == (1, 2)
    with caplog.at_level("INFO", logger="adasmooth"):
        meta = train_base(cfg, train_data=data)
    assert "from epoch 1, step 2" in caplog.text
    resumed, _ = load_checkpoint(cfg.output)
    reference, reference_info = load_checkpoint(straight.output)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming mid-epoch"
    assert meta["training"]["history"] == reference_info["training"]["history"]
    assert meta["training"]["augment"] == "crop-flip"
