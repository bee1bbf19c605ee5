"""Cached smoothed soft labels for CAT-RS: the authors' recipe of a Gaussian-trained model's smoothed
prediction of every training input, computed once and read back by the ``cat-rs`` training method
(``catrs: {confidence: cached, target: cached, target_path: ...}``).

- :func:`draw_noise`: ``m`` Gaussian draws per input (shared with the CAT-RS loss).
- :func:`smoothed_targets`: Monte Carlo smoothed prediction (vote frequencies or mean softmax).
- :func:`save_smoothed_targets` / :func:`load_smoothed_targets`: the artifact, ``<path>.safetensors``
  (targets, labels) plus ``<path>.json`` (what made them).
- :class:`CatrsTargetsConfig` / :func:`build_targets`: the whole job from a checkpoint and a data
  set, as the ``catrs-targets`` command runs it; :func:`build_targets_for_dataset` is the same with
  keyword arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from ..core.progress import progress_bar

from ..core.config import data_dir_option, dataset_option, option, RunOptions
from ..core.errors import CheckpointError, ConfigError, DataError, InputError
from ..core.io import atomic_write, provenance, write_json
from ..core.runtime import resolve_device
from ..data import load_dataset
from ..models.checkpoint import checkpoint_paths, load_checkpoint
from ..core.checks import check_counts, check_finite

__all__ = [
    "TARGETS_KIND",
    "draw_noise",
    "sampling_dtype",
    "smoothed_targets",
    "SmoothedTargets",
    "target_paths",
    "save_smoothed_targets",
    "load_smoothed_targets",
    "CatrsTargetsConfig",
    "build_targets",
    "build_targets_for_dataset",
]

TARGETS_KIND = "catrs-smoothed-targets"


def sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision draws are too coarse for noise; draw in float32 and cast.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def draw_noise(x: torch.Tensor, m: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` draws of N(0, sigma^2 I) per input: shape (m, *x.shape), on x's device and dtype.

    With a generator the draw happens on the generator's device (so a CPU generator seeds GPU runs).
    """
    if m < 1:
        raise InputError(f"need m >= 1 noise draws, got {m}")
    if not sigma >= 0:
        raise InputError(f"sigma must be >= 0, got {sigma}")
    device = generator.device if generator is not None else x.device
    z = torch.randn((m, *x.shape), generator=generator, device=device, dtype=sampling_dtype(x.dtype))
    return (sigma * z).to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def smoothed_targets(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    num_samples: int,
    batch_size: int = 1000,
    mode: Literal["votes", "softmax"] = "votes",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Monte Carlo smoothed prediction of every input: (N, C) rows summing to 1.

    ``votes``: the frequency of each class among ``num_samples`` noisy predictions (the authors'
    smoothed prediction); ``softmax``: the mean softmax. Runs the model in eval mode.
    """
    if num_samples < 1 or batch_size < 1:
        raise InputError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if mode not in ("votes", "softmax"):
        raise InputError(f"mode must be 'votes' or 'softmax', got {mode!r}")
    was_training = model.training
    model.eval()
    per_pass = min(num_samples, batch_size)
    block = max(1, batch_size // per_pass)
    rows = []
    try:
        for start in progress_bar(range(0, x.shape[0], block), desc="smoothed targets", disable=not progress,
                                  leave=False):
            xb = x[start : start + block]
            total = None
            remaining = num_samples
            while remaining > 0:
                s = min(per_pass, remaining)
                noise = draw_noise(xb, s, sigma, generator)
                logits = model((xb.unsqueeze(0) + noise).reshape(s * xb.shape[0], *xb.shape[1:])).view(s, xb.shape[0], -1)
                if mode == "votes":
                    part = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float64).sum(0)
                else:
                    part = F.softmax(logits.to(torch.float64), -1).sum(0)
                total = part if total is None else total + part
                remaining -= s
            rows.append((total / num_samples).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows)


@dataclass
class SmoothedTargets:
    """Cached smoothed soft labels of a training set, indexed like that set."""

    probs: torch.Tensor  # (N, C) float32
    labels: torch.Tensor  # (N,) int64, for alignment checks
    info: dict = field(default_factory=dict)

    def lookup(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as (n, C) on y's device; checks that they belong to examples labelled ``y``."""
        idx = torch.as_tensor(idx).cpu().long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.probs.shape[0]):
            raise DataError(f"training index {int(idx.max())} is outside the cached targets "
                            f"({self.probs.shape[0]} examples): they were built for another training set")
        if not torch.equal(self.labels[idx], y.detach().cpu().long()):
            raise DataError("cached targets do not match the training labels at these indices: "
                            "they were built for another training set or order")
        return self.probs[idx].to(y.device)


def target_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, sidecar) for a target artifact path given with or without an extension (named like checkpoints)."""
    return checkpoint_paths(path)


def save_smoothed_targets(path: str | Path, probs: torch.Tensor, labels: torch.Tensor, info: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` (targets, labels) and ``path.json`` (what made them). Returns the first."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise InputError(f"need probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    tensors, sidecar = target_paths(path)
    meta = {"kind": TARGETS_KIND, "num_examples": int(probs.shape[0]), "num_classes": int(probs.shape[1]),
            **info, "provenance": provenance()}
    payload = {"targets": probs.detach().float().cpu().contiguous(), "labels": labels.detach().long().cpu().contiguous()}
    # The sidecar first: the tensors file is what readers look for, so it appears last.
    write_json(sidecar, meta)
    atomic_write(tensors, lambda tmp: save_file(payload, str(tmp)))
    return tensors


def load_smoothed_targets(path: str | Path) -> SmoothedTargets:
    """Read an artifact written by ``save_smoothed_targets``; a missing or malformed file is a DataError."""
    tensors, sidecar = target_paths(path)
    if not tensors.is_file():
        raise DataError(f"cached CAT-RS targets {tensors} not found; build them with "
                        f"`adasmooth catrs-targets --model <gaussian model> --output {tensors.with_suffix('')}`")
    try:
        data = load_file(str(tensors))
    except Exception as err:  # safetensors raises its own types for truncated or foreign files
        raise DataError(f"{tensors} cannot be read as CAT-RS targets ({err})") from None
    if "targets" not in data or "labels" not in data:
        raise DataError(f"{tensors} is not a CAT-RS target file (needs 'targets' and 'labels')")
    probs, labels = data["targets"].float(), data["labels"].long()
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise DataError(f"{tensors}: targets must be (N, C) and labels (N,)")
    if probs.numel() and (probs.min() < 0 or (probs.sum(1) - 1).abs().max() > 1e-3):
        raise DataError(f"{tensors}: target rows must be probability vectors")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return SmoothedTargets(probs, labels, info)


# --------------------------------------------------------------------------- the whole job


@dataclass
class CatrsTargetsConfig(RunOptions):
    model: str = option("", help="base model checkpoint whose smoothed predictions become the targets "
                                      "(a gaussian-trained one)")
    output: str = option("", help="artifact path: writes OUTPUT.safetensors and OUTPUT.json", short="-o")
    dataset: str | None = dataset_option()
    data_dir: str | None = data_dir_option()
    sigma: float | None = option(None, help="noise level; none: the checkpoint's sigma")
    samples: int = option(10000, help="noise draws per training example (the authors use 10^4)")
    mode: Literal["votes", "softmax"] = option("votes", help="votes: class frequencies of the noisy predictions; "
                                                             "softmax: their mean softmax")
    n_train: int | None = option(None, help="first N training examples (as train-base's n_train)")
    val_fraction: float = option(0.0, help="held-out part of the training set (as train-base's val_fraction)")
    batch_size: int = option(1000, help="noisy inputs per forward pass")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model is required (a base model, e.g. gaussian-trained)")
        if not self.output:
            raise ConfigError("output is required (the artifact path)")
        check_finite("sigma", self.sigma, 0, strict=True)
        check_counts(self, "samples", "batch_size", "n_train")
        check_finite("val_fraction", self.val_fraction, 0, below=1)


def build_targets(cfg: CatrsTargetsConfig, train_data=None) -> Path:
    """Load the checkpoint and the training set (as train-base would), cache its smoothed targets.

    Returns the ``.safetensors`` path; ``train_data`` replaces loading the data set (tests).
    """
    cfg.validate()
    dev = resolve_device(cfg.device)
    model, info = load_checkpoint(cfg.model, dev)
    sigma = cfg.sigma
    if sigma is None:
        if "sigma" not in info:
            raise CheckpointError(f"{cfg.model} records no sigma; give sigma")
        sigma = float(info["sigma"])
    if not sigma > 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    dataset = cfg.dataset or info.get("dataset")
    if not dataset:
        raise ConfigError(f"{cfg.model} records no data set; give dataset")
    if train_data is None:
        train_data = load_dataset(dataset, "train", cfg.data_dir, cfg.val_fraction, cfg.seed)
    train_data = train_data.subset(cfg.n_train)
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    probs = smoothed_targets(model, train_data.x.to(dev), sigma, cfg.samples, cfg.batch_size, cfg.mode, gen,
                             cfg.progress)
    meta = {"checkpoint": str(cfg.model), "checkpoint_training": info.get("training", {}).get("method"),
            "sigma": sigma, "num_samples": cfg.samples, "mode": cfg.mode, "dataset": dataset, "split": "train",
            "n_train": cfg.n_train, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    return save_smoothed_targets(cfg.output, probs, train_data.y, meta)


def build_targets_for_dataset(checkpoint: str | Path, dataset: str | None, output: str | Path, *,
                              train_data=None, **options: Any) -> Path:
    """:func:`build_targets` with keyword arguments: ``options`` are :class:`CatrsTargetsConfig` fields."""
    cfg = CatrsTargetsConfig(model=str(checkpoint), dataset=dataset, output=str(output), **options)
    return build_targets(cfg, train_data=train_data)
