"""CAT-RS: confidence-aware training of smoothed classifiers (Jeong, Kim & Shin, AAAI 2023).

For each training input ``x`` with label ``y`` the method draws ``m`` Gaussian noise vectors and:

1. estimates a confidence ``w(x)``: the fraction of the ``m`` noisy copies the current model
   classifies correctly, or a cached smoothed probability of ``y``;
2. draws ``K ~ Binomial(m, w(x))`` (at least 1) and averages, over ``m``, only the ``K`` smallest
   per-copy cross-entropies, so inputs that are not robust under noise are not forced to fit
   their hardest noise (``low_confidence_loss``);
3. for inputs with ``K = m`` only, searches worst-case noise near each draw (``kl_noise_pgd``) and
   adds ``lambda * max_i KL(target || softmax(f(x + noise_i*)))``.

Noise lives in [0, 1] pixel space (models normalise inside). The pure pieces (``bottom_k_mask``,
``sample_k``, ``restore_moments``, ``kl_noise_pgd``, ``catrs_loss`` with explicit noise and K) are
usable and testable without the training loop; ``@register_method("cat-rs")`` wires them to
``TrainConfig``'s ``catrs_*`` options.

Cached smoothed targets (the authors' recipe: a Gaussian-trained model's smoothed prediction of
every training input) are built with ``smoothed_targets`` / ``save_smoothed_targets`` or
``python -m adasmooth.catrs --checkpoint runs/gauss --dataset mnist --output runs/gauss-targets``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.io import provenance
from .loop import TrainConfig, TrainContext, register_method

__all__ = [
    "CONFIDENCE_MODES",
    "TARGET_MODES",
    "CatrsTerms",
    "SmoothedTargets",
    "default_lambda",
    "effective_eps",
    "draw_noise",
    "noise_accuracy",
    "sample_k",
    "bottom_k_mask",
    "low_confidence_loss",
    "kl_to_target",
    "noise_moments",
    "restore_moments",
    "project_l2_ball",
    "pull_within_eps",
    "kl_noise_pgd",
    "catrs_loss",
    "smoothed_targets",
    "save_smoothed_targets",
    "load_smoothed_targets",
    "target_paths",
]

CONFIDENCE_MODES = ("accuracy", "cached")
TARGET_MODES = ("mean", "cached")
TARGETS_KIND = "catrs-smoothed-targets"
_TINY = 1e-12


def default_lambda(sigma: float) -> float:
    """The authors' lambda: 0.5 / 1 / 2 for sigma 0.25 / 0.5 / 1.0, i.e. 2 * sigma."""
    return 2.0 * float(sigma)


def effective_eps(eps: float, epoch: int, warmup_epochs: int | None) -> float:
    """The PGD radius at a 0-based ``epoch``: doubled from epoch ``warmup_epochs`` on (never if None).

    The authors' ``--warmup W`` switches the radius to ``2 * eps`` once ``epoch >= W``; its default
    (10000) means "never", which ``None`` stands for here.
    """
    if warmup_epochs is not None and epoch >= warmup_epochs:
        return 2.0 * eps
    return eps


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def draw_noise(x: torch.Tensor, m: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` draws of N(0, sigma^2 I) per input: shape (m, *x.shape), on x's device and dtype.

    With a generator the draw happens on the generator's device (so a CPU generator seeds GPU runs).
    """
    if m < 1:
        raise ValueError(f"need m >= 1 noise draws, got {m}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    device = generator.device if generator is not None else x.device
    z = torch.randn((m, *x.shape), generator=generator, device=device, dtype=_draw_dtype(x.dtype))
    return (sigma * z).to(device=x.device, dtype=x.dtype)


def noise_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of the noisy copies classified as ``y``: logits (m, N, C), y (N,) -> (N,)."""
    if logits.dim() != 3 or logits.shape[1] != y.shape[0]:
        raise ValueError(f"logits must be (m, N, C) with N = len(y); got {tuple(logits.shape)} and {tuple(y.shape)}")
    return (logits.argmax(-1) == y.unsqueeze(0)).to(logits.dtype).mean(0)


def sample_k(confidence: torch.Tensor, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K ~ Binomial(m, confidence) per input, raised to at least 1. confidence (N,) in [0, 1] -> int64 (N,)."""
    if m < 1:
        raise ValueError(f"need m >= 1, got {m}")
    if confidence.dim() != 1:
        raise ValueError(f"confidence must be (N,), got shape {tuple(confidence.shape)}")
    if confidence.numel() and (confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidence must lie in [0, 1]")
    device = generator.device if generator is not None else confidence.device
    u = torch.rand((confidence.shape[0], m), generator=generator, device=device,
                   dtype=_draw_dtype(confidence.dtype)).to(confidence.device)
    # A sum of m Bernoulli(w) draws is Binomial(m, w), and it can use a seeded generator.
    hits = (u < confidence.to(u.dtype).unsqueeze(1)).sum(1)
    return hits.clamp_min(1).long()


def bottom_k_mask(losses: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (N, m) mask marking the ``k[i]`` smallest entries of each row of ``losses`` (N, m).

    Ties are broken by position, so exactly ``k[i]`` entries are kept in row ``i``.
    """
    if losses.dim() != 2:
        raise ValueError(f"losses must be (N, m), got shape {tuple(losses.shape)}")
    k = torch.as_tensor(k, device=losses.device)
    if k.shape != losses.shape[:1]:
        raise ValueError(f"k must be (N,) = ({losses.shape[0]},), got shape {tuple(k.shape)}")
    m = losses.shape[1]
    if k.numel() and (k.min() < 0 or k.max() > m):
        raise ValueError(f"k must lie in [0, {m}]")
    ranks = losses.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < k.unsqueeze(1)


def low_confidence_loss(losses: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean over the m copies of the k smallest per-copy losses, the others counting as zero: (N,)."""
    mask = bottom_k_mask(losses, k)
    return (losses * mask.to(losses.dtype)).sum(1) / losses.shape[1]


def kl_to_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) over the last axis; target broadcasts against logits' leading axes."""
    log_p = F.log_softmax(logits, dim=-1)
    return F.kl_div(log_p, target.to(log_p.dtype).expand_as(log_p), reduction="none").sum(-1)


def noise_moments(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector mean and root-mean-square of ``noise`` (B, ...): two (B,) tensors."""
    flat = noise.reshape(noise.shape[0], -1)
    return flat.mean(1), flat.pow(2).mean(1).sqrt()


def restore_moments(noise: torch.Tensor, mean0: torch.Tensor, rms0: torch.Tensor) -> torch.Tensor:
    """Shift and scale each vector of ``noise`` (B, ...) to have mean ``mean0`` and RMS ``rms0`` (B,).

    The spread about the mean is set to sqrt(rms0^2 - mean0^2), so both moments hold exactly. (The
    authors divide the centred vector by its RMS instead of its spread, which keeps the RMS only when
    the mean is near zero.)
    """
    flat = noise.reshape(noise.shape[0], -1)
    centred = flat - flat.mean(1, keepdim=True)
    spread = centred.pow(2).mean(1, keepdim=True).sqrt()
    spread0 = (rms0.pow(2) - mean0.pow(2)).clamp_min(0).sqrt().unsqueeze(1)
    scale = torch.where(spread > 0, spread0 / spread.clamp_min(_TINY), torch.zeros_like(spread))
    return (mean0.unsqueeze(1) + centred * scale).view_as(noise)


def project_l2_ball(v: torch.Tensor, center: torch.Tensor, eps: float) -> torch.Tensor:
    """Project each vector of ``v`` (B, ...) onto the l_2 ball of radius eps around ``center``."""
    delta = (v - center).reshape(v.shape[0], -1)
    norms = delta.norm(dim=1, keepdim=True)
    factor = torch.where(norms > eps, eps / norms.clamp_min(_TINY), torch.ones_like(norms))
    return center + (delta * factor).view_as(v)


def pull_within_eps(noise: torch.Tensor, noise0: torch.Tensor, eps: float) -> torch.Tensor:
    """Move vectors farther than eps from ``noise0`` back along their moment sphere to distance eps.

    ``noise`` and ``noise0`` must share each vector's mean and RMS: such vectors lie on a sphere (fixed
    mean, fixed spread). Rescaling to the moments after the ball projection can leave a vector a
    second-order amount outside the ball; rotating it towards the original draw on that sphere keeps
    both moments and restores the eps bound.
    """
    flat, flat0 = noise.reshape(noise.shape[0], -1), noise0.reshape(noise0.shape[0], -1)
    dist = (flat - flat0).norm(dim=1)
    too_far = dist > eps
    if not bool(too_far.any()):
        return noise
    mean0 = flat0.mean(1, keepdim=True)
    a0, a = flat0 - mean0, flat - mean0
    radius = a0.norm(dim=1, keepdim=True)
    cos_t = ((a * a0).sum(1, keepdim=True) / radius.pow(2).clamp_min(_TINY)).clamp(-1, 1)
    ortho = a - cos_t * a0
    ortho_norm = ortho.norm(dim=1, keepdim=True)
    direction = torch.where(ortho_norm > 0, ortho / ortho_norm.clamp_min(_TINY), torch.zeros_like(ortho))
    theta = 2 * torch.asin((eps / (2 * radius.clamp_min(_TINY))).clamp(max=1.0))
    rotated = mean0 + torch.cos(theta) * a0 + torch.sin(theta) * radius * direction
    # An antipodal vector has no direction to rotate along; fall back to the original draw.
    rotated = torch.where(ortho_norm > 0, rotated, flat0)
    return torch.where(too_far.unsqueeze(1), rotated, flat).view_as(noise)


def kl_noise_pgd(
    model: nn.Module,
    x: torch.Tensor,
    noise0: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    steps: int,
) -> torch.Tensor:
    """Worst-case noise near each draw: l_2 PGD maximising the mean over copies of KL(target || f(x+noise)).

    x (N, ...), noise0 (m, N, ...), target (N, C) probabilities. Each of ``steps`` steps moves every
    vector by 2*eps/steps along its normalised gradient, projects onto the eps-ball around its
    original draw, then restores the draw's mean and RMS. Runs the model in eval mode; returns
    detached noise of noise0's shape.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if noise0.shape[1:] != x.shape:
        raise ValueError(f"noise0 must be (m, *x.shape); got {tuple(noise0.shape)} for x {tuple(x.shape)}")
    m, n = noise0.shape[0], x.shape[0]
    inputs = x.unsqueeze(0).expand_as(noise0).reshape(m * n, *x.shape[1:]).detach()
    start = noise0.reshape(m * n, *x.shape[1:]).detach()
    mean0, rms0 = noise_moments(start)
    step_size = 2.0 * eps / steps
    noise = start.clone()
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            noise.requires_grad_(True)
            logits = model(inputs + noise)
            objective = kl_to_target(logits.view(m, n, -1), target).mean(0).sum()
            (grad,) = torch.autograd.grad(objective, [noise])
            flat_grad = grad.reshape(m * n, -1)
            flat_grad = flat_grad / flat_grad.norm(dim=1, keepdim=True).clamp_min(_TINY)
            noise = noise.detach() + step_size * flat_grad.view_as(noise)
            noise = project_l2_ball(noise, start, eps)
            noise = restore_moments(noise, mean0, rms0)
            noise = pull_within_eps(noise, start, eps)
    finally:
        model.train(was_training)
    return noise.detach().view_as(noise0)


@dataclass
class CatrsTerms:
    loss: torch.Tensor  # scalar: mean over inputs of low + lam * high
    low: torch.Tensor  # (N,) mean over m of the K smallest cross-entropies
    high: torch.Tensor  # (N,) max over copies of the KL at worst-case noise; 0 where K < m
    k: torch.Tensor  # (N,) int64
    confidence: torch.Tensor  # (N,) the w(x) K was drawn from


def catrs_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    lam: float,
    eps: float,
    steps: int,
    *,
    k: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> CatrsTerms:
    """The CAT-RS objective for a batch, given its noise draws (m, N, ...).

    ``k`` fixes K per input (else drawn from Binomial(m, confidence)); ``confidence`` fixes w(x) (else the
    fraction of copies classified correctly); ``target`` (N, C) is the smoothed soft label (else the
    detached mean softmax over the m copies).
    """
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if noise.dim() != x.dim() + 1 or noise.shape[1:] != x.shape:
        raise ValueError(f"noise must be (m, *x.shape); got {tuple(noise.shape)} for x {tuple(x.shape)}")
    m, n = noise.shape[0], x.shape[0]
    logits = model((x.unsqueeze(0) + noise).reshape(m * n, *x.shape[1:])).view(m, n, -1)
    ce = F.cross_entropy(logits.reshape(m * n, -1), y.repeat(m), reduction="none").view(m, n).t()
    if confidence is None:
        confidence = noise_accuracy(logits.detach(), y)
    if k is None:
        k = sample_k(confidence, m, generator)
    k = torch.as_tensor(k, device=x.device).long()
    low = low_confidence_loss(ce, k)
    high = torch.zeros_like(low)
    full = k == m
    if lam > 0 and bool(full.any()):
        if target is None:
            target = F.softmax(logits.detach(), dim=-1).mean(0)
        target_full = target[full].detach()
        worst = kl_noise_pgd(model, x[full], noise[:, full], target_full, eps, steps)
        nf = int(full.sum())
        worst_logits = model((x[full].unsqueeze(0) + worst).reshape(m * nf, *x.shape[1:])).view(m, nf, -1)
        high = high.masked_scatter(full, kl_to_target(worst_logits, target_full).max(0).values)
    return CatrsTerms(loss=(low + lam * high).mean(), low=low, high=high, k=k, confidence=confidence)


# --------------------------------------------------------------------------- cached smoothed targets


def target_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, sidecar) for a target artifact path given with or without an extension."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


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
        raise ValueError("num_samples and batch_size must be >= 1")
    if mode not in ("votes", "softmax"):
        raise ValueError(f"mode must be 'votes' or 'softmax', got {mode!r}")
    was_training = model.training
    model.eval()
    per_pass = min(num_samples, batch_size)
    block = max(1, batch_size // per_pass)
    rows = []
    try:
        for start in tqdm(range(0, x.shape[0], block), desc="smoothed targets", disable=not progress, leave=False):
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
            raise ValueError(f"training index {int(idx.max())} is outside the cached targets "
                             f"({self.probs.shape[0]} examples): they were built for another training set")
        if not torch.equal(self.labels[idx], y.detach().cpu().long()):
            raise ValueError("cached targets do not match the training labels at these indices: "
                             "they were built for another training set or order")
        return self.probs[idx].to(y.device)


def save_smoothed_targets(path: str | Path, probs: torch.Tensor, labels: torch.Tensor, info: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` (targets, labels) and ``path.json`` (what made them). Returns the first."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"need probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    tensors, sidecar = target_paths(path)
    tensors.parent.mkdir(parents=True, exist_ok=True)
    tmp = tensors.with_name(tensors.name + ".tmp")
    save_file({"targets": probs.detach().float().cpu().contiguous(), "labels": labels.detach().long().cpu().contiguous()},
              str(tmp))
    meta = {"kind": TARGETS_KIND, "num_examples": int(probs.shape[0]), "num_classes": int(probs.shape[1]),
            **info, "provenance": provenance()}
    sidecar.write_text(json.dumps(meta, indent=2, default=str))
    tmp.replace(tensors)
    return tensors


def load_smoothed_targets(path: str | Path) -> SmoothedTargets:
    """Read an artifact written by ``save_smoothed_targets``; clear errors if missing or malformed."""
    tensors, sidecar = target_paths(path)
    if not tensors.is_file():
        raise FileNotFoundError(f"cached CAT-RS targets {tensors} not found; build them with "
                                f"`python -m adasmooth.catrs --checkpoint <gaussian model> --output {tensors.with_suffix('')}`")
    data = load_file(str(tensors))
    if "targets" not in data or "labels" not in data:
        raise ValueError(f"{tensors} is not a CAT-RS target file (needs 'targets' and 'labels')")
    probs, labels = data["targets"].float(), data["labels"].long()
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"{tensors}: targets must be (N, C) and labels (N,)")
    if probs.numel() and (probs.min() < 0 or (probs.sum(1) - 1).abs().max() > 1e-3):
        raise ValueError(f"{tensors}: target rows must be probability vectors")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return SmoothedTargets(probs, labels, info)


# --------------------------------------------------------------------------- the training method


def _cached_targets(cfg: TrainConfig, ctx: TrainContext) -> SmoothedTargets | None:
    if "cached" not in (cfg.catrs_confidence, cfg.catrs_target):
        return None
    if not cfg.catrs_target_path:
        raise ValueError("catrs_target_path is required when catrs_confidence or catrs_target is 'cached'")
    held = ctx.extras.get("catrs_targets")
    if held is None or held[0] != cfg.catrs_target_path:
        held = (cfg.catrs_target_path, load_smoothed_targets(cfg.catrs_target_path))
        ctx.extras["catrs_targets"] = held
    return held[1]


@register_method("cat-rs")
def catrs_method(model: nn.Module, batch: tuple, cfg: TrainConfig, ctx: TrainContext) -> torch.Tensor:
    """CAT-RS loss for one batch, configured by ``cfg.catrs_*`` and ``cfg.sigma``."""
    x, y, idx = batch
    cached = _cached_targets(cfg, ctx)
    confidence = target = None
    if cached is not None:
        rows = cached.lookup(idx, y).to(x.dtype)
        if cfg.catrs_confidence == "cached":
            confidence = rows.gather(1, y.unsqueeze(1)).squeeze(1).clamp(0, 1)
        if cfg.catrs_target == "cached":
            target = rows
    lam = cfg.catrs_lambda if cfg.catrs_lambda is not None else default_lambda(cfg.sigma)
    eps = effective_eps(cfg.catrs_eps, ctx.epoch, cfg.catrs_warmup_epochs)
    noise = draw_noise(x, cfg.catrs_m, cfg.sigma, ctx.generator)
    terms = catrs_loss(model, x, y, noise, lam, eps, cfg.catrs_steps, confidence=confidence, target=target,
                       generator=ctx.generator)
    stats = ctx.extras.setdefault("catrs_stats", {"inputs": 0, "full": 0})
    stats["inputs"] += int(y.shape[0])
    stats["full"] += int((terms.k == cfg.catrs_m).sum())
    return terms.loss


# --------------------------------------------------------------------------- building targets from the shell


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adasmooth.catrs",
                                description="Cache smoothed soft labels of a training set for CAT-RS (catrs_target=cached).")
    p.add_argument("--checkpoint", required=True, help="base model checkpoint (e.g. a gaussian-trained one)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", required=True, help="artifact path (writes .safetensors + .json)")
    p.add_argument("--sigma", type=float, default=None, help="noise level (default: the checkpoint's sigma)")
    p.add_argument("--samples", type=int, default=10000, help="noise draws per example (authors: 10^4)")
    p.add_argument("--mode", choices=["votes", "softmax"], default="votes")
    p.add_argument("--n-train", type=int, default=None, help="first N training examples (as train-base --n-train)")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def build_targets_for_dataset(
    checkpoint: str | Path,
    dataset: str,
    output: str | Path,
    *,
    data_dir: str | None = None,
    sigma: float | None = None,
    samples: int = 10000,
    mode: Literal["votes", "softmax"] = "votes",
    n_train: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    batch_size: int = 1000,
    device: str = "auto",
    progress: bool = True,
    train_data=None,
) -> Path:
    """Load a checkpoint and a training set (as train-base would), cache its smoothed targets."""
    from ..models.checkpoint import load_checkpoint
    from ..data import load_dataset
    from ..core.runtime import resolve_device

    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, dev)
    if sigma is None:
        if "sigma" not in info:
            raise ValueError(f"{checkpoint} records no sigma; pass --sigma")
        sigma = float(info["sigma"])
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if train_data is None:
        train_data = load_dataset(dataset, "train", data_dir, val_fraction, seed)
    train_data = train_data.subset(n_train)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    probs = smoothed_targets(model, train_data.x.to(dev), sigma, samples, batch_size, mode, gen, progress)
    meta = {"checkpoint": str(checkpoint), "checkpoint_training": info.get("training", {}).get("method"),
            "sigma": sigma, "num_samples": samples, "mode": mode, "dataset": dataset, "split": "train",
            "n_train": n_train, "val_fraction": val_fraction, "seed": seed}
    return save_smoothed_targets(output, probs, train_data.y, meta)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    path = build_targets_for_dataset(args.checkpoint, args.dataset, args.output, data_dir=args.data_dir,
                                     sigma=args.sigma, samples=args.samples, mode=args.mode, n_train=args.n_train,
                                     val_fraction=args.val_fraction, seed=args.seed, batch_size=args.batch_size,
                                     device=args.device, progress=args.progress)
    print(f"wrote {path} (+ .json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
