"""Attacks: every attack is a callable ``attack(x, y) -> x_adv`` built around a model."""

from .base import NORMS, Norm, project
from .losses import AttackLoss, ce_loss, check_logits, dlr_from_logits, get_loss, margin_from_logits, margin_loss
from .pgd import PGD
from .apgd import APGD, APGDTargeted, TargetedLoss, probability_margin
from .adaptive import (
    AdaptiveAlphaLoss,
    DetachedAlpha,
    LogitsOnly,
    adaptive_alpha_loss,
    alpha_bce_loss,
    differentiable_surrogate,
    is_mixed_model,
)
from .autoattack import AutoAttackAttack, AutoAttackResult, run_autoattack

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
    "APGD",
    "APGDTargeted",
    "TargetedLoss",
    "probability_margin",
    "AdaptiveAlphaLoss",
    "adaptive_alpha_loss",
    "alpha_bce_loss",
    "DetachedAlpha",
    "LogitsOnly",
    "differentiable_surrogate",
    "is_mixed_model",
    "AutoAttackAttack",
    "AutoAttackResult",
    "run_autoattack",
]
