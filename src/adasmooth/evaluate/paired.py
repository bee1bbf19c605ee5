"""The difference of two classifiers' accuracies on the same inputs, with a paired confidence interval.

Two classifiers judged on the same n inputs give a 2x2 table of outcomes; only the discordant inputs
(right for one, wrong for the other) carry information about the difference. The interval is Agresti and
Min's (2005, "Simple improved confidence intervals for comparing matched proportions"): the Wald interval
of the paired difference after adding 1/2 to each of the four cells, which keeps its coverage near the
nominal level even with few discordant pairs (the plain Wald interval collapses to a point when there are
none).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Sequence

from ..core.errors import InputError

__all__ = ["paired_difference_interval", "paired_difference"]


def paired_difference_interval(n: int, first_only: int, second_only: int,
                               confidence: float = 0.95) -> tuple[float, float]:
    """Interval for acc(first) - acc(second) (fractions) from n paired outcomes, of which ``first_only``
    were right for the first classifier alone and ``second_only`` for the second alone (Agresti-Min).

    With a = (first_only + 1/2) / (n + 2) and b = (second_only + 1/2) / (n + 2):
    (a - b) -/+ z * sqrt(((a + b) - (a - b)^2) / (n + 2)), clipped to [-1, 1], z the normal quantile
    of (1 + confidence) / 2.
    """
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    if n < 1 or first_only < 0 or second_only < 0 or first_only + second_only > n:
        raise InputError(f"need 0 <= first_only + second_only <= n and n >= 1; got n={n}, "
                         f"first_only={first_only}, second_only={second_only}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    total = n + 2
    a, b = (first_only + 0.5) / total, (second_only + 0.5) / total
    half = z * math.sqrt(((a + b) - (a - b) ** 2) / total)
    return max(-1.0, a - b - half), min(1.0, a - b + half)


def paired_difference(first_correct: Sequence[bool], second_correct: Sequence[bool],
                      confidence: float = 0.95) -> dict[str, Any]:
    """Accuracies (%) of two classifiers on the same inputs, their difference (first - second, points) and
    its paired interval (:func:`paired_difference_interval`, points)."""
    first, second = [bool(v) for v in first_correct], [bool(v) for v in second_correct]
    if len(first) != len(second) or not first:
        raise InputError(f"paired outcomes need the same inputs: got {len(first)} and {len(second)} outcomes")
    n = len(first)
    first_only = sum(f and not s for f, s in zip(first, second))
    second_only = sum(s and not f for f, s in zip(first, second))
    lo, hi = paired_difference_interval(n, first_only, second_only, confidence)
    return {"n": n, "first_acc": 100.0 * sum(first) / n, "second_acc": 100.0 * sum(second) / n,
            "difference": 100.0 * (first_only - second_only) / n, "interval": [100.0 * lo, 100.0 * hi],
            "confidence": confidence, "first_only": first_only, "second_only": second_only}
