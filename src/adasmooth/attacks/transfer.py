"""Transfer attacks: adversarial points crafted on one model, judged on another."""

from __future__ import annotations

import torch
from torch import nn

from .base import Attack

__all__ = ["TransferAttack"]


class TransferAttack(Attack):
    """``crafter`` (an attack on a source model) makes the points; ``run`` judges them on ``model``, the target."""

    seeds_per_example = True

    def __init__(self, model: nn.Module, crafter: Attack):
        super().__init__(model, crafter.eps, crafter.norm, crafter.seed)
        self.crafter = crafter

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.crafter.craft(x, y, ids)
