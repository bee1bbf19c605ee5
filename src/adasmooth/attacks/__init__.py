"""Attacks: every attack is an :class:`Attack`, ``attack(x, y) -> x_adv`` and ``attack.run(x, y) -> AttackResult``.

Named attacks come from :func:`make_attack`; each file below registers the names it implements.
Adding an attack: one file with the attack and its ``@ATTACKS.register(...)``, and one import line here.
"""

from .base import NORMS, Attack, AttackResult, Norm, is_mixed_model, project
from .losses import (
    AttackLoss,
    TargetedLoss,
    can_subset,
    ce_loss,
    check_logits,
    dlr_from_logits,
    get_loss,
    logit_loss,
    loss_for_rows,
    margin_from_logits,
    margin_loss,
)
from .registry import (
    ATTACK_DESCRIPTIONS,
    ATTACK_NAMES,
    ATTACKS,
    attack_description,
    check_attack_requirements,
    list_attacks,
    make_attack,
)
from .pgd import PGD
from .apgd import APGD, APGDTargeted, probability_margin
from .ensemble import EnsembleAttack
from .transfer import TransferAttack
from .adaptive import (
    AdaptiveAlphaLoss,
    DetachedAlpha,
    LogitsOnly,
    SurrogateLoss,
    adaptive_alpha_loss,
    alpha_bce_loss,
    differentiable_surrogate,
)
from .autoattack import AutoAttackAttack, AutoAttackResult, run_autoattack
from .nonlinear import NonlinearSurrogate, surrogate_for

__all__ = [
    "Attack",
    "AttackResult",
    "NORMS",
    "Norm",
    "project",
    "is_mixed_model",
    "AttackLoss",
    "TargetedLoss",
    "can_subset",
    "loss_for_rows",
    "ce_loss",
    "margin_loss",
    "margin_from_logits",
    "dlr_from_logits",
    "logit_loss",
    "get_loss",
    "check_logits",
    "ATTACKS",
    "make_attack",
    "list_attacks",
    "attack_description",
    "check_attack_requirements",
    "ATTACK_NAMES",
    "ATTACK_DESCRIPTIONS",
    "PGD",
    "APGD",
    "APGDTargeted",
    "probability_margin",
    "EnsembleAttack",
    "TransferAttack",
    "AdaptiveAlphaLoss",
    "SurrogateLoss",
    "adaptive_alpha_loss",
    "alpha_bce_loss",
    "DetachedAlpha",
    "LogitsOnly",
    "differentiable_surrogate",
    "AutoAttackAttack",
    "AutoAttackResult",
    "run_autoattack",
    "NonlinearSurrogate",
    "surrogate_for",
]
