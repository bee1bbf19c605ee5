"""Certified radii of the mixed classifier and the confidence bounds that make them sound.

Pure functions. The radius functions take and return tensors on whatever device and dtype they are
given; the binomial confidence bounds take counts (ints, numpy arrays or tensors) and return numpy
float64 arrays, because they come from SciPy's beta quantiles.

Notation (paper Section 3.1 and Appendix A.1): the mixed classifier is
``(1 - alpha) * p_g(x) + alpha * p_h(x)``, ``y`` is h's predicted class at x, ``y'`` its runner-up.

- Lemma 3.2: if alpha in [1/2, 1] and h keeps a margin p_y - p_i >= (1 - alpha) / alpha for every
  i != y over a ball, the mixture predicts y over that ball, whatever g does.
- Theorem 3.5: with Lip_i the l_p Lipschitz constant of p_h,i,
  r = min_{i != y} (alpha * (p_y - p_i) + alpha - 1) / (alpha * (Lip_y + Lip_i)).
- Theorem A.2 (h a Gaussian smoothed classifier with noise sigma, l_2):
  r = sigma / 2 * (Phi^-1(alpha * p_y) - Phi^-1(alpha * p_y' + 1 - alpha)).

Both radii only grow when p_y grows or p_i shrinks, so a lower confidence bound on p_y and an upper
bound on every other p_i give a radius that is valid with the bounds' joint confidence.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import beta as _beta

from ..core.errors import InputError

__all__ = [
    "required_margin",
    "lemma_margin_certifies",
    "lipschitz_radius",
    "lipschitz_radius_from_bounds",
    "rs_radius",
    "cohen_radius",
    "smoothing_lipschitz",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "simultaneous_bounds",
]


def _as_tensor(value, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if like is None else value.to(device=like.device, dtype=like.dtype)
    if like is not None:
        return torch.as_tensor(value, device=like.device, dtype=like.dtype)
    return torch.as_tensor(value, dtype=torch.get_default_dtype())


def _check_alpha(alpha: torch.Tensor) -> None:
    if torch.isnan(alpha).any() or (alpha < 0).any() or (alpha > 1).any():
        raise InputError(f"the mixing weight alpha must lie in [0, 1], got {alpha.tolist()}")


def _check_probabilities(p: torch.Tensor, name: str) -> None:
    if torch.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise InputError(f"{name} must be probabilities in [0, 1]")


def required_margin(alpha: float | torch.Tensor) -> torch.Tensor:
    """(1 - alpha) / alpha: the margin of h that Lemma 3.2 needs; +inf at alpha = 0."""
    a = _as_tensor(alpha)
    _check_alpha(a)
    return torch.where(a > 0, (1 - a) / a.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(a, math.inf))


def lemma_margin_certifies(margin: torch.Tensor | float, alpha: torch.Tensor | float) -> torch.Tensor:
    """Lemma 3.2's condition: alpha in [1/2, 1] and h's margin p_y - max_{i != y} p_i >= (1 - alpha) / alpha.

    ``margin`` is the worst margin of h over the ball (a float or a tensor); broadcasts with alpha.
    """
    m = _as_tensor(margin)
    a = _as_tensor(alpha, m)
    _check_alpha(a)
    # alpha * m >= 1 - alpha avoids dividing by alpha
    return (a >= 0.5) & (a * m >= 1 - a)


def _class_lipschitz(lipschitz, probs: torch.Tensor) -> torch.Tensor:
    """Lipschitz constants broadcast to (N, C): a scalar, a (C,) vector or an (N, C) matrix."""
    lip = _as_tensor(lipschitz, probs)
    if lip.dim() == 0:
        lip = lip.expand_as(probs)
    elif lip.dim() == 1:
        if lip.shape[0] != probs.shape[1]:
            raise InputError(f"got {lip.shape[0]} per-class Lipschitz constants for {probs.shape[1]} classes")
        lip = lip.unsqueeze(0).expand_as(probs)
    elif lip.shape != probs.shape:
        raise InputError(f"Lipschitz constants of shape {tuple(lip.shape)} do not match probabilities {tuple(probs.shape)}")
    if torch.isnan(lip).any() or (lip < 0).any():
        raise InputError("Lipschitz constants must be >= 0")
    return lip


def _per_sample_alpha(alpha, like: torch.Tensor, n: int) -> torch.Tensor:
    a = _as_tensor(alpha, like)
    _check_alpha(a)
    if a.dim() == 0:
        a = a.expand(n)
    if a.shape != (n,):
        raise InputError(f"alpha must be a scalar or shape ({n},), got {tuple(a.shape)}")
    return a


def _radius_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator clipped at 0; a positive numerator over a zero denominator is +inf."""
    safe = denominator.clamp_min(torch.finfo(denominator.dtype).tiny)
    ratio = torch.where(denominator > 0, numerator / safe, torch.full_like(numerator, math.inf))
    return torch.where(numerator > 0, ratio, torch.zeros_like(numerator))


def lipschitz_radius(
    probs: torch.Tensor,
    lipschitz: float | torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Theorem 3.5's certified radius of the mixture, per input, from h's probabilities.

    probs: (N, C) probabilities of h at the inputs. lipschitz: one constant for every class, (C,)
    per class, or (N, C) per input and class (local constants, Appendix C.3), all in the norm being
    certified. alpha: scalar or (N,). label: the class to certify, default h's top class; a label
    that is not h's top class gets radius 0. Returns (N,) radii >= 0 (+inf for a constant h).
    With alpha = 1 this is the standard radius min_i (p_y - p_i) / (Lip_y + Lip_i); alpha < 1/2
    certifies nothing.
    """
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise InputError(f"probs must be (N, C) with C >= 2, got {tuple(probs.shape)}")
    _check_probabilities(probs, "probs")
    n = probs.shape[0]
    lip = _class_lipschitz(lipschitz, probs)
    a = _per_sample_alpha(alpha, probs, n)
    y = probs.argmax(1) if label is None else label.to(probs.device).long()
    p_y = probs.gather(1, y[:, None])
    lip_y = lip.gather(1, y[:, None])
    numer = a[:, None] * (p_y - probs) + a[:, None] - 1
    denom = a[:, None] * (lip_y + lip)
    ratios = _radius_ratio(numer, denom)
    ratios = ratios.scatter(1, y[:, None], math.inf)  # i = y is not part of the minimum
    radius = ratios.min(1).values
    return torch.where(a >= 0.5, radius, torch.zeros_like(radius))


def lipschitz_radius_from_bounds(
    p_top_lower: torch.Tensor | float,
    p_other_upper: torch.Tensor | float,
    lipschitz: torch.Tensor | float,
    alpha: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Theorem 3.5 with one Lipschitz constant for every class, from p_y >= p_top_lower and
    p_i <= p_other_upper for all i != y: (alpha * (lower - upper) + alpha - 1) / (2 * alpha * Lip), >= 0."""
    lo = _as_tensor(p_top_lower)
    hi = _as_tensor(p_other_upper, lo)
    _check_probabilities(lo, "p_top_lower")
    _check_probabilities(hi, "p_other_upper")
    lip = _as_tensor(lipschitz, lo)
    if torch.isnan(lip).any() or (lip < 0).any():
        raise InputError("Lipschitz constants must be >= 0")
    a = _as_tensor(alpha, lo)
    _check_alpha(a)
    radius = _radius_ratio(a * (lo - hi) + a - 1, 2 * a * lip)
    return torch.where(a >= 0.5, radius, torch.zeros_like(radius))


def rs_radius(
    p_top: torch.Tensor | float,
    p_runner_up: torch.Tensor | float,
    sigma: float | torch.Tensor,
    alpha: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Theorem A.2's l_2 radius sigma / 2 * (Phi^-1(alpha * p_y) - Phi^-1(alpha * p_y' + 1 - alpha)), >= 0.

    p_top is (a lower bound on) the smoothed probability of y, p_runner_up (an upper bound on) the
    largest other smoothed probability. At the ends of [0, 1] Phi^-1 is -inf / +inf: the radius is 0
    when the first term is not above the second (also when both are the same infinity) and +inf only
    when p_top = 1 and p_runner_up = 0 at alpha = 1 exactly. With alpha = 1 this is Cohen et al.'s
    sigma / 2 * (Phi^-1(pA) - Phi^-1(pB)); alpha < 1/2 certifies nothing.
    """
    pa = _as_tensor(p_top)
    pb = _as_tensor(p_runner_up, pa)
    _check_probabilities(pa, "p_top")
    _check_probabilities(pb, "p_runner_up")
    s = _as_tensor(sigma, pa)
    if torch.isnan(s).any() or (s <= 0).any():
        raise InputError(f"sigma must be > 0, got {s.tolist()}")
    a = _as_tensor(alpha, pa)
    _check_alpha(a)
    # float64 for ndtri: near 1 a float32 argument loses the tail that sets the radius
    work = torch.float64 if pa.device.type != "mps" else torch.float32
    top = torch.special.ndtri((a * pa).to(work))
    runner = torch.special.ndtri((a * pb + 1 - a).clamp(max=1).to(work))
    gap = torch.where(top > runner, top - runner, torch.zeros_like(top))
    radius = (s.to(work) / 2 * gap).to(pa.dtype)
    return torch.where(a >= 0.5, radius, torch.zeros_like(radius))


def cohen_radius(p_top_lower: torch.Tensor | float, sigma: float | torch.Tensor) -> torch.Tensor:
    """sigma * Phi^-1(pA) where pA > 1/2, else 0 (Cohen et al.'s CERTIFY; pB = 1 - pA)."""
    pa = _as_tensor(p_top_lower)
    _check_probabilities(pa, "p_top_lower")
    s = _as_tensor(sigma, pa)
    if torch.isnan(s).any() or (s <= 0).any():
        raise InputError(f"sigma must be > 0, got {s.tolist()}")
    work = torch.float64 if pa.device.type != "mps" else torch.float32
    z = torch.special.ndtri(pa.to(work))
    return torch.where(pa > 0.5, s.to(work) * z, torch.zeros_like(z)).to(pa.dtype)


def smoothing_lipschitz(sigma: float) -> float:
    """l_2 Lipschitz constant sqrt(2 / pi) / sigma of each class probability of a Gaussian smoothed classifier."""
    if not sigma > 0:
        raise InputError(f"sigma must be > 0, got {sigma}")
    return math.sqrt(2.0 / math.pi) / sigma


# ------------------------------------------------------------------ binomial confidence bounds


def _counts(k, n) -> tuple[np.ndarray, np.ndarray]:
    k_arr = np.asarray(k.detach().cpu().numpy() if isinstance(k, torch.Tensor) else k)
    n_arr = np.asarray(n.detach().cpu().numpy() if isinstance(n, torch.Tensor) else n)
    if (k_arr < 0).any() or (n_arr < 1).any() or (k_arr > n_arr).any():
        raise InputError(f"need 0 <= k <= n and n >= 1, got k={k_arr.tolist()}, n={n_arr.tolist()}")
    if not (np.all(np.mod(k_arr, 1) == 0) and np.all(np.mod(n_arr, 1) == 0)):
        raise InputError("counts must be whole numbers")
    return k_arr.astype(np.float64), n_arr.astype(np.float64)


def _check_level(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"the failure probability must lie in (0, 1), got {alpha}")


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: P(p < bound) <= alpha. Beta(k, n - k + 1) quantile; 0 at k = 0."""
    _check_level(alpha)
    k_arr, n_arr = _counts(k, n)
    with np.errstate(invalid="ignore"):
        q = _beta.ppf(alpha, np.maximum(k_arr, 1), n_arr - k_arr + 1)
    return np.where(k_arr > 0, q, 0.0)


def clopper_pearson_upper(k, n, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: P(p > bound) <= alpha. Beta(k + 1, n - k) quantile; 1 at k = n."""
    _check_level(alpha)
    k_arr, n_arr = _counts(k, n)
    with np.errstate(invalid="ignore"):
        q = _beta.ppf(1 - alpha, k_arr + 1, np.maximum(n_arr - k_arr, 1))
    return np.where(k_arr < n_arr, q, 1.0)


def simultaneous_bounds(count_top, counts_other, n, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """A lower bound on p_y and an upper bound on max_{i != y} p_i that hold together with prob. >= 1 - alpha.

    count_top: (...,) draws of class y among n; counts_other: (..., C - 1) draws of every other class.
    Bonferroni: alpha / 2 goes to the lower bound of p_y and alpha / 2 is split evenly over the C - 1
    upper bounds. The runner-up bound is the smaller of max_i upper_i and 1 - lower(p_y) (the
    probabilities sum to at most 1), both valid on the same event. Returns (lower, upper).
    """
    _check_level(alpha)
    other = np.asarray(counts_other.detach().cpu().numpy() if isinstance(counts_other, torch.Tensor) else counts_other)
    if other.ndim < 1 or other.shape[-1] < 1:
        raise InputError("counts_other needs a last axis with one count per other class")
    n_arr = np.asarray(n.detach().cpu().numpy() if isinstance(n, torch.Tensor) else n)
    lower = clopper_pearson_lower(count_top, n_arr, alpha / 2)
    per_class = clopper_pearson_upper(other, n_arr[..., None] if n_arr.ndim else n_arr, alpha / (2 * other.shape[-1]))
    upper = np.minimum(per_class.max(-1), 1.0 - lower)
    return lower, upper
