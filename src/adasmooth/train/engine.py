"""The one training loop: epochs of streamed batches, each turned into a loss by a step function.

What is special to a kind of training is a *step function* ``step(model, batch, ctx) -> loss``:
``model`` is the module being trained (wrapped for DDP / compilation as the run asks), ``batch`` is
``(x, y, idx)`` from :meth:`adasmooth.data.Dataset.stream` (inputs on the run's device, labels, and
the examples' indices in the data set, which seed per-example randomness), ``ctx`` the
:class:`TrainContext` (epoch, seed, per-example generators, the method's own ``extras``). It returns
the scalar mean loss of the batch; it does not call ``backward`` or step an optimizer. The base-model
methods (:mod:`.methods`) are step functions of this signature with the run's config bound.

:func:`run_training` does everything else, the same way for every step function:

- the order of each epoch from (seed, epoch), augmentation per (seed, epoch, index), resumable at
  any batch (``Dataset.stream``);
- under ``torchrun`` each rank takes its rows of every global batch, the model trains inside
  DistributedDataParallel, and each rank's mean loss is weighted by its share of the global batch, so
  the averaged gradient is the one-process gradient;
- gradient accumulation over ``accumulate`` batches (the gradient of their joint mean), clipping of
  the gradient norm, an exponential moving average of the weights, the learning-rate schedule
  (:func:`make_optimizer`: SGD/Adam, cosine/step/constant after a linear warm-up);
- precision (bf16/fp16 autocast with an fp16 loss scaler), channels-last weights and inputs,
  ``torch.compile`` (the switches and code of evaluation, :mod:`adasmooth.core.precision`);
- the resume file (``<output>.resume.pt``): model, optimizer, scheduler, scaler, EMA, the generators
  and the running loss sums, written atomically at the end of each epoch (and every ``save_every``
  batches), so a run killed with ``kill -9`` continues to the very weights of an uninterrupted one;
- a progress bar, one line per epoch, per-epoch metrics (training loss and whatever ``evaluate``
  measures) to ``history_path`` as JSON (rewritten each epoch) and a PNG curve at the end;
- best-epoch selection: with ``select=("metric", "max"|"min")`` the weights of the best epoch by
  ``evaluate``'s metric are the result.

A new kind of training (e.g. the mixing network's) plugs in by writing its step function and
building its model, data and optimizer; see ARCHITECTURE.md.
"""

from __future__ import annotations

import logging

import contextlib
import copy
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..attacks.base import ExampleGenerators
from ..core.distributed import Distributed, data_parallel
from ..core.errors import ConfigError, DivergedError
from ..core.progress import progress_bar
from ..core.io import load_resume_state, save_resume_state, write_result
from ..core.precision import autocast, compile_model, grad_scaler, to_channels_last
from ..data import Dataset
from ..data.augment import derived_seed
from ..data.stream import batches_per_epoch
from ..models.checkpoint import checkpoint_paths


logger = logging.getLogger(__name__)

__all__ = [
    "TrainContext",
    "StepFn",
    "EngineOptions",
    "EngineResult",
    "WeightAverage",
    "make_optimizer",
    "optimizer_steps",
    "run_training",
    "resume_path",
    "history_paths",
]


@dataclass
class TrainContext:
    """Per-run state a step function may use; a method keeps its own state in ``extras``."""

    epoch: int = 0
    num_epochs: int = 1
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch: int = 0  # index of the current batch in its epoch (the same on every torchrun rank)

    def stream_seed(self, purpose: str) -> int:
        """A seed for one kind of draw (``purpose``: "noise", "pgd", ...) in this epoch."""
        return derived_seed(self.seed ^ zlib.crc32(purpose.encode()), self.epoch)

    def generators(self, idx: torch.Tensor, device: torch.device | str, purpose: str) -> ExampleGenerators:
        """One generator per example of the batch, seeded from (seed, epoch, purpose, example index)."""
        return ExampleGenerators.seeded(self.stream_seed(purpose), idx, torch.device(device))


StepFn = Callable[[nn.Module, tuple, TrainContext], torch.Tensor]


@dataclass
class EngineOptions:
    """How :func:`run_training` runs (library values; each command maps its own config onto them)."""

    epochs: int
    batch_size: int
    seed: int = 0
    augment: str = "none"
    workers: int = 0
    drop_last: bool = False  # leave out a last smaller batch (batch norm on tiny batches, a fixed batch shape)
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    accumulate: int = 1  # batches per optimizer step
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    save_every: int | None = None  # also write the resume file every N batches inside an epoch
    progress: bool = True
    label: str = "train"  # names the run in the progress bar and the epoch lines
    run_name: str = ""  # names the run in the "resuming ..." line (default: the resume file)


@dataclass
class EngineResult:
    history: list[dict[str, Any]]
    seconds: float
    best_epoch: int | None = None  # 1-based, with ``select``
    resumed_from: tuple[int, int] | None = None  # (epoch, batch) when the run continued a resume file


def resume_path(output: str | Path) -> Path:
    """``<output>.resume.pt``: the state an interrupted run continues from."""
    weights, _ = checkpoint_paths(output)
    return weights.with_name(weights.name.replace(".safetensors", ".resume.pt"))


def history_paths(output: str | Path) -> tuple[Path, Path]:
    """``<output>.history.json`` and ``<output>.history.png``: the per-epoch metrics and their curve."""
    weights, _ = checkpoint_paths(output)
    stem = weights.name.replace(".safetensors", ".history")
    return weights.with_name(stem + ".json"), weights.with_name(stem + ".png")


def optimizer_steps(n: int, batch_size: int, epochs: int, accumulate: int = 1, drop_last: bool = False) -> int:
    """Optimizer steps of a run: ``accumulate`` batches (the last group possibly fewer) make one step;
    ``drop_last`` as in :class:`EngineOptions`."""
    batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    return math.ceil(batches / accumulate) * epochs


def make_optimizer(params, *, optimizer: str = "sgd", lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   schedule: str = "cosine", total_steps: int, warmup_steps: int = 0):
    """SGD (with momentum) or Adam, and a per-step learning-rate schedule over ``total_steps``.

    ``cosine`` decays to 0, ``step`` divides by 10 at 50% and 75% of the steps, ``constant`` keeps
    ``lr``; with ``warmup_steps`` the rate first rises linearly from lr/warmup_steps to lr.
    """
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use sgd or adam")
    milestones = [int(total_steps * 0.5), int(total_steps * 0.75)]

    def base(s: int) -> float:
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        if schedule == "step":
            return 0.1 ** sum(s >= m for m in milestones)
        return 1.0

    if schedule not in ("cosine", "step", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, step or constant")
    if warmup_steps > 0:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) * base(s))
    if schedule == "step":  # kept as MultiStepLR: its chained products are what existing runs were trained with
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, base)


class WeightAverage:
    """An exponential moving average of a model's weights: ``avg = decay * avg + (1 - decay) * w``
    after each optimizer step; buffers (batch-norm statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, w in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(w.detach(), 1.0 - self.decay)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def _group_sizes(n: int, batch_size: int, streamed: int, accumulate: int) -> list[int]:
    """Examples in each accumulation group of an epoch (of the ``streamed`` global batches)."""
    sizes = [min(batch_size, n - j * batch_size) for j in range(streamed)]
    return [sum(sizes[g:g + accumulate]) for g in range(0, streamed, accumulate)]


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def run_training(
    model: nn.Module,
    step: StepFn,
    data: Dataset,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    opts: EngineOptions,
    *,
    device: torch.device,
    dist: Distributed,
    ctx: TrainContext,
    generator: torch.Generator,
    resume_file: str | Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = True,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    select: tuple[str, Literal["max", "min"]] | None = None,
    history_path: tuple[Path, Path] | None = None,
    history_config: Any = None,
    select_warn_drop: float | None = None,
    plot: Callable[[list[dict[str, Any]], Path], None] | None = None,
) -> EngineResult:
    """Train ``model`` in place with ``step`` for ``opts.epochs`` epochs of ``data`` (see the module doc).

    ``generator`` is the run's CPU generator (``ctx.generator``); it and torch's global generators are
    saved in ``resume_file`` (when given) and, with ``resume``, restored from it (``fingerprint`` is the
    part of the config a resume file must match). ``evaluate(model)`` runs after each epoch on every process on the model
    in eval mode (the EMA weights when averaging) and returns metrics for the history; ``select``
    names one of them to keep the best epoch's weights (a warning when an epoch falls more than
    ``select_warn_drop`` below the best). ``plot(history, path)`` draws the curve instead of
    :func:`plot_history`. On return ``model`` holds the result: the
    best epoch's weights with ``select``, else the EMA weights with ``ema_decay``, else the last ones.
    """
    if opts.accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {opts.accumulate}")
    if select is not None and evaluate is None:
        raise ValueError("select needs an evaluate function")
    n = len(data)
    steps_per_epoch = n // opts.batch_size if opts.drop_last else math.ceil(n / opts.batch_size)
    streamed = batches_per_epoch(n, opts.batch_size, opts.drop_last, world_size=dist.world_size)
    if streamed == 0:
        raise ConfigError(f"{n} training examples make no batch of {opts.batch_size}: lower batch_size")
    groups = _group_sizes(n, opts.batch_size, streamed, opts.accumulate)
    scaler = grad_scaler(opts.precision, device)  # fp16 only; a disabled scaler changes nothing
    average = WeightAverage(model, opts.ema_decay) if opts.ema_decay is not None else None
    start_epoch, start_step, partial, history = 0, 0, (0.0, 0), []
    best: dict[str, Any] | None = None
    resumed_from = None
    state = load_resume_state(resume_file, fingerprint or {}, device) if resume and resume_file is not None else None
    if state is not None:
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if average is not None and "ema" in state:
            average.load_state_dict(state["ema"])
        # RNG states must be CPU byte tensors, whatever map_location did to them. Step functions draw
        # from the global generators too: restore them, or a resumed run differs from an uninterrupted one.
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        start_step, partial = int(state.get("step", 0)), tuple(state.get("partial", (0.0, 0)))
        best = state.get("best")
        if not dist.is_main:  # the saved partial sums are the global ones: count them once
            partial = (0.0, 0)
        resumed_from = (start_epoch, start_step)
        if dist.is_main:
            where = f", step {start_step}" if start_step else ""
            logger.info(f"resuming {opts.run_name or resume_file} from epoch {start_epoch}{where}")
    if opts.channels_last:
        to_channels_last(model)
    # compiled inside the DDP wrapper, so that unwrap() (attacks, fixed targets) reaches the compiled model
    trained = data_parallel(compile_model(model) if opts.compile else model, dist, device)

    def save_state(epochs_done: int, step_index: int, sums: tuple[float, int]) -> None:
        sums = tuple(dist.sum(sums))  # a collective: every rank calls save_state
        if resume_file is None or not dist.is_main:
            return
        save_resume_state(resume_file, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "epoch": epochs_done, "step": step_index, "partial": list(sums), "history": history,
            **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
            **({"ema": average.state_dict()} if average is not None else {}),
            **({"best": best} if best is not None else {}),
        }, fingerprint or {})

    weighted = dist.active or opts.accumulate > 1
    t0 = time.time()
    for epoch in range(start_epoch, opts.epochs):
        ctx.epoch = epoch
        trained.train()
        first = start_step if epoch == start_epoch else 0
        total, count = partial if epoch == start_epoch else (0.0, 0)
        batches = data.stream(opts.batch_size, seed=opts.seed, epoch=epoch, start_batch=first, workers=opts.workers,
                              augment=opts.augment, drop_last=opts.drop_last, pin_memory=device.type == "cuda",
                              shard=(dist.rank, dist.world_size))
        bar = progress_bar(batches, desc=f"{opts.label} epoch {epoch + 1}/{opts.epochs}", initial=first,
                   total=steps_per_epoch, disable=not (opts.progress and dist.is_main), leave=False)
        for index, (x, y, idx) in enumerate(bar, start=first):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if opts.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx.batch = index
            group, last_of_group = index // opts.accumulate, (index + 1) % opts.accumulate == 0 or index + 1 == streamed
            with autocast(opts.precision, device.type):
                loss = step(trained, (x, y, idx), ctx)
            if not torch.isfinite(loss):
                raise DivergedError(f"training loss became {loss.item()} at epoch {epoch + 1}, step {index + 1} "
                                    f"(--lr {optimizer.param_groups[0]['initial_lr']}); lower the lr")
            if index % opts.accumulate == 0:
                optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; weighting each rank's mean by its share of the group's
            # examples makes that average (summed over the group) the gradient of the group's mean loss.
            share = len(idx) * dist.world_size / groups[group]
            sync = last_of_group or not dist.active
            with (trained.no_sync() if not sync else contextlib.nullcontext()):
                scaler.scale(loss * share if weighted else loss).backward()
            if last_of_group:
                if opts.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if average is not None:
                    average.update(model)
            total += loss.item() * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}")
            if (opts.save_every and (index + 1) % opts.save_every == 0 and last_of_group
                    and index + 1 < steps_per_epoch):
                save_state(epoch, index + 1, (total, count))
        total, count = dist.sum((total, count))
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / count}
        result_model = average.model if average is not None else model
        if evaluate is not None:
            record.update(evaluate(result_model))
        history.append(record)
        if select is not None:
            key, mode = select
            value = float(record[key])
            if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
                best = {"epoch": epoch + 1, "value": value, "weights": _cpu_copy(result_model.state_dict())}
            elif select_warn_drop is not None and abs(value - best["value"]) > select_warn_drop and dist.is_main:
                logger.warning("epoch %d: %s %.4g is %s epoch %d's %.4g; keeping epoch %d", epoch + 1, key, value,
                               "below" if mode == "max" else "above", best["epoch"], best["value"], best["epoch"])
        save_state(epoch + 1, 0, (0.0, 0))
        if dist.is_main:
            if history_path is not None:
                write_result(history_path[0], {"history": history}, config=history_config)
            if opts.progress:
                extra = "".join(f" {k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "train_loss")
                                and isinstance(v, float))
                logger.info(f"[{opts.label}] epoch {epoch + 1}/{opts.epochs} loss {total / count:.4f}{extra}")
    seconds = time.time() - t0
    if average is not None:
        model.load_state_dict(average.state_dict())
    if best is not None:
        model.load_state_dict(best["weights"])
    if dist.is_main and history_path is not None and history:
        if plot is not None:
            plot(history, history_path[1])
        else:
            plot_history(history, history_path[1], opts.label)
    return EngineResult(history=history, seconds=seconds, best_epoch=best["epoch"] if best else None,
                        resumed_from=resumed_from)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per metric of the history (training loss first) against the epoch."""
    from ..core.plotting import pyplot, save_figure

    keys = [k for k in history[0] if k != "epoch" and all(isinstance(r.get(k), (int, float)) for r in history)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    epochs = [r["epoch"] for r in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [r[key] for r in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
    fig.suptitle(title)
    save_figure(fig, path)
