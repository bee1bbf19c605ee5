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
usable and testable without the training loop; the registered ``cat-rs`` method wires them to
``TrainConfig.catrs`` (:class:`CatrsOptions`) and ``TrainConfig.sigma``. Cached smoothed targets
are built and read by :mod:`adasmooth.train.catrs_targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import option
from ...core.errors import ConfigError, InputError
from ...core.checks import check_counts, check_finite
from ..catrs_targets import SmoothedTargets, draw_noise, load_smoothed_targets, sampling_dtype, target_paths
from .base import TRAINING_METHODS, TrainContext

__all__ = [
    "CatrsOptions",
    "CatrsTerms",
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
    "catrs_method",
]

_TINY = 1e-12


@dataclass
class CatrsOptions:
    """CAT-RS options (method cat-rs): the catrs block of a training config."""

    m: int = option(4, help="noise draws per input")
    lambda_: float | None = option(None, help="weight of the worst-case KL term; none: 2*sigma (the "
                                              "authors' 0.5/1/2 for sigma 0.25/0.5/1)")
    eps: float = option(1.0, help="l_2 radius of the worst-case noise search")
    steps: int = option(4, help="PGD steps of the worst-case noise search")
    warmup_epochs: int | None = option(None, help="from this (0-based) epoch on the radius is doubled "
                                                  "(default: never)")
    confidence: Literal["accuracy", "cached"] = option(
        "accuracy", help="w(x): fraction of noisy copies classified correctly, or the cached smoothed p(y|x)")
    target: Literal["mean", "cached"] = option(
        "mean", help="KL target: detached mean softmax over the copies, or the cached smoothed soft label")
    target_path: str | None = option(None, help="cached smoothed targets (built by `adasmooth catrs-targets`)")

    def validate(self) -> None:
        check_counts(self, "m", "steps", prefix="catrs.")
        check_counts(self, "warmup_epochs", low=0, prefix="catrs.")
        check_finite("catrs.lambda", self.lambda_, 0)
        check_finite("catrs.eps", self.eps, 0)
        if self.confidence not in ("accuracy", "cached"):
            raise ConfigError(f"catrs.confidence must be 'accuracy' or 'cached', got {self.confidence!r}")
        if self.target not in ("mean", "cached"):
            raise ConfigError(f"catrs.target must be 'mean' or 'cached', got {self.target!r}")

    @property
    def uses_cache(self) -> bool:
        return "cached" in (self.confidence, self.target)


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


def noise_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of the noisy copies classified as ``y``: logits (m, N, C), y (N,) -> (N,)."""
    if logits.dim() != 3 or logits.shape[1] != y.shape[0]:
        raise InputError(f"logits must be (m, N, C) with N = len(y); got {tuple(logits.shape)} and {tuple(y.shape)}")
    return (logits.argmax(-1) == y.unsqueeze(0)).to(logits.dtype).mean(0)


def sample_k(confidence: torch.Tensor, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K ~ Binomial(m, confidence) per input, raised to at least 1. confidence (N,) in [0, 1] -> int64 (N,)."""
    if m < 1:
        raise InputError(f"need m >= 1, got {m}")
    if confidence.dim() != 1:
        raise InputError(f"confidence must be (N,), got shape {tuple(confidence.shape)}")
    if confidence.numel() and (confidence.min() < 0 or confidence.max() > 1):
        raise InputError("confidence must lie in [0, 1]")
    device = generator.device if generator is not None else confidence.device
    u = torch.rand((confidence.shape[0], m), generator=generator, device=device,
                   dtype=sampling_dtype(confidence.dtype)).to(confidence.device)
    # A sum of m Bernoulli(w) draws is Binomial(m, w), and it can use a seeded generator.
    hits = (u < confidence.to(u.dtype).unsqueeze(1)).sum(1)
    return hits.clamp_min(1).long()


def bottom_k_mask(losses: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (N, m) mask marking the ``k[i]`` smallest entries of each row of ``losses`` (N, m).

    Ties are broken by position, so exactly ``k[i]`` entries are kept in row ``i``.
    """
    if losses.dim() != 2:
        raise InputError(f"losses must be (N, m), got shape {tuple(losses.shape)}")
    k = torch.as_tensor(k, device=losses.device)
    if k.shape != losses.shape[:1]:
        raise InputError(f"k must be (N,) = ({losses.shape[0]},), got shape {tuple(k.shape)}")
    m = losses.shape[1]
    if k.numel() and (k.min() < 0 or k.max() > m):
        raise InputError(f"k must lie in [0, {m}]")
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
        raise InputError(f"steps must be >= 1, got {steps}")
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    if noise0.shape[1:] != x.shape:
        raise InputError(f"noise0 must be (m, *x.shape); got {tuple(noise0.shape)} for x {tuple(x.shape)}")
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
        raise InputError(f"lambda must be >= 0, got {lam}")
    if noise.dim() != x.dim() + 1 or noise.shape[1:] != x.shape:
        raise InputError(f"noise must be (m, *x.shape); got {tuple(noise.shape)} for x {tuple(x.shape)}")
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


# --------------------------------------------------------------------------- the training method


def _check_config(cfg) -> None:
    """Cached targets must be named and present before a run spends time on anything else."""
    opts: CatrsOptions = cfg.catrs
    if not opts.uses_cache:
        return
    if not opts.target_path:
        raise ConfigError("catrs.target_path is required when catrs.confidence or catrs.target is 'cached'")
    tensors = target_paths(opts.target_path)[0]
    if not tensors.is_file():
        # load_smoothed_targets words the missing-file error (DataError) with how to build the file
        load_smoothed_targets(opts.target_path)


def _cached_targets(opts: CatrsOptions, ctx: TrainContext) -> SmoothedTargets | None:
    if not opts.uses_cache:
        return None
    if not opts.target_path:
        raise ConfigError("catrs.target_path is required when catrs.confidence or catrs.target is 'cached'")
    held = ctx.extras.get("catrs_targets")
    if held is None or held[0] != opts.target_path:
        held = (opts.target_path, load_smoothed_targets(opts.target_path))
        ctx.extras["catrs_targets"] = held
    return held[1]


# distributed=False: which inputs take the adversarial branch depends on the batch's noise, so the
# ranks of a torchrun run would disagree on the number of synchronised forward passes.
@TRAINING_METHODS.register("cat-rs", description="confidence-aware randomized smoothing training (Jeong et al.)",
                           smoothing=True, check=_check_config, distributed=False, options=CatrsOptions)
def catrs_method(model: nn.Module, batch: tuple, cfg, ctx: TrainContext) -> torch.Tensor:
    """CAT-RS loss for one batch, configured by ``cfg.catrs`` and ``cfg.sigma``."""
    x, y, idx = batch
    opts: CatrsOptions = cfg.catrs
    cached = _cached_targets(opts, ctx)
    confidence = target = None
    if cached is not None:
        rows = cached.lookup(idx, y).to(x.dtype)
        if opts.confidence == "cached":
            confidence = rows.gather(1, y.unsqueeze(1)).squeeze(1).clamp(0, 1)
        if opts.target == "cached":
            target = rows
    lam = opts.lambda_ if opts.lambda_ is not None else default_lambda(cfg.sigma)
    eps = effective_eps(opts.eps, ctx.epoch, opts.warmup_epochs)
    noise = draw_noise(x, opts.m, cfg.sigma, ctx.generator)
    terms = catrs_loss(model, x, y, noise, lam, eps, opts.steps, confidence=confidence, target=target,
                       generator=ctx.generator)
    stats = ctx.extras.setdefault("catrs_stats", {"inputs": 0, "full": 0})
    stats["inputs"] += int(y.shape[0])
    stats["full"] += int((terms.k == opts.m).sum())
    return terms.loss
