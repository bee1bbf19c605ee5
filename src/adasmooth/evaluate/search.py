"""The bisection the calibrations share lives in :mod:`adasmooth.core.search` (training uses it too)."""

from ..core.search import bisect_decreasing

__all__ = ["bisect_decreasing"]
