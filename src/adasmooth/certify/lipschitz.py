"""Local Lipschitz constants of a model's probabilities, estimated by PGD (paper Eq. C.1, Appendix C.3).

Theorem 3.5 only needs one-sided, local constants around the nominal input x: for h's predicted
class y, how far p_y can DROP within the eps-ball, and for every other class i how far p_i can RISE:

    Lip_y^x = max_{||d|| <= eps} (p_y(x) - p_y(x + d)) / eps
    Lip_i^x = max_{||d|| <= eps} (p_i(x + d) - p_i(x)) / eps,   i != y

Each class is maximised separately (decoupled, unlike Yang et al. 2020's joint logit estimate); the
paper's summary number (Eq. C.1) is the mean of these over the C classes. ``one_sided=False``
estimates max |p_i(x + d) - p_i(x)| / eps instead. PGD gives lower estimates of the true maxima, so
the resulting radius is an estimate, not a certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import NORMS, make_generator, normalized_step, project, random_init
from ..core.errors import InputError
from .bounds import lipschitz_radius

__all__ = ["LocalLipschitz", "estimate_local_lipschitz", "estimated_radius"]


@dataclass
class LocalLipschitz:
    lipschitz: torch.Tensor  # (N, C) per-class local constants, divided by eps
    probs: torch.Tensor  # (N, C) p(x) at the clean inputs
    predicted: torch.Tensor  # (N,) y = argmax p(x)
    eps: float
    norm: str

    @property
    def mean_lipschitz(self) -> torch.Tensor:
        """Eq. C.1: the per-input constant averaged over the classes, (N,)."""
        return self.lipschitz.mean(1)


def estimate_local_lipschitz(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    one_sided: bool = True,
    seed: int | None = 0,
    class_chunk: int | None = None,
) -> LocalLipschitz:
    """Per-class local Lipschitz constants of softmax(model(x)) within the eps-ball, by PGD.

    All C classes are attacked at once on N * C copies of the batch (``class_chunk`` limits how many
    classes share one forward pass). Every PGD run starts at a random point of the ball (the clean
    point is always a candidate too, so the estimates are >= 0) and keeps its best iterate; the
    best over ``restarts`` is returned. Inputs stay in [0, 1].
    """
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; use one of {NORMS}")
    if not eps > 0:
        raise InputError(f"eps must be > 0, got {eps}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise InputError(f"restarts must be a positive integer, got {restarts!r}")
    if x.dim() < 2:
        raise InputError(f"expected a batch of inputs, got shape {tuple(x.shape)}")
    x = x.detach()
    with torch.no_grad():
        probs = F.softmax(model(x), 1)
    n, c = probs.shape
    predicted = probs.argmax(1)
    step = float(step_size) if step_size is not None else 2.5 * eps / steps
    generator = make_generator(seed, x.device)
    chunk = c if class_chunk is None else max(1, int(class_chunk))
    best = torch.zeros(n, c, device=x.device, dtype=probs.dtype)
    view = (-1,) + (1,) * (x.dim() - 1)
    for first in range(0, c, chunk):
        classes = torch.arange(first, min(c, first + chunk), device=x.device)
        k = classes.numel()
        xs = x.repeat_interleave(k, dim=0)  # (N*k, ...) rows: input-major, class-minor
        cls = classes.repeat(n)
        ref = probs.gather(1, torch.arange(first, first + k, device=x.device).repeat(n, 1)).reshape(-1)
        # +1: push the class probability up; -1: push it down (only the predicted class, one-sided)
        sign = torch.ones(n * k, device=x.device, dtype=probs.dtype)
        sign[cls == predicted.repeat_interleave(k)] = -1.0
        eps_t = torch.full((n * k,) + view[1:], eps, device=x.device, dtype=x.dtype)

        def objective(points: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
            p = F.softmax(model(points), 1).gather(1, cls[:, None]).squeeze(1)
            return direction * (p - ref)

        directions = [sign] if one_sided else [sign, -sign]
        for direction in directions:
            for _ in range(restarts):
                delta = random_init(xs, eps_t, norm, generator)
                run_best = torch.zeros(n * k, device=x.device, dtype=probs.dtype)
                for _ in range(steps + 1):
                    delta.requires_grad_(True)
                    value = objective(xs + delta, direction)
                    run_best = torch.maximum(run_best, value.detach())
                    (grad,) = torch.autograd.grad(value.sum(), delta)
                    with torch.no_grad():
                        delta = delta + step * normalized_step(grad, norm)
                        delta = project(delta, eps_t, norm)
                        delta = (xs + delta).clamp(0, 1) - xs
                best[:, first:first + k] = torch.maximum(best[:, first:first + k], run_best.view(n, k))
    return LocalLipschitz(lipschitz=best / eps, probs=probs, predicted=predicted, eps=float(eps), norm=norm)


def estimated_radius(estimate: LocalLipschitz, alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Theorem 3.5's radius with the local constants as surrogates, (N,). It only speaks for the
    eps-ball the constants were estimated in: where it is >= eps the mixture is (estimated) robust
    at x within eps (Appendix C.3)."""
    return lipschitz_radius(estimate.probs, estimate.lipschitz, alpha, label=estimate.predicted)
