"""One-dimensional search for a target clean accuracy, shared by the calibrations and the mixing-network
trainer's per-epoch measurement."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["bisect_decreasing", "percent_correct"]


def percent_correct(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (%) of ``logits`` on labels ``y``, from the exact count (a float32 mean is off by rounding,
    enough to miss a target equal to a base model's accuracy)."""
    return 100.0 * (logits.argmax(1) == y).sum().item() / len(y)


def bisect_decreasing(acc_of: Callable[[float], float], lo: float, hi: float, target: float,
                       iters: int = 40) -> tuple[float, float, bool]:
    """Largest value in [lo, hi] whose accuracy is >= target, for an accuracy falling with the value.

    Returns (value, accuracy, reached). ``reached`` is False when even ``lo`` falls short (then
    ``lo`` is returned). Accuracy is a step function and only roughly monotone, so the invariant
    acc(lo) >= target > acc(hi) is what bisection keeps.
    """
    acc_lo, acc_hi = acc_of(lo), acc_of(hi)
    if acc_hi >= target:
        return hi, acc_hi, True
    if acc_lo < target:
        return lo, acc_lo, False
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        acc_mid = acc_of(mid)
        if acc_mid >= target:
            lo, acc_lo = mid, acc_mid
        else:
            hi = mid
    return lo, acc_lo, True
