"""Attacks: every attack is a callable ``attack(x, y) -> x_adv`` built around a model."""

from .base import NORMS, Norm, project
from .losses import AttackLoss, ce_loss, check_logits, dlr_from_logits, get_loss, margin_from_logits, margin_loss
from .pgd import PGD

__all__ = [
    "NORMS",
    "Norm",
    "project",
    "AttackLoss",
    "ce_loss",
    "margin_loss",
    "margin_from_logits",
    "dlr_from_logits",
    "get_loss",
    "check_logits",
    "PGD",
]
