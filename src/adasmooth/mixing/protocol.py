"""What attacks may assume of a mixed classifier (see ``adasmooth.attacks``).

Every mixed model in adasmooth (the fixed-alpha :class:`~adasmooth.mixing.fixed.MixedClassifier`
and the adaptive :class:`~adasmooth.mixing.adaptive.AdaptiveMixedClassifier`) follows one small
protocol: ``forward(x)`` returns logits, and ``mix(x, detach_alpha=False)`` returns a
:class:`MixOutput` with the logits, alpha(x) and its logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["MixOutput", "MixedModel"]


@dataclass
class MixOutput:
    logits: torch.Tensor  # (N, C) mixed logits
    alpha: torch.Tensor  # (N,) weight of the robust model
    alpha_logit: torch.Tensor  # (N,) logit of alpha (may be +-inf for a fixed alpha of 0 or 1)


@runtime_checkable
class MixedModel(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput: ...
