"""Per-sample attack losses. An attack loss maps (model, x, y) to a (N,) tensor to maximise.

Taking the model (not only its logits) lets a loss reach anything a model exposes, e.g. the
alpha(x) of a mixed classifier through ``model.mix``; see ``adasmooth.mixing.MixedModel``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

AttackLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["AttackLoss", "ce_loss", "margin_loss", "dlr_from_logits", "get_loss", "check_logits"]


def check_logits(out: torch.Tensor) -> None:
    """Reject outputs that look like probabilities: attacks on them suffer gradient masking."""
    if out.dim() != 2:
        raise ValueError(f"model must return (N, C) logits, got shape {tuple(out.shape)}")
    if out.shape[1] > 1 and bool(((out >= 0) & (out <= 1)).all()):
        sums = out.detach().sum(1)
        if torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise ValueError(
                "the model returns probabilities (rows in [0, 1] summing to 1); attacks need logits. "
                "Remove the final softmax (for probabilities p, pass log(p))."
            )


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def margin_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y (CW margin): positive iff misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -torch.inf)
    return other.max(1).values - z_y


def margin_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margin_from_logits(model(x), y)


def dlr_from_logits(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), untargeted or targeted, to maximise."""
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes (4 for the targeted version)")
    sorted_z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        top = sorted_z[:, -1]
        second = sorted_z[:, -2]
        is_top = logits.argmax(1) == y
        best_other = torch.where(is_top, second, top)
        return -(z_y - best_other) / (sorted_z[:, -1] - sorted_z[:, -3] + 1e-12)
    if logits.shape[1] < 4:
        raise ValueError("the targeted DLR loss needs at least 4 classes")
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    denom = sorted_z[:, -1] - 0.5 * (sorted_z[:, -3] + sorted_z[:, -4]) + 1e-12
    return -(z_y - z_t) / denom


def dlr_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return dlr_from_logits(model(x), y)


_LOSSES: dict[str, AttackLoss] = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}


def get_loss(loss: str | AttackLoss) -> AttackLoss:
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; known: {sorted(_LOSSES)} or a callable")
    return _LOSSES[loss]
