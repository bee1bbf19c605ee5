"""Several attacks in turn, as one attack: the worst case over its components, per input."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from .base import Attack, AttackResult, Norm

__all__ = ["EnsembleAttack"]


class EnsembleAttack(Attack):
    """Named attacks in turn, each on the inputs the earlier ones left correctly classified.

    ``attacks`` is a list of ``(name, attack)`` with ``attack(x, y) -> x_adv``; ``eps``, ``norm`` and
    ``seed`` describe the threat model the components share. Per input the result is the first
    misclassified point found, else the last component's output; ``run`` names in ``broken_by`` the
    component that broke each input ("clean": misclassified before any attack, None: none did).
    """

    seeds_per_example = True

    def __init__(self, model: nn.Module, attacks: Sequence[tuple[str, Callable]], eps: float | torch.Tensor,
                 norm: Norm = "linf", seed: int | None = None):
        if not attacks:
            raise ConfigError("an ensemble needs at least one attack")
        super().__init__(model, eps, norm, seed)
        self.attacks = list(attacks)
        self.components = tuple(name for name, _ in self.attacks)

    def _attack(self, x: torch.Tensor, y: torch.Tensor,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str | None]]:
        x = x.detach()
        result = x.clone()
        with torch.no_grad():
            robust = self.model(x).argmax(1) == y
        broken_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
        for name, attack in self.attacks:
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_adv = _craft(attack, x[idx], y[idx], None if ids is None else torch.as_tensor(ids)[idx.cpu()])
            with torch.no_grad():
                fooled = self.model(x_adv).argmax(1) != y[idx]
            result[idx] = x_adv
            robust[idx[fooled]] = False
            for i in idx[fooled].tolist():
                broken_by[i] = name
        return result, broken_by

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._attack(x, y, ids)[0]

    def run(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> AttackResult:
        x_adv, broken_by = self._attack(x, y, ids)
        return self.judge(x_adv, y, broken_by=broken_by)


def _craft(attack, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """A component's points: through :meth:`Attack.craft` for an :class:`Attack`, else ``attack(x, y)``."""
    return attack.craft(x, y, ids) if isinstance(attack, Attack) else attack(x, y)
