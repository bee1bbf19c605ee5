"""Training augmentation: per-example uniforms, crop+flip and random resized crop against hand-derived
values, independence of batching, the auto choice per data set, and augmentation before the method's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adasmooth.core.config import from_mapping
from adasmooth.core.errors import ConfigError
from adasmooth.data import load_dataset
from adasmooth.data.augment import (
    augment_batch,
    check_augmentation,
    crop_flip,
    example_uniforms,
    resized_crop_box,
    resized_crop_flip,
    uniforms_needed,
)
from adasmooth.train.loop import TrainConfig, train_base, training_augmentation
from adasmooth.train.methods import TRAINING_METHODS


def test_example_uniforms_depend_on_seed_epoch_and_index_only():
    all_rows = example_uniforms(3, 1, np.arange(10), 5)
    assert all_rows.shape == (10, 5) and all_rows.dtype == np.float64
    assert ((all_rows >= 0) & (all_rows < 1)).all()
    # any order, any grouping: the same row for the same index
    np.testing.assert_array_equal(example_uniforms(3, 1, [7, 2], 5), all_rows[[7, 2]])
    np.testing.assert_array_equal(example_uniforms(3, 1, torch.tensor([4]), 5), all_rows[[4]])
    assert not np.array_equal(example_uniforms(4, 1, np.arange(10), 5), all_rows)
    assert not np.array_equal(example_uniforms(3, 2, np.arange(10), 5), all_rows)
    assert len(np.unique(all_rows)) == all_rows.size
    many = example_uniforms(0, 0, np.arange(20000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.25).mean() - 0.25) < 0.01


def test_crop_flip_by_hand():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]]).reshape(1, 1, 2, 3)
    # padding 1: span 3, so u = 0 -> offset 0 and u = 0.9 -> offset 2; u[2] < 0.5 flips
    top_left = crop_flip(x, np.array([[0.0, 0.0, 0.9]]), padding=1)
    assert top_left.tolist() == [[[[0, 0, 0], [0, 1, 2]]]]
    bottom_right = crop_flip(x, np.array([[0.9, 0.9, 0.9]]), padding=1)
    assert bottom_right.tolist() == [[[[5, 6, 0], [0, 0, 0]]]]
    flipped = crop_flip(x, np.array([[0.9, 0.9, 0.1]]), padding=1)
    assert flipped.tolist() == [[[[0, 6, 5], [0, 0, 0]]]]
    centred_unflipped = crop_flip(x, np.array([[0.5, 0.5, 0.6]]), padding=1)
    assert torch.equal(centred_unflipped, x)
    no_flip = crop_flip(x, np.array([[0.5, 0.5, 0.1]]), padding=1, flip=False)
    assert torch.equal(no_flip, x)


def test_crop_flip_keeps_dtype_and_channels():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    out = crop_flip(x, np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.9]]), padding=2)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_resized_crop_box_by_hand():
    full = [0.999999999, 0.5, 0.3, 0.7] + [0.0] * 36
    assert resized_crop_box(100, 100, full) == (0, 0, 100, 100)
    # a quarter of the area at ratio 1: 50 x 50, offsets int(0.5 * 51) = 25 and int(0.2 * 51) = 10
    quarter = [(0.25 - 0.08) / 0.92, 0.5, 0.5, 0.2] + [0.0] * 36
    assert resized_crop_box(100, 100, quarter) == (25, 10, 50, 50)
    # a 1-pixel-high image fits no try: the centred part of ratio 4/3 (1 x round(4/3) = 1 x 1)
    assert resized_crop_box(1, 100, [0.5] * 40) == (0, 49, 1, 1)
    # the first try that fits is used: try 1 asks for too wide a crop of a 10 x 100 image
    first_fails = [0.999999999, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0] + [0.0] * 32
    top, left, ch, cw = resized_crop_box(10, 100, first_fails)
    assert (top, left) == (0, 0) and ch * cw == pytest.approx(0.08 * 1000, rel=0.3)


def test_resized_crop_flip_of_the_whole_image_is_the_image_or_its_mirror():
    x = torch.rand(2, 3, 6, 6)
    u = np.zeros((2, 41))
    u[:, 0], u[:, 1] = 0.999999999, 0.5  # the whole image at ratio 1
    u[0, -1], u[1, -1] = 0.9, 0.1
    out = resized_crop_flip(x, u)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], x[1].flip(-1))


@pytest.mark.parametrize("name", ["crop", "crop-flip", "resized-crop-flip"])
def test_augmentation_does_not_depend_on_batching(name):
    x = torch.rand(9, 3, 8, 8)
    idx = torch.arange(100, 109)
    whole = augment_batch(x, idx, name, seed=1, epoch=2)
    parts = torch.cat([augment_batch(x[:4], idx[:4], name, 1, 2), augment_batch(x[4:], idx[4:], name, 1, 2)])
    assert torch.equal(whole, parts) and whole.shape == x.shape
    assert not torch.equal(whole, x)
    assert not torch.equal(whole, augment_batch(x, idx, name, seed=1, epoch=3))
    assert float(whole.min()) >= 0.0 and float(whole.max()) <= 1.0


def test_flip_and_offsets_are_spread():
    u = example_uniforms(0, 0, np.arange(4000), uniforms_needed("crop-flip"))
    x = torch.zeros(4000, 1, 1, 2)
    x[..., 0] = 1.0
    out = crop_flip(x, u, padding=0)  # no room to move: only flips change the image
    assert abs(float((out[..., 1] == 1.0).float().mean()) - 0.5) < 0.03


def test_unknown_augmentation_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown augmentation 'mixup'"):
        check_augmentation("mixup")
    with pytest.raises(ConfigError, match="augment"):
        from_mapping(TrainConfig, {"augment": "mixup"})


def test_auto_augmentation_per_data_set():
    assert training_augmentation(TrainConfig(dataset="cifar10")) == "crop-flip"
    assert training_augmentation(TrainConfig(dataset="cifar100")) == "crop-flip"
    assert training_augmentation(TrainConfig(dataset="folder")) == "resized-crop-flip"
    assert training_augmentation(TrainConfig(dataset="imagenet")) == "resized-crop-flip"
    assert training_augmentation(TrainConfig(dataset="fashion-mnist")) == "none"
    assert training_augmentation(TrainConfig(dataset="digits", augment="crop")) == "crop"
    assert training_augmentation(TrainConfig(dataset="cifar10", augment="none")) == "none"


@pytest.fixture
def recording_method():
    seen = []

    @TRAINING_METHODS.register("toy-record", description="cross-entropy; records its inputs")
    def record(model, batch, cfg, ctx):
        x, y, idx = batch
        seen.append((ctx.epoch, x.clone(), idx.clone()))
        return torch.nn.functional.cross_entropy(model(x), y)

    yield seen
    TRAINING_METHODS.remove("toy-record")


def test_the_loop_augments_before_the_method_sees_the_batch(tmp_path, recording_method):
    data = load_dataset("digits", "train").subset(40)
    cfg = TrainConfig(dataset="digits", method="toy-record", augment="crop-flip", epochs=2, batch_size=16,
                      eval_examples=8, eval_pgd_steps=1, progress=False, seed=4, output=str(tmp_path / "m"),
                      model_kwargs={"width": 4})
    train_base(cfg, train_data=data)
    assert [e for e, _, _ in recording_method] == [0, 0, 0, 1, 1, 1]
    for epoch, x, idx in recording_method:
        assert torch.equal(x, augment_batch(data.x[idx], idx, "crop-flip", 4, epoch))
        assert not torch.equal(x, data.x[idx])
    seen = torch.cat([idx for e, _, idx in recording_method if e == 0])
    assert sorted(seen.tolist()) == list(range(40))
