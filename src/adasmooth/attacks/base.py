"""Shared pieces of every attack: threat-model geometry, argument checks, seeded generators."""

from __future__ import annotations

from typing import Literal

import torch

Norm = Literal["linf", "l2"]
NORMS = ("linf", "l2")

__all__ = ["Norm", "NORMS", "per_sample", "project", "random_init", "normalized_step", "check_attack_args", "make_generator"]


def per_sample(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (N,) value as an (N, 1, ..., 1) tensor on x's device and dtype."""
    t = torch.as_tensor(value, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"per-sample value must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Project a perturbation onto the eps-ball (eps shaped (N, 1, ..., 1))."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    norms = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    factor = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
    return delta * factor


def random_init(x: torch.Tensor, eps: torch.Tensor, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random start inside the ball, clipped so x + delta stays in [0, 1]."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * u - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        n = x[0].numel()
        r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / n)
        delta = d * r.view(-1, *([1] * (x.dim() - 1))) * eps
    return (x + delta).clamp(0, 1) - x


def normalized_step(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit size in the threat model's norm."""
    if norm == "linf":
        return grad.sign()
    g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return grad / g_norm


def check_attack_args(eps, norm: str, steps: int | None = None) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {NORMS}")
    e = torch.as_tensor(eps)
    if torch.isnan(e).any() or (e < 0).any():
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
