"""The training engine (adasmooth.train.engine): accumulation, EMA, warm-up, best epoch, resume, history.

The checks compare the engine with facts that do not come from it: accumulating two batches of 8 is
one step on their 16 examples, the average weights are the recurrence written out by hand over the
weights the engine's plain run went through, the warm-up rates are lr * (s + 1) / W.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasmooth.core.distributed import init_distributed
from adasmooth.data import Dataset
from adasmooth.train.engine import (
    EngineOptions,
    TrainContext,
    history_paths,
    make_optimizer,
    optimizer_steps,
    run_training,
)
from adasmooth.train.loop import TrainConfig, train_base

CPU = torch.device("cpu")


def _data(n=20, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.rand(n, 1, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g), 3, "toy", "train")


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _ce(model, batch, ctx):
    x, y, _ = batch
    return F.cross_entropy(model(x), y)


def _train(model, data, step=_ce, *, resume_file=None, evaluate=None, select=None, lr=0.5, schedule="constant",
           warmup_steps=0, **opts):
    opts = EngineOptions(**{"epochs": 2, "batch_size": 8, "progress": False, **opts})
    total = optimizer_steps(len(data), opts.batch_size, opts.epochs, opts.accumulate)
    opt, sched = make_optimizer(model.parameters(), optimizer="sgd", lr=lr, momentum=0.0, schedule=schedule,
                                total_steps=total, warmup_steps=warmup_steps)
    gen = torch.Generator().manual_seed(0)
    return run_training(model, step, data, opt, sched, opts, device=CPU, dist=init_distributed("cpu"),
                        ctx=TrainContext(generator=gen), generator=gen, resume_file=resume_file, fingerprint={},
                        evaluate=evaluate, select=select)


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def _close(a, b, **tol):
    return all(torch.allclose(x, y, **tol) for x, y in zip(a, b))


def test_accumulating_two_batches_is_one_step_on_their_examples():
    data = _data(20)  # groups of 8 + 8 and a last group of 4 alone
    small, big = _model(), _model()
    _train(small, data, batch_size=8, accumulate=2)
    _train(big, data, batch_size=16)
    assert _close(_weights(small), _weights(big), atol=1e-6)
    unequal = _model()
    _train(unequal, data, batch_size=8)  # without accumulation the run differs: the check can fail
    assert not _close(_weights(unequal), _weights(big), atol=1e-6)


def test_weight_average_follows_the_recurrence_over_the_trained_weights():
    data, decay = _data(16), 0.6
    seen = []

    def recording(model, batch, ctx):
        seen.append(_weights(model))  # the weights each step starts from
        return _ce(model, batch, ctx)

    plain = _model()
    _train(plain, data, step=recording)
    visited = seen[1:] + [_weights(plain)]  # the weights after each optimizer step
    expected = seen[0]
    for w in visited:
        expected = [decay * a + (1 - decay) * b for a, b in zip(expected, w)]
    averaged = _model()
    _train(averaged, data, ema_decay=decay)
    assert _close(_weights(averaged), expected, atol=1e-6)
    assert not _close(_weights(averaged), _weights(plain), atol=1e-4)


def test_warm_up_rises_linearly_then_follows_the_schedule():
    def rates(steps, **schedule):
        opt, sched = make_optimizer([nn.Parameter(torch.zeros(1))], momentum=0.0, **schedule)
        seen = []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    assert rates(6, lr=0.8, schedule="constant", total_steps=10, warmup_steps=4) == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert rates(8, lr=1.0, schedule="step", total_steps=8, warmup_steps=2) == pytest.approx(
        [0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_best_epoch_by_the_evaluated_metric_is_the_result():
    data, scores, after = _data(16), iter([0.2, 0.9, 0.4]), []

    def evaluate(model):
        after.append(_weights(model))
        return {"val_acc": next(scores)}

    model = _model()
    result = _train(model, data, epochs=3, evaluate=evaluate, select=("val_acc", "max"))
    assert result.best_epoch == 2
    assert [r["val_acc"] for r in result.history] == [0.2, 0.9, 0.4]
    assert _close(_weights(model), after[1], atol=0) and not _close(_weights(model), after[2], atol=0)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("save_every", [None, 2])
def test_interrupted_run_with_every_option_resumes_bit_for_bit(tmp_path, save_every):
    """Accumulation, clipping, EMA, warm-up and best-epoch state all travel in the resume file."""
    data = _data(40)
    options = dict(epochs=3, accumulate=2, clip_grad_norm=0.5, ema_decay=0.7, warmup_steps=3, schedule="cosine",
                   save_every=save_every)
    scores = {1: 0.5, 2: 0.7, 3: 0.6}

    def evaluate_factory():
        epoch = iter([1, 2, 3])
        return lambda model: {"val_acc": scores[next(epoch)]}

    straight = _model()
    _train(straight, data, evaluate=evaluate_factory(), select=("val_acc", "max"), **options)
    calls = {"n": 0}

    def dies(model, batch, ctx):
        calls["n"] += 1
        if calls["n"] == 9:  # in epoch 2 (5 batches an epoch), after a save_every point
            raise _Stop
        return _ce(model, batch, ctx)

    resume = tmp_path / "run.resume.pt"
    with pytest.raises(_Stop):
        _train(_model(), data, step=dies, resume_file=resume, evaluate=evaluate_factory(),
               select=("val_acc", "max"), **options)
    assert resume.is_file()
    remaining = iter([2, 3])
    resumed = _model(seed=1)  # other initial weights: everything must come from the file
    result = _train(resumed, data, resume_file=resume, evaluate=lambda m: {"val_acc": scores[next(remaining)]},
                    select=("val_acc", "max"), **options)
    assert result.best_epoch == 2
    assert _close(_weights(resumed), _weights(straight), atol=0, rtol=0)


def test_train_base_writes_the_per_epoch_history(tmp_path, digits_train):
    cfg = TrainConfig(dataset="digits", model_kwargs={"width": 4, "hidden": 16}, epochs=2, batch_size=64,
                      n_train=128, eval_examples=20, eval_pgd_steps=1, progress=False, output=str(tmp_path / "m"),
                      val_fraction=0.2, select_best=True)
    meta = train_base(cfg)
    json_path, png_path = history_paths(cfg.output)
    written = json.loads(json_path.read_text())
    assert [r["epoch"] for r in written["results"]["history"]] == [1, 2]
    assert written["results"]["history"] == meta["training"]["history"]
    assert all(0 <= r["val_acc"] <= 100 for r in meta["training"]["history"])
    assert meta["training"]["best_epoch"] in (1, 2)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_best_without_held_out_data_is_refused():
    from adasmooth.core.errors import ConfigError

    with pytest.raises(ConfigError, match="select_best.*val_fraction"):
        TrainConfig(select_best=True).validate()


def test_the_fingerprint_holds_only_the_option_block_of_the_method_in_use():
    from adasmooth.train.config import result_config
    from adasmooth.train.methods.base import method_options

    blocks = set(method_options())
    assert "catrs" in blocks
    assert not blocks & set(result_config(TrainConfig(method="pgd")))
    assert blocks & set(result_config(TrainConfig(method="cat-rs"))) == {"catrs"}
    # neutral engine options are left out, so that adding them kept earlier resume files valid
    assert "accumulate" not in result_config(TrainConfig()) and result_config(TrainConfig(accumulate=2))["accumulate"] == 2


def test_channels_last_trains_the_same_model(tmp_path, digits_train):
    data = digits_train.subset(128)
    common = dict(dataset="digits", model_kwargs={"width": 4, "hidden": 16}, epochs=1, batch_size=32,
                  eval_examples=10, eval_pgd_steps=1, progress=False, seed=2)
    from adasmooth.models.checkpoint import load_checkpoint

    train_base(TrainConfig(**common, output=str(tmp_path / "plain")), train_data=data)
    train_base(TrainConfig(**common, channels_last=True, output=str(tmp_path / "cl")), train_data=data)
    plain, _ = load_checkpoint(str(tmp_path / "plain"))
    last, _ = load_checkpoint(str(tmp_path / "cl"))
    for (name, a), b in zip(plain.state_dict().items(), last.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_optimizer_steps_by_hand():
    # 10 examples in batches of 4: 3 batches (2 full ones with drop_last); in pairs: 2 steps (1 step)
    assert optimizer_steps(10, 4, epochs=3, accumulate=2) == 6
    assert optimizer_steps(10, 4, epochs=3, accumulate=2, drop_last=True) == 3
    assert optimizer_steps(10, 4, epochs=1, drop_last=True) == 2
