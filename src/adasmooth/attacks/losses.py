"""Per-sample attack losses, and the protocol every attack loss follows.

An attack loss maps ``(model, x, y)`` to an (N,) tensor that the attack maximises. Taking the model
(not only its logits) lets a loss reach anything a model exposes, e.g. the alpha(x) of a mixed
classifier through ``model.mix``; see ``adasmooth.mixing.MixedModel``.

A loss may also tell an attack how to evaluate it on a subset of the batch, so that the attack
spends no forward passes on inputs it has already broken:

- ``select(index) -> AttackLoss``: the loss for rows ``index`` of the batch. Losses with
  per-example state (e.g. an (N,) weight) define it.
- ``stateless = True``: the loss holds no per-example data, so any subset can be given to it as is.

A loss that declares neither is always run on the whole batch (:func:`can_subset` is False).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError

__all__ = [
    "AttackLoss",
    "TargetedLoss",
    "can_subset",
    "loss_for_rows",
    "ce_loss",
    "margin_loss",
    "dlr_loss",
    "ce_from_logits",
    "margin_from_logits",
    "dlr_from_logits",
    "logit_loss",
    "LOSS_NAMES",
    "get_loss",
    "check_logits",
]


class AttackLoss(Protocol):
    """``loss(model, x, y) -> (N,)`` to maximise; optionally ``select(index)`` or ``stateless = True``."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class TargetedLoss(Protocol):
    """``loss(model, x, y, target) -> (N,)`` to maximise; the same optional members as :class:`AttackLoss`."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


def can_subset(loss) -> bool:
    """Whether ``loss`` may be evaluated on a subset of the batch: it says how (``select``) or is stateless."""
    return hasattr(loss, "select") or getattr(loss, "stateless", False) is True


def loss_for_rows(loss, index: torch.Tensor):
    """The loss to use on rows ``index`` of the batch: ``loss.select(index)`` where defined, else ``loss``."""
    return loss.select(index) if hasattr(loss, "select") else loss


def check_logits(out: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Reject outputs that look like probabilities (attacks on them suffer gradient masking), and
    ``labels`` outside the model's ``C`` classes (an attack would silently report nonsense)."""
    if out.dim() != 2:
        raise InputError(f"model must return (N, C) logits, got shape {tuple(out.shape)}")
    if labels is not None and labels.numel() and int(labels.max()) >= out.shape[1]:
        raise InputError(f"labels must lie in [0, {out.shape[1] - 1}] for a model with {out.shape[1]} classes, "
                         f"got {int(labels.max())}")
    if torch.isnan(out).any():  # -inf is fine: a hardmax g at alpha = 0 gives it
        raise InputError("the model returns NaN logits on these inputs")
    if out.shape[1] > 1 and bool(((out >= 0) & (out <= 1)).all()):
        sums = out.detach().sum(1)
        if torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise InputError(
                "the model returns probabilities (rows in [0, 1] summing to 1); attacks need logits. "
                "Remove the final softmax (for probabilities p, pass log(p))."
            )


def ce_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y (CW margin): positive iff misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], -torch.inf)
    return other.max(1).values - z_y


def dlr_from_logits(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), untargeted or targeted, to maximise."""
    if logits.shape[1] < 3:
        raise InputError("the DLR loss needs at least 3 classes (4 for the targeted version)")
    sorted_z, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        top = sorted_z[:, -1]
        second = sorted_z[:, -2]
        is_top = logits.argmax(1) == y
        best_other = torch.where(is_top, second, top)
        return -(z_y - best_other) / (sorted_z[:, -1] - sorted_z[:, -3] + 1e-12)
    if logits.shape[1] < 4:
        raise InputError("the targeted DLR loss needs at least 4 classes")
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    denom = sorted_z[:, -1] - 0.5 * (sorted_z[:, -3] + sorted_z[:, -4]) + 1e-12
    return -(z_y - z_t) / denom


_LOGIT_LOSSES = {"ce": ce_from_logits, "margin": margin_from_logits, "dlr": dlr_from_logits}
LOSS_NAMES = tuple(_LOGIT_LOSSES)


def _check_loss_name(name: str) -> None:
    if name not in _LOGIT_LOSSES:
        raise InputError(f"unknown attack loss {name!r}; known: {sorted(_LOGIT_LOSSES)} or a callable")


def logit_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The named loss (``"ce"``, ``"margin"`` or ``"dlr"``) of logits already computed, per example."""
    _check_loss_name(name)
    return _LOGIT_LOSSES[name](logits, y)


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ce_from_logits(model(x), y)


def margin_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margin_from_logits(model(x), y)


def dlr_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return dlr_from_logits(model(x), y)


_LOSSES: dict[str, AttackLoss] = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}
for _loss in _LOSSES.values():
    _loss.stateless = True  # no per-example data: an attack may evaluate them on any subset


def get_loss(loss: str | AttackLoss) -> AttackLoss:
    """The loss called ``loss``, or ``loss`` itself when it is already a callable."""
    if callable(loss):
        return loss
    _check_loss_name(loss)
    return _LOSSES[loss]
