"""Base-model training on digits: standard, PGD-AT and TRADES runs, the checkpoint they write, resume."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from adasmooth.attacks import PGD
from adasmooth.models.checkpoint import load_checkpoint
from adasmooth.train.loop import (
    TRAINING_METHODS,
    TrainConfig,
    evaluate_accuracy,
    train_base,
)
from adasmooth.core.errors import CheckpointError
from adasmooth.core.io import load_resume_state
from adasmooth.core.runtime import resolve_device, seed_everything
from adasmooth.train.loop import TrainContext, result_config

FAST = dict(dataset="digits", arch="small-cnn", model_kwargs={"width": 8, "hidden": 32}, optimizer="adam",
            lr=3e-3, weight_decay=0.0, batch_size=64, eps=0.1, eval_examples=None, eval_pgd_steps=10,
            progress=False)


def _cfg(tmp_path, name, **over) -> TrainConfig:
    return TrainConfig(**{**FAST, "output": str(tmp_path / name), **over})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A standard and a PGD-trained model, trained once for the tests below."""
    out = tmp_path_factory.mktemp("runs")
    std_cfg = _cfg(out, "std", method="standard", epochs=8)
    pgd_cfg = _cfg(out, "pgd", method="pgd", epochs=10, attack_steps=3)
    return {"std": (std_cfg, train_base(std_cfg)), "pgd": (pgd_cfg, train_base(pgd_cfg))}


def test_standard_run_learns_and_writes_a_truthful_checkpoint(runs, digits_test):
    cfg, meta = runs["std"]
    losses = [h["train_loss"] for h in meta["training"]["history"]]
    assert len(losses) == cfg.epochs and losses[-1] < 0.3 * losses[0]
    model, info = load_checkpoint(cfg.output)
    assert info["training"]["method"] == "standard" and info["dataset"] == "digits"
    assert info["training"]["config"]["epochs"] == 8 and info["model_kwargs"] == {"width": 8, "hidden": 32}
    metrics = info["metrics"]
    assert metrics["eval_examples"] == len(digits_test) and metrics["eval_eps"] == 0.1
    assert metrics["clean_acc"] > 70.0
    # The sidecar's numbers are what one measures on the saved weights.
    again = evaluate_accuracy(model, digits_test, cfg.eps, cfg.norm, cfg.eval_pgd_steps, seed=cfg.seed)
    assert again["clean_acc"] == pytest.approx(metrics["clean_acc"])
    assert again["pgd10_acc"] == pytest.approx(metrics["pgd10_acc"])
    with torch.no_grad():
        clean = 100.0 * float((model(digits_test.x).argmax(1) == digits_test.y).float().mean())
    assert clean == pytest.approx(metrics["clean_acc"])
    assert not list(Path(cfg.output).parent.glob("*.resume.pt"))  # removed once the run finished


def test_pgd_training_buys_robustness(runs, digits_test):
    models = {name: load_checkpoint(cfg.output)[0] for name, (cfg, _) in runs.items()}
    x, y = digits_test.x, digits_test.y
    acc = {}
    for name, model in models.items():
        x_adv = PGD(model, 0.1, "linf", steps=20, restarts=2, seed=0)(x, y)
        with torch.no_grad():
            acc[name] = float((model(x_adv).argmax(1) == y).float().mean())
    assert acc["pgd"] > acc["std"] + 0.15, acc
    assert runs["pgd"][1]["metrics"]["clean_acc"] > 70.0
    assert runs["pgd"][1]["metrics"]["pgd10_acc"] > runs["std"][1]["metrics"]["pgd10_acc"] + 15.0


def test_trades_runs_and_is_robust(tmp_path, runs):
    cfg = _cfg(tmp_path, "trades", method="trades", epochs=6, attack_steps=3, trades_beta=3.0)
    meta = train_base(cfg)
    assert meta["training"]["method"] == "trades" and meta["training"]["config"]["trades_beta"] == 3.0
    losses = [h["train_loss"] for h in meta["training"]["history"]]
    assert losses[-1] < 0.6 * losses[0]
    assert meta["metrics"]["clean_acc"] > 70.0
    assert meta["metrics"]["pgd10_acc"] > runs["std"][1]["metrics"]["pgd10_acc"] + 15.0


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 0.1)])
def test_trades_adversarial_input_stays_in_the_ball(digits_train, norm, eps):
    """The point TRADES trains on lies within eps of the clean input, for l_2 as well as l_inf."""
    from adasmooth.models.base import create_model

    torch.manual_seed(0)
    inner = create_model("small-cnn", 10, 1, width=4, hidden=16)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.inner(x)

    cfg = TrainConfig(method="trades", norm=norm, eps=eps, attack_steps=10)
    x, y = digits_train.x[:32], digits_train.y[:32]
    loss = TRAINING_METHODS.get("trades")(Recorder().train(), (x, y, torch.arange(32)), cfg, TrainContext())
    assert torch.isfinite(loss)
    x_adv = seen[-1]  # the last forward pass is f(x')
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all(), float(size.max())
    assert (size > 0.5 * eps).float().mean() > 0.5  # and the attack did move
    assert (x_adv >= 0).all() and (x_adv <= 1).all()


def test_gaussian_method_records_sigma(tmp_path, digits_train):
    cfg = _cfg(tmp_path, "gauss", method="gaussian", sigma=0.25, epochs=1, eval_examples=50, eval_pgd_steps=2)
    meta = train_base(cfg, train_data=digits_train.subset(256))
    assert meta["sigma"] == 0.25 and load_checkpoint(cfg.output)[1]["sigma"] == 0.25


# ------------------------------------------------------------------ resume


class _Interrupt:
    """Wraps a training method and raises KeyboardInterrupt at the start of epoch ``at_epoch``."""

    def __init__(self, fn, at_epoch):
        self.fn, self.at_epoch = fn, at_epoch

    def __call__(self, model, batch, cfg, ctx):
        if ctx.epoch == self.at_epoch:
            raise KeyboardInterrupt
        return self.fn(model, batch, cfg, ctx)


@contextlib.contextmanager
def _interrupted(method, at_epoch):
    """Within the block, ``method`` stops at the start of epoch ``at_epoch``; the registry is restored after."""
    original, info = TRAINING_METHODS.get(method), TRAINING_METHODS.info(method)
    TRAINING_METHODS.remove(method)
    TRAINING_METHODS.add(method, _Interrupt(original, at_epoch), **info)
    try:
        yield
    finally:
        TRAINING_METHODS.remove(method)
        TRAINING_METHODS.add(method, original, **info)


def _interrupt_after_first_epoch(cfg, data):
    with _interrupted(cfg.method, at_epoch=1), pytest.raises(KeyboardInterrupt):
        train_base(cfg, train_data=data)


@pytest.mark.parametrize("method", ["standard", "pgd"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, caplog, digits_train, method):
    data = digits_train.subset(384)
    over = dict(method=method, epochs=3, attack_steps=2, eval_examples=40, eval_pgd_steps=2, seed=5)
    straight_cfg = _cfg(tmp_path, "straight", **over)
    train_base(straight_cfg, train_data=data)
    cfg = _cfg(tmp_path, "resumed", **over)  # the same run under another name
    _interrupt_after_first_epoch(cfg, data)
    resume_file = tmp_path / "resumed.resume.pt"
    assert resume_file.is_file() and not (tmp_path / "resumed.safetensors").exists()
    assert load_resume_state(resume_file, result_config(cfg))["epoch"] == 1
    with caplog.at_level("INFO", logger="adasmooth"):
        meta = train_base(cfg, train_data=data)
    assert "resuming" in caplog.text
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2, 3]
    assert not resume_file.exists()
    resumed, _ = load_checkpoint(cfg.output)
    straight, straight_info = load_checkpoint(straight_cfg.output)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert meta["training"]["history"] == straight_info["training"]["history"]


def test_resume_file_of_another_config_is_refused(tmp_path, digits_train):
    """A resume file from another config stops the run (it used to be ignored); --no-resume starts over."""
    data = digits_train.subset(256)
    cfg = _cfg(tmp_path, "m", epochs=2, eval_examples=20, eval_pgd_steps=1)
    _interrupt_after_first_epoch(cfg, data)
    changed = _cfg(tmp_path, "m", epochs=2, lr=1e-3, eval_examples=20, eval_pgd_steps=1)
    with pytest.raises(CheckpointError, match=r"m\.resume\.pt.*different config.*lr.*--no-resume"):
        train_base(changed, train_data=data)
    assert not (tmp_path / "m.safetensors").exists()  # refused before training anything
    changed.resume = False
    meta = train_base(changed, train_data=data)
    assert [h["epoch"] for h in meta["training"]["history"]] == [1, 2]  # trained from scratch
    assert not (tmp_path / "m.resume.pt").exists()


def test_truncated_resume_file_is_a_checkpoint_error(tmp_path, digits_train):
    data = digits_train.subset(128)
    cfg = _cfg(tmp_path, "t", epochs=2, eval_examples=20, eval_pgd_steps=1)
    _interrupt_after_first_epoch(cfg, data)
    resume_file = tmp_path / "t.resume.pt"
    raw = resume_file.read_bytes()
    resume_file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"t\.resume\.pt.*cannot be read.*delete it"):
        train_base(cfg, train_data=data)
    resume_file.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train_base(cfg, train_data=data)


# ------------------------------------------------------------------ helpers


def test_evaluate_accuracy_at_eps_zero_equals_clean(runs, digits_test):
    model = load_checkpoint(runs["std"][0].output)[0]
    res = evaluate_accuracy(model, digits_test.subset(100), eps=0.0, pgd_steps=3)
    assert res["pgd3_acc"] == res["clean_acc"]


def test_seed_and_device_helpers():
    seed_everything(3)
    a = torch.rand(4)
    gen = seed_everything(3)
    assert torch.equal(a, torch.rand(4))
    assert torch.equal(torch.randperm(10, generator=gen), torch.randperm(10, generator=seed_everything(3)))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_train_base_validates_config(tmp_path):
    with pytest.raises(ValueError, match="method"):
        train_base(_cfg(tmp_path, "x", method="madry"))
    with pytest.raises(ValueError, match="eps"):
        train_base(_cfg(tmp_path, "x", eps=-1.0))
