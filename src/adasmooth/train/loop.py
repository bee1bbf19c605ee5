"""Base-model training: :func:`train_base` runs a method of ``TRAINING_METHODS`` (see
:mod:`adasmooth.train.methods`) as a step function of the training engine
(:func:`adasmooth.train.engine.run_training`: streaming, DDP under torchrun, accumulation, clipping,
EMA, schedules, resume bit for bit from ``<output>.resume.pt``, per-epoch history, best epoch), then
measures clean and PGD accuracy on held-out data and writes the checkpoint.

:class:`~adasmooth.train.config.TrainConfig` holds the options every method shares and a block per
method with options of its own (``catrs:``). Training data stream through
:meth:`adasmooth.data.Dataset.stream`: the order of each epoch comes from (seed, epoch), the
augmentation of each example from (seed, epoch, index), and both are applied before the method's
loss, i.e. before its noise (gaussian, cat-rs) and attacks (pgd, trades). Methods seed their draws per
example, so N torchrun processes follow the loss curve of one. Rank 0 alone writes the resume file,
measures the model and writes the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..attacks import PGD
from ..core.distributed import Distributed, init_distributed, restore_batchnorm
from ..core.errors import ConfigError
from ..core.runtime import resolve_device, seed_everything
from ..data import DATASET_STATS, Dataset, load_dataset
from ..data.stream import batches_per_epoch
from ..models import create_model
from ..models.checkpoint import save_checkpoint
from .config import TrainConfig, result_config, training_augmentation
from .engine import EngineOptions, history_paths, make_optimizer, optimizer_steps, resume_path, run_training
from .methods import TRAINING_METHODS, TrainContext

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


def engine_options(cfg: TrainConfig) -> EngineOptions:
    """The engine's options of a base-model run."""
    return EngineOptions(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                         augment=training_augmentation(cfg), workers=cfg.workers, precision=cfg.precision,
                         channels_last=cfg.channels_last, compile=cfg.compile, accumulate=cfg.accumulate,
                         clip_grad_norm=cfg.clip_grad_norm, ema_decay=cfg.ema_decay, save_every=cfg.save_every,
                         progress=cfg.progress, label=cfg.method, run_name=cfg.output)


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
    val_data = load_dataset(cfg.dataset, "val", cfg.data_dir, cfg.val_fraction, cfg.seed, image=cfg.image) \
        if cfg.select_best else None
    opts = engine_options(cfg)
    mean, std = DATASET_STATS.get(cfg.dataset, ((0.0,), (1.0,)))
    model = create_model(cfg.arch, train_data.num_classes, in_channels=train_data.input_shape[0],
                         mean=mean, std=std, input_shape=train_data.input_shape, dataset=cfg.dataset,
                         **cfg.model_kwargs).to(device)
    total = optimizer_steps(len(train_data), cfg.batch_size, cfg.epochs, cfg.accumulate)
    opt, sched = make_optimizer(model.parameters(), optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, schedule=cfg.schedule, total_steps=total,
                                warmup_steps=round(cfg.warmup_epochs * total / cfg.epochs))
    ctx = TrainContext(num_epochs=cfg.epochs, generator=gen, seed=cfg.seed)
    step = functools.partial(_method_step, TRAINING_METHODS.get(cfg.method), cfg)
    _warn_dropped_batch(len(train_data), cfg.batch_size, dist)
    evaluate = (lambda m: {"val_acc": clean_accuracy(m, val_data, device=device)}) if val_data is not None else None
    result = run_training(model, step, train_data, opt, sched, opts, device=device, dist=dist, ctx=ctx, generator=gen,
                          resume_file=resume_path(cfg.output), fingerprint=result_config(cfg), resume=cfg.resume,
                          evaluate=evaluate,
                          select=("val_acc", "max") if val_data is not None else None,
                          history_path=history_paths(cfg.output), history_config=cfg)
    restore_batchnorm(model)
    if not dist.is_main:  # rank 0 measures and writes the checkpoint; the others take its record
        dist.barrier()
        return dist.broadcast(None)
    metrics = evaluate_accuracy(model, eval_data, cfg.eps, cfg.norm, cfg.eval_pgd_steps, device=device, seed=cfg.seed)
    meta = {
        "dataset": cfg.dataset,
        "training": {"method": cfg.method, "config": asdict(cfg), "augment": opts.augment, "history": result.history,
                     "seconds": result.seconds},
        "metrics": {**metrics, "eval_split": "test", "eval_examples": len(eval_data),
                    "eval_eps": cfg.eps, "eval_norm": cfg.norm},
    }
    if result.best_epoch is not None:
        meta["training"]["best_epoch"] = result.best_epoch
    if TRAINING_METHODS.info(cfg.method).get("smoothing"):
        meta["sigma"] = cfg.sigma
    if dist.active:
        meta["training"]["processes"] = dist.world_size
    save_checkpoint(model, cfg.output, meta)
    resume_path(cfg.output).unlink(missing_ok=True)
    dist.barrier()
    return dist.broadcast(meta)


def _method_step(method, cfg: TrainConfig, model: nn.Module, batch: tuple, ctx: TrainContext) -> torch.Tensor:
    return method(model, batch, cfg, ctx)


def _warn_dropped_batch(n: int, batch_size: int, dist: Distributed) -> None:
    if dist.is_main and batches_per_epoch(n, batch_size, world_size=dist.world_size) < math.ceil(n / batch_size):
        last = n - (math.ceil(n / batch_size) - 1) * batch_size
        logging.getLogger(__name__).warning(f"the last batch of each epoch ({last} example(s)) is smaller than the {dist.world_size} "
              f"processes and is left out")
