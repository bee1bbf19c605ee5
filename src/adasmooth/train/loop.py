"""The base-model training loop and its config.

:func:`train_base` trains one model with any method of ``TRAINING_METHODS`` (see
:mod:`adasmooth.train.methods`), checkpoints every epoch to ``<output>.resume.pt`` and resumes from
it, bit for bit (also from inside an epoch with ``save_every``), then measures clean and PGD accuracy on held-out data and writes the checkpoint.
:class:`TrainConfig` holds the options every method shares; a method's own options are a nested
block (``catrs:``) declared beside the method.

Training data stream through :meth:`adasmooth.data.Dataset.stream`: the order of each epoch comes
from (seed, epoch), the augmentation of each example from (seed, epoch, index), and both are applied
before the method's loss, i.e. before its noise (gaussian, cat-rs) and attacks (pgd, trades).

Under ``torchrun --nproc-per-node N`` every rank takes its rows of each global batch (the stream's
``shard``), the model trains wrapped in DistributedDataParallel with synchronised batch norm
(:func:`adasmooth.core.distributed.data_parallel`), and each rank's mean loss is weighted by its share
of the global batch, so the averaged gradient is the one-process gradient of the whole batch. Methods
seed their draws per example, so N processes follow the loss curve of one. Rank 0 alone writes the
resume file, measures the model and writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..attacks import PGD
from ..core.config import data_dir_option, option, RunOptions
from ..core.progress import progress_bar
from ..core.distributed import Distributed, data_parallel, init_distributed, restore_batchnorm
from ..core.errors import ConfigError
from ..core.io import load_resume_state, save_resume_state
from ..core.precision import Precision, autocast, grad_scaler, precision_option
from ..core.runtime import resolve_device, seed_everything
from ..data import DATASET_STATS, DATASETS, Dataset, ImageOptions, dataset_info, load_dataset
from ..data.stream import batches_per_epoch
from ..models import create_model
from ..models.checkpoint import checkpoint_paths, save_checkpoint
from ..core.checks import check_counts, check_eps, check_finite
from .methods import TRAINING_METHODS, CatrsOptions, TrainContext

_log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainContext",
    "TRAINING_METHODS",
    "train_base",
    "evaluate_accuracy",
    "clean_accuracy",
    "resume_path",
    "result_config",
    "training_augmentation",
]


@dataclass
class TrainConfig(RunOptions):
    dataset: str = option("digits", help="digits, mnist, fashion-mnist, cifar10, cifar100, folder, imagenet")
    data_dir: str | None = data_dir_option()
    image: ImageOptions = option(help="image-folder options (folder, imagenet)", default_factory=ImageOptions)
    augment: Literal["auto", "none", "crop", "crop-flip", "resized-crop-flip"] = option(
        "auto", help="training augmentation, seeded per example, applied before noise and attacks; auto: "
                     "crop-flip for cifar10/cifar100, resized-crop-flip for folder/imagenet, none otherwise")
    workers: int = option(0, help="data-loading worker processes (0: load in the main process)")
    arch: str = option("small-cnn", help="model name (small-cnn, mlp, resnet18, preact-resnet18, wrn-34-10, ...)")
    model_kwargs: dict = option(help="extra keyword arguments of the model constructor", default_factory=dict,
                                cli=False)
    method: str = option("standard", help="training method: standard, pgd, trades, gaussian, cat-rs")
    # the threat model of adversarial training (pgd, trades) and of the final measurement
    norm: Literal["linf", "l2"] = option("linf", help="threat model")
    eps: float = option(0.1, help="attack radius in [0, 1] pixel units")
    attack_steps: int = option(10, help="PGD steps of the training attack (pgd, trades)")
    attack_step_size: float | None = option(None, help="PGD step of the training attack; none: 2.5*eps/steps")
    trades_beta: float = option(6.0, help="weight of the KL term of TRADES")
    sigma: float = option(0.25, help="Gaussian noise level of gaussian and cat-rs training (pixel units)")
    catrs: CatrsOptions = option(help="CAT-RS options (method cat-rs)", default_factory=CatrsOptions)
    # optimisation
    optimizer: Literal["sgd", "adam"] = option("sgd", help="optimizer")
    lr: float = option(0.05, help="learning rate")
    momentum: float = option(0.9, help="SGD momentum")
    weight_decay: float = option(5e-4, help="weight decay")
    schedule: Literal["cosine", "step", "constant"] = option("cosine", help="learning-rate schedule over all steps")
    epochs: int = option(10, help="training epochs")
    batch_size: int = option(128, help="training batch size")
    precision: Precision = precision_option()
    n_train: int | None = option(None, help="use only the first N training examples")
    val_fraction: float = option(0.0, help="hold out this part of the training set (not trained on)")
    # held-out measurement written into the checkpoint
    eval_examples: int | None = option(1000, help="test examples measured at the end; none: all")
    eval_pgd_steps: int = option(20, help="PGD steps of the final measurement")
    output: str = option("runs/model", help="checkpoint path (writes OUTPUT.safetensors and OUTPUT.json)", short="-o")
    resume: bool = option(True, help="continue from OUTPUT.resume.pt when it exists")
    save_every: int | None = option(None, help="also write the resume file every N steps inside an epoch "
                                               "(default: at the end of each epoch only)")

    def validate(self) -> None:
        TRAINING_METHODS.get(self.method)  # an unknown name lists the known ones
        check_eps(self.eps, self.norm)
        check_finite("sigma", self.sigma, 0, strict=True)
        check_counts(self, "epochs", "batch_size", "attack_steps", "eval_pgd_steps", "n_train", "eval_examples",
                     "save_every")
        check_counts(self, "workers", low=0)
        self.image.validate()
        check_finite("attack_step_size", self.attack_step_size, 0, strict=True)
        check_finite("lr", self.lr, 0, strict=True)
        check_finite("momentum", self.momentum, 0)
        check_finite("weight_decay", self.weight_decay, 0)
        check_finite("trades_beta", self.trades_beta, 0)
        check_finite("val_fraction", self.val_fraction, 0, below=1)
        self.catrs.validate()
        check = TRAINING_METHODS.info(self.method).get("check")
        if check is not None:
            check(self)


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


# ---------------------------------------------------------------------------- resume (shared with the mixnet trainer)

# Fields that change how a run is watched or measured, not the weights it produces.
_NOT_RESULT_FIELDS = ("progress", "resume", "device", "eval_examples", "eval_pgd_steps", "workers", "save_every")


def resume_path(output: str | Path) -> Path:
    """``<output>.resume.pt``: the per-epoch state an interrupted run continues from."""
    weights, _ = checkpoint_paths(output)
    return weights.with_name(weights.name.replace(".safetensors", ".resume.pt"))


def result_config(cfg: Any) -> dict:
    """The config fields that determine a run's weights: a resume file must have been made with these."""
    d = asdict(cfg)
    for k in _NOT_RESULT_FIELDS:
        d.pop(k, None)
    return d


def training_augmentation(cfg: TrainConfig) -> str:
    """The augmentation a run uses: ``cfg.augment``, with ``auto`` resolved by the data set's registry entry."""
    if cfg.augment != "auto":
        return cfg.augment
    return dataset_info(cfg.dataset).get("augment", "none") if cfg.dataset in DATASETS else "none"


# ---------------------------------------------------------------------------- the loop


def train_base(cfg: TrainConfig, train_data: Dataset | None = None, eval_data: Dataset | None = None) -> dict[str, Any]:
    """Train a base model per ``cfg``; write the checkpoint; return the sidecar metadata.

    A resume file made with another config is a CheckpointError (delete it or set ``resume=False``).
    """
    cfg.validate()
    dist = init_distributed(cfg.device)
    if dist.active and not TRAINING_METHODS.info(cfg.method).get("distributed", True):
        raise ConfigError(f"training method {cfg.method!r} does not run under torchrun yet; use one process")
    device = resolve_device(dist.device(cfg.device))
    gen = seed_everything(cfg.seed)
    if train_data is None:
        train_data = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.val_fraction, cfg.seed, image=cfg.image)
    train_data = train_data.subset(cfg.n_train)
    if eval_data is None:
        eval_data = load_dataset(cfg.dataset, "test", cfg.data_dir, image=cfg.image)
    eval_data = eval_data.subset(cfg.eval_examples)
    augment = training_augmentation(cfg)
    mean, std = DATASET_STATS.get(cfg.dataset, ((0.0,), (1.0,)))
    model = create_model(cfg.arch, train_data.num_classes, in_channels=train_data.input_shape[0],
                         mean=mean, std=std, input_shape=train_data.input_shape, dataset=cfg.dataset,
                         **cfg.model_kwargs).to(device)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    opt, sched = _make_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    ctx = TrainContext(num_epochs=cfg.epochs, generator=gen, seed=cfg.seed)
    start_epoch, start_step, partial, history = 0, 0, (0.0, 0), []
    resume_file, fingerprint = resume_path(cfg.output), result_config(cfg)
    state = load_resume_state(resume_file, fingerprint, device) if cfg.resume else None
    scaler = grad_scaler(cfg.precision, device)  # fp16 only; a disabled scaler changes nothing
    if state is not None:
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        # RNG states must be CPU byte tensors, whatever map_location did to them.
        gen.set_state(state["generator"].cpu())
        # Methods draw attack starts and noise from the global generators: restore them too, or a
        # resumed run differs from an uninterrupted one.
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        start_step, partial = int(state.get("step", 0)), tuple(state.get("partial", (0.0, 0)))
        if not dist.is_main:  # the saved partial sums are the global ones: count them once
            partial = (0.0, 0)
        where = f", step {start_step}" if start_step else ""
        if dist.is_main:
            _log.info("resuming %s from epoch %d%s", cfg.output, start_epoch, where)
    trained = data_parallel(model, dist, device)

    def save_state(epochs_done: int, step: int, partial: tuple[float, int]) -> None:
        partial = tuple(dist.sum(partial))  # a collective: every rank calls save_state
        if not dist.is_main:
            return
        save_resume_state(resume_file, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "epoch": epochs_done, "step": step, "partial": list(partial), "history": history,
            **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
        }, fingerprint)

    fn = TRAINING_METHODS.get(cfg.method)
    _warn_dropped_batch(len(train_data), cfg.batch_size, dist)
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        ctx.epoch = epoch
        trained.train()
        first = start_step if epoch == start_epoch else 0
        total, count = partial if epoch == start_epoch else (0.0, 0)
        batches = train_data.stream(cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=first,
                                    workers=cfg.workers, augment=augment, pin_memory=device.type == "cuda",
                                    shard=(dist.rank, dist.world_size))
        bar = progress_bar(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", initial=first,
                           total=steps_per_epoch, disable=not (cfg.progress and dist.is_main), leave=False)
        for step, (x, y, idx) in enumerate(bar, start=first):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(cfg.precision, device.type):
                loss = fn(trained, (x, y, idx), cfg, ctx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower the lr")
            opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; weighting each rank's mean by its share of the
            # global batch makes that average the gradient of the global batch's mean loss.
            share = len(idx) * dist.world_size / min(cfg.batch_size, len(train_data) - step * cfg.batch_size)
            scaler.scale(loss * share if dist.active else loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps_per_epoch:
                save_state(epoch, step + 1, (total, count))
        total, count = dist.sum((total, count))
        history.append({"epoch": epoch + 1, "train_loss": total / count})
        save_state(epoch + 1, 0, (0.0, 0))
        if cfg.progress and dist.is_main:
            _log.info("[%s] epoch %d/%d loss %.4f", cfg.method, epoch + 1, cfg.epochs, total / count)
    train_seconds = time.time() - t0
    restore_batchnorm(model)
    if not dist.is_main:  # rank 0 measures and writes the checkpoint; the others take its record
        dist.barrier()
        return dist.broadcast(None)
    metrics = evaluate_accuracy(model, eval_data, cfg.eps, cfg.norm, cfg.eval_pgd_steps, device=device, seed=cfg.seed)
    meta = {
        "dataset": cfg.dataset,
        "training": {"method": cfg.method, "config": asdict(cfg), "augment": augment, "history": history,
                     "seconds": train_seconds},
        "metrics": {**metrics, "eval_split": "test", "eval_examples": len(eval_data),
                    "eval_eps": cfg.eps, "eval_norm": cfg.norm},
    }
    if TRAINING_METHODS.info(cfg.method).get("smoothing"):
        meta["sigma"] = cfg.sigma
    if dist.active:
        meta["training"]["processes"] = dist.world_size
    save_checkpoint(model, cfg.output, meta)
    resume_file.unlink(missing_ok=True)
    dist.barrier()
    return dist.broadcast(meta)


def _warn_dropped_batch(n: int, batch_size: int, dist: Distributed) -> None:
    if dist.is_main and batches_per_epoch(n, batch_size, world_size=dist.world_size) < math.ceil(n / batch_size):
        last = n - (math.ceil(n / batch_size) - 1) * batch_size
        _log.warning("the last batch of each epoch (%d example(s)) is smaller than the %d processes and is left out",
                     last, dist.world_size)
