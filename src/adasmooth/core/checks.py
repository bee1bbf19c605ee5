"""Range checks shared by the validate() methods of configs.

Each raises a one-line ConfigError naming the option. Comparisons are written so that NaN, which
fails every comparison, is rejected too (``lr=nan`` must not slip through ``lr <= 0``).
"""

from __future__ import annotations

import math
from typing import Any

from ..core.errors import ConfigError

__all__ = ["check_finite", "check_counts", "check_eps"]


def check_finite(name: str, value: float | None, low: float | None = None, *, strict: bool = False,
                 below: float | None = None, high: float | None = None) -> None:
    """Unless ``value`` is None (unset): it must be finite, >= ``low`` (> with ``strict``), < ``below``
    and <= ``high``."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if ok and below is not None:
        ok = value < below
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = ([] if low is None else [f"{'>' if strict else '>='} {low}"]) + ([] if below is None else [f"< {below}"])
        bounds += [] if high is None else [f"<= {high}"]
        raise ConfigError(f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got {value}")


def check_counts(cfg: Any, *names: str, low: int = 1, prefix: str = "") -> None:
    """Each named integer field of ``cfg`` must be unset (None) or >= ``low``."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value >= low:
            raise ConfigError(f"{prefix}{name} must be >= {low}, got {value}")


def check_eps(eps: float | None, norm: str | None) -> None:
    """An attack radius in [0, 1] pixel units: finite, >= 0, and <= 1 for l_inf (inputs live in [0, 1],
    so a larger l_inf radius covers the whole input space)."""
    check_finite("eps", eps, 0, high=1 if norm in (None, "linf") else None)
