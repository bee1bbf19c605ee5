"""Base-model training: standard, PGD adversarial training (Madry et al.), TRADES (Zhang et al.).

Methods are entries of ``TRAINING_METHODS``: a function ``(model, batch, cfg, ctx) -> scalar loss``
where ``batch = (x, y, idx)`` (``idx`` indexes the training set, for methods that cache per-example
targets). Training checkpoints every epoch and resumes from ``<output>.resume.pt``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks import PGD
from ..attacks.base import per_sample, project
from ..core.runtime import resolve_device, seed_everything
from ..models.checkpoint import checkpoint_paths, save_checkpoint
from ..data import DATASET_STATS, Dataset, load_dataset
from ..models import create_model

__all__ = [
    "TrainConfig",
    "TRAINING_METHODS",
    "register_method",
    "train_base",
    "evaluate_accuracy",
    "clean_accuracy",
]


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "small-cnn"
    model_kwargs: dict = field(default_factory=dict)
    method: str = "standard"
    # adversarial training (pgd, trades) and the evaluation attack
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 0.1
    attack_steps: int = 10
    attack_step_size: float | None = None
    trades_beta: float = 6.0
    # randomized-smoothing methods (gaussian, cat-rs)
    sigma: float = 0.25
    # CAT-RS (see adasmooth.catrs): noise draws per input, KL weight (None: 2*sigma, the authors'
    # 0.5/1/2 for sigma 0.25/0.5/1), worst-case-noise l_2 radius and PGD steps, epoch from which the
    # radius doubles (None: never), where w(x) and the KL target come from, the cached-target artifact
    catrs_m: int = 4
    catrs_lambda: float | None = None
    catrs_eps: float = 1.0
    catrs_steps: int = 4
    catrs_warmup_epochs: int | None = None
    catrs_confidence: Literal["accuracy", "cached"] = "accuracy"
    catrs_target: Literal["mean", "cached"] = "mean"
    catrs_target_path: str | None = None
    # optimisation
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    epochs: int = 10
    batch_size: int = 128
    n_train: int | None = None
    val_fraction: float = 0.0
    # held-out measurement written into the checkpoint
    eval_examples: int | None = 1000
    eval_pgd_steps: int = 20
    seed: int = 0
    device: str = "auto"
    output: str = "runs/model"
    resume: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.method not in TRAINING_METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(TRAINING_METHODS)}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        for name in ("epochs", "batch_size", "attack_steps", "eval_pgd_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.trades_beta < 0:
            raise ValueError("trades_beta must be >= 0")
        self._validate_catrs()

    def _validate_catrs(self) -> None:
        if self.catrs_m < 1:
            raise ValueError(f"catrs_m (noise draws per input) must be >= 1, got {self.catrs_m}")
        if self.catrs_lambda is not None and self.catrs_lambda < 0:
            raise ValueError(f"catrs_lambda must be >= 0, got {self.catrs_lambda}")
        if self.catrs_eps < 0:
            raise ValueError(f"catrs_eps must be >= 0, got {self.catrs_eps}")
        if self.catrs_steps < 1:
            raise ValueError(f"catrs_steps must be >= 1, got {self.catrs_steps}")
        if self.catrs_warmup_epochs is not None and self.catrs_warmup_epochs < 0:
            raise ValueError(f"catrs_warmup_epochs must be >= 0 or None, got {self.catrs_warmup_epochs}")
        if self.catrs_confidence not in ("accuracy", "cached"):
            raise ValueError(f"catrs_confidence must be 'accuracy' or 'cached', got {self.catrs_confidence!r}")
        if self.catrs_target not in ("mean", "cached"):
            raise ValueError(f"catrs_target must be 'mean' or 'cached', got {self.catrs_target!r}")
        if self.method == "cat-rs" and "cached" in (self.catrs_confidence, self.catrs_target):
            if not self.catrs_target_path:
                raise ValueError("catrs_target_path is required when catrs_confidence or catrs_target is 'cached'")
            from .catrs import target_paths

            if not target_paths(self.catrs_target_path)[0].is_file():
                raise FileNotFoundError(f"cached CAT-RS targets {target_paths(self.catrs_target_path)[0]} not found; "
                                        "build them with `python -m adasmooth.catrs`")


@dataclass
class TrainContext:
    """Per-run state a training method may use (e.g. cached targets); methods may add attributes."""

    epoch: int = 0
    num_epochs: int = 1
    generator: torch.Generator | None = None
    extras: dict = field(default_factory=dict)


LossFn = Callable[[nn.Module, tuple, TrainConfig, TrainContext], torch.Tensor]
TRAINING_METHODS: dict[str, LossFn] = {}


def register_method(name: str):
    def wrap(fn: LossFn) -> LossFn:
        TRAINING_METHODS[name] = fn
        return fn

    return wrap


def _attack_step_size(cfg: TrainConfig) -> float:
    return cfg.attack_step_size if cfg.attack_step_size is not None else 2.5 * cfg.eps / cfg.attack_steps


def _craft(model: nn.Module, x, y, cfg: TrainConfig, loss="ce") -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return PGD(model, cfg.eps, cfg.norm, cfg.attack_steps, _attack_step_size(cfg), loss=loss)(x, y)
    finally:
        model.train(was_training)


@register_method("standard")
def _standard_loss(model, batch, cfg, ctx):
    x, y, _ = batch
    return F.cross_entropy(model(x), y)


@register_method("pgd")
def _pgd_loss(model, batch, cfg, ctx):
    x, y, _ = batch
    return F.cross_entropy(model(_craft(model, x, y, cfg)), y)


@register_method("trades")
def _trades_loss(model, batch, cfg, ctx):
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising that KL (Zhang et al. 2019)."""
    x, y, _ = batch
    with torch.no_grad():
        was_training = model.training
        model.eval()
        p_clean = F.softmax(model(x), 1)
        model.train(was_training)

    def kl_to_clean(m, x_adv, _y):
        return F.kl_div(F.log_softmax(m(x_adv), 1), p_clean, reduction="none").sum(1)

    was_training = model.training
    model.eval()
    try:
        # TRADES starts from a small Gaussian perturbation rather than a uniform one.
        x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        x_adv = PGD(model, cfg.eps, cfg.norm, cfg.attack_steps, _attack_step_size(cfg),
                    random_start=False, loss=kl_to_clean)(x0, y)
        # PGD kept x' within eps of the noisy start x0; the threat model is the ball around x.
        x_adv = (x + project(x_adv - x, per_sample(cfg.eps, x), cfg.norm)).clamp(0, 1)
    finally:
        model.train(was_training)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + cfg.trades_beta * robust


@register_method("gaussian")
def _gaussian_loss(model, batch, cfg, ctx):
    """Cohen et al. 2019: cross-entropy on x + N(0, sigma^2), noise in [0, 1] pixel space."""
    x, y, _ = batch
    return F.cross_entropy(model(x + cfg.sigma * torch.randn_like(x)), y)


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: Dataset, batch_size: int = 256, device=None) -> float:
    """Clean accuracy (%) of a model, put in eval mode; ``device`` defaults to the model's."""
    model.eval()
    device = device or next(model.parameters()).device
    correct = 0
    for x, y in data.batches(batch_size):
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return 100.0 * correct / len(data)


def evaluate_accuracy(
    model: nn.Module,
    data: Dataset,
    eps: float,
    norm: str = "linf",
    pgd_steps: int = 20,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Clean and PGD-``pgd_steps`` accuracy (%) of a model in eval mode."""
    model.eval()
    clean = clean_accuracy(model, data, batch_size, device)
    attack = PGD(model, eps, norm, pgd_steps, 2.5 * eps / pgd_steps, seed=seed)
    correct = 0
    for x, y in data.batches(batch_size):
        x, y = x.to(device), y.to(device)
        x_adv = attack(x, y)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum().item()
    return {"clean_acc": clean, f"pgd{pgd_steps}_acc": 100.0 * correct / len(data)}


def _make_optimizer(model: nn.Module, cfg: TrainConfig, steps_total: int):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps_total) / steps_total)))
    elif cfg.schedule == "step":
        milestones = [int(steps_total * 0.5), int(steps_total * 0.75)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def _resume_path(output: str | Path) -> Path:
    weights, _ = checkpoint_paths(output)
    return weights.with_name(weights.name.replace(".safetensors", ".resume.pt"))


def train_base(cfg: TrainConfig, train_data: Dataset | None = None, eval_data: Dataset | None = None) -> dict[str, Any]:
    """Train a base model per ``cfg``; write the checkpoint; return the sidecar metadata."""
    cfg.validate()
    device = resolve_device(cfg.device)
    gen = seed_everything(cfg.seed)
    if train_data is None:
        train_data = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.val_fraction, cfg.seed)
    train_data = train_data.subset(cfg.n_train)
    if eval_data is None:
        eval_data = load_dataset(cfg.dataset, "test", cfg.data_dir)
    eval_data = eval_data.subset(cfg.eval_examples)
    mean, std = DATASET_STATS.get(cfg.dataset, ((0.0,), (1.0,)))
    model = create_model(cfg.arch, train_data.num_classes, in_channels=train_data.x.shape[1],
                         mean=mean, std=std, **cfg.model_kwargs).to(device)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    opt, sched = _make_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    ctx = TrainContext(num_epochs=cfg.epochs, generator=gen)
    start_epoch, history = 0, []
    resume_file = _resume_path(cfg.output)
    if cfg.resume and resume_file.is_file():
        state = torch.load(resume_file, map_location=device, weights_only=True)
        if state.get("config") == _comparable(cfg):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            # RNG states must be CPU byte tensors, whatever map_location did to them.
            gen.set_state(state["generator"].cpu())
            # Methods draw attack starts and noise from the global generators: restore them too, or a
            # resumed run differs from an uninterrupted one.
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"].cpu())
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
            start_epoch, history = int(state["epoch"]), list(state["history"])
            print(f"resuming {cfg.output} from epoch {start_epoch}")
        else:
            print(f"ignoring {resume_file}: it was made with a different config")
    fn = TRAINING_METHODS[cfg.method]
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        ctx.epoch = epoch
        model.train()
        perm = torch.randperm(len(train_data), generator=gen)
        total, count = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = train_data.x[idx].to(device), train_data.y[idx].to(device)
            loss = fn(model, (x, y, idx), cfg, ctx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}")
        history.append({"epoch": epoch + 1, "train_loss": total / count})
        resume_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = resume_file.with_name(resume_file.name + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    "epoch": epoch + 1, "history": history,
                    "config": _comparable(cfg)}, tmp)
        tmp.replace(resume_file)
        if cfg.progress:
            print(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} loss {total / count:.4f}")
    train_seconds = time.time() - t0
    metrics = evaluate_accuracy(model, eval_data, cfg.eps, cfg.norm, cfg.eval_pgd_steps, device=device, seed=cfg.seed)
    meta = {
        "dataset": cfg.dataset,
        "training": {"method": cfg.method, "config": asdict(cfg), "history": history, "seconds": train_seconds},
        "metrics": {**metrics, "eval_split": "test", "eval_examples": len(eval_data),
                    "eval_eps": cfg.eps, "eval_norm": cfg.norm},
    }
    if cfg.method in ("gaussian", "cat-rs"):
        meta["sigma"] = cfg.sigma
    save_checkpoint(model, cfg.output, meta)
    resume_file.unlink(missing_ok=True)
    return meta


def _comparable(cfg: TrainConfig) -> dict:
    """The config minus fields that do not change the result (for resume matching)."""
    d = asdict(cfg)
    for k in ("progress", "resume", "device", "eval_examples", "eval_pgd_steps"):
        d.pop(k)
    return d


from . import catrs  # noqa: E402,F401  (registers the cat-rs method)
