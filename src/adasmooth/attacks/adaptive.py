"""Adaptive attacks on mixed classifiers (paper Section 4.2).

A mixed classifier (``adasmooth.mixing.MixedModel``) offers the attacker a second gradient path:
through alpha(x), the weight of the robust model. These pieces use it, or deliberately do not:

- :func:`adaptive_alpha_loss`: ``(1 - w) * base + w * BCE(alpha_logit(x), 1)``. Maximising the BCE
  term drives alpha(x) down, towards the non-robust model g (setting D; also the randomly weighted
  term of the training-time attacks).
- :func:`alpha_bce_loss`: the alpha term alone, as an ``extra_loss`` for :class:`APGDTargeted`.
- :class:`DetachedAlpha`: a logits-only view of a mixed model whose gradient does not flow through
  alpha(x) (setting A, gray-box).
- :class:`LogitsOnly`: a logits-only view with the full end-to-end gradient (settings B and C), the
  form AutoAttack expects.
- :func:`differentiable_surrogate`: for a mixture whose g is a hardmax (zero gradient), the same
  mixture with a softmax g, to take gradients through (MixedNUTS's adaptive attack).

The named settings of Section 4.2 are registered here: ``A``, ``B``, ``D``, ``std`` and ``rob``
(``C`` lives with AutoAttack in :mod:`adasmooth.attacks.autoattack`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError
from ..core.precision import PrecisionModel
from .apgd import APGD, APGD_STEPS, N_TARGET_CLASSES, APGDTargeted
from .base import is_mixed_model, tensor_like
from .ensemble import EnsembleAttack
from .losses import AttackLoss, get_loss, logit_loss, loss_for_rows
from .pgd import PGD, PGD_STEPS
from .registry import ATTACKS
from .transfer import TransferAttack

__all__ = [
    "adaptive_alpha_loss",
    "alpha_bce_loss",
    "AdaptiveAlphaLoss",
    "SurrogateLoss",
    "DetachedAlpha",
    "LogitsOnly",
    "differentiable_surrogate",
    "is_mixed_model",
    "ADAPTIVE_WEIGHT",
]

ADAPTIVE_WEIGHT = 0.25  # w of the alpha term in setting D unless the ``adaptive_weight`` option says otherwise


def _require_mixed(model) -> None:
    if not is_mixed_model(model):
        raise InputError(
            f"{type(model).__name__} exposes no alpha(x): the adaptive loss needs a mixed model with "
            "mix(x, detach_alpha=False) -> MixOutput (see adasmooth.mixing)"
        )


def _alpha_term(alpha_logit: torch.Tensor) -> torch.Tensor:
    """BCE(alpha_logit, target 1) = softplus(-alpha_logit), per example; a constant 0 where alpha is fixed.

    A fixed alpha of 0 or 1 has an infinite logit; the term then carries no gradient and would
    otherwise be inf (alpha = 0) and poison the loss with NaN.
    """
    finite = torch.isfinite(alpha_logit)
    safe = torch.where(finite, alpha_logit, torch.zeros_like(alpha_logit))
    return torch.where(finite, F.softplus(-safe), torch.zeros_like(safe))


def _as_weight(weight, like: torch.Tensor) -> torch.Tensor:
    w = tensor_like(weight, like)
    if w.dim() == 1 and w.shape[0] != like.shape[0]:
        raise InputError(f"per-example weight has {w.shape[0]} entries for a batch of {like.shape[0]}")
    return w


class AdaptiveAlphaLoss:
    """``(1 - w) * base(logits, y) + w * BCE(alpha_logit, 1)`` from one ``model.mix(x)`` call.

    ``weight`` is a float in [0, 1] or an (N,) tensor (one weight per example, e.g. w ~ U(0, 0.4)
    in training). ``base`` is ``"ce"``, ``"dlr"``, ``"margin"`` or a function ``(logits, y) -> (N,)``.
    ``select(index)`` gives the loss for a subset of the batch (APGD uses it to drop broken inputs).
    """

    def __init__(self, weight: float | torch.Tensor = 0.5, base="ce"):
        w = torch.as_tensor(weight)
        if torch.isnan(w).any() or (w < 0).any() or (w > 1).any():
            raise InputError(f"the adaptive weight must lie in [0, 1], got {weight}")
        if w.dim() > 1:
            raise InputError(f"the adaptive weight must be a scalar or (N,), got shape {tuple(w.shape)}")
        if isinstance(base, str):
            get_loss(base)  # clear error for unknown names
        elif not callable(base):
            raise InputError(f"base must be a loss name or a function (logits, y) -> (N,), got {base!r}")
        self.weight = weight
        self.base = base

    def _base(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, str):
            return logit_loss(self.base, logits, y)
        return self.base(logits, y)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _require_mixed(model)
        out = model.mix(x)
        base = self._base(out.logits, y)
        w = _as_weight(self.weight, base)
        return (1 - w) * base + w * _alpha_term(out.alpha_logit.to(base.dtype))

    def select(self, index: torch.Tensor) -> "AdaptiveAlphaLoss":
        w = self.weight
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            w = w[index.to(w.device)]
        # rows of a checked weight need no new check (on a GPU it would synchronise every step)
        rows = object.__new__(AdaptiveAlphaLoss)
        rows.weight, rows.base = w, self.base
        return rows

    def __repr__(self) -> str:
        return f"AdaptiveAlphaLoss(weight={self.weight!r}, base={self.base!r})"


def adaptive_alpha_loss(weight: float | torch.Tensor = 0.5, base="ce") -> AdaptiveAlphaLoss:
    """An attack loss that also pushes alpha(x) down: see :class:`AdaptiveAlphaLoss`."""
    return AdaptiveAlphaLoss(weight, base)


def alpha_bce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE(alpha_logit(x), 1) per example: larger when alpha(x) is smaller."""
    _require_mixed(model)
    return _alpha_term(model.mix(x).alpha_logit)


alpha_bce_loss.stateless = True  # no per-example data: APGD may evaluate it on any subset


class _MixedView(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        _require_mixed(model)
        self.mixed = model

    @property
    def std_model(self):
        return self.mixed.std_model

    @property
    def rob_model(self):
        return self.mixed.rob_model


class DetachedAlpha(_MixedView):
    """Logits of a mixed model with no gradient through alpha(x): the gray-box attacker of setting A."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixed.mix(x, detach_alpha=True).logits

    def mix(self, x: torch.Tensor, detach_alpha: bool = True):
        return self.mixed.mix(x, detach_alpha=True)


class LogitsOnly(_MixedView):
    """Logits of a mixed model with the end-to-end gradient (settings B, C), as AutoAttack expects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixed.mix(x).logits

    def mix(self, x: torch.Tensor, detach_alpha: bool = False):
        return self.mixed.mix(x, detach_alpha=detach_alpha)


def differentiable_surrogate(model: nn.Module) -> nn.Module:
    """The model itself, or, when its standard branch is a hardmax (no gradient), a copy with a softmax g.

    The copy shares the base models (no weights are duplicated); only the flag differs.
    """
    if isinstance(model, PrecisionModel):  # the surrogate of the model inside, at the same precision
        return model.rewrap(differentiable_surrogate(model.model))
    if not getattr(model, "std_hardmax", False):
        return model
    surrogate = copy.copy(model)
    surrogate.std_hardmax = False
    return surrogate


class SurrogateLoss:
    """An attack loss evaluated on a surrogate model (for its gradient), whatever model the attack holds."""

    def __init__(self, loss: AttackLoss, surrogate: nn.Module):
        self.loss = loss
        self.surrogate = surrogate

    def __call__(self, _model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.surrogate, x, y)

    def select(self, index: torch.Tensor) -> "SurrogateLoss":
        return SurrogateLoss(loss_for_rows(self.loss, index), self.surrogate)


# ---------------------------------------------------------------------------- the named settings


@ATTACKS.register("A", description="gray-box PGD-20: gradients of g and h, none through alpha(x); fixed (zero) start",
                  mixed_only=True, options=("pgd_steps",))
def build_gray_box(model, eps, norm, seed, batch_size, pgd_steps: int = PGD_STEPS) -> PGD:
    return PGD(DetachedAlpha(model), eps, norm, steps=pgd_steps, random_start=False, seed=seed)


@ATTACKS.register("B", description="white-box PGD-20: end-to-end gradient through alpha(x); fixed (zero) start",
                  mixed_only=True, options=("pgd_steps",))
def build_white_box(model, eps, norm, seed, batch_size, pgd_steps: int = PGD_STEPS) -> PGD:
    return PGD(LogitsOnly(model), eps, norm, steps=pgd_steps, random_start=False, seed=seed)


@ATTACKS.register("D", description="adaptive AutoAttack: APGD-CE and APGD-T with the alpha term "
                  "(1-w)*loss + w*BCE(alpha_logit, 1), plus minimum-margin adaptive APGD-DLR through a "
                  "differentiable surrogate",
                  mixed_only=True, options=("apgd_steps", "n_target_classes", "adaptive_weight"))
def build_adaptive(model, eps, norm, seed, batch_size, apgd_steps: int = APGD_STEPS,
                   n_target_classes: int = N_TARGET_CLASSES,
                   adaptive_weight: float = ADAPTIVE_WEIGHT) -> EnsembleAttack:
    apgd = dict(eps=eps, norm=norm, steps=apgd_steps, seed=seed)
    surrogate = differentiable_surrogate(model)
    return EnsembleAttack(model, [
        ("apgd-ce+alpha", APGD(model, loss=adaptive_alpha_loss(adaptive_weight, "ce"), **apgd)),
        ("apgd-t+alpha", APGDTargeted(model, n_target_classes=n_target_classes, extra_loss=alpha_bce_loss,
                                      extra_weight=adaptive_weight, **apgd)),
        ("apgd-dlr+alpha-min-margin", APGD(
            model, loss=SurrogateLoss(adaptive_alpha_loss(adaptive_weight, "dlr"), surrogate),
            minimum_margin=True, **apgd)),
    ], eps=eps, norm=norm, seed=seed)


@ATTACKS.register("std", description="transfer PGD-20 crafted on the standard model g alone",
                  mixed_only=True, options=("pgd_steps",))
def build_transfer_from_std(model, eps, norm, seed, batch_size, pgd_steps: int = PGD_STEPS) -> TransferAttack:
    return TransferAttack(model, PGD(model.std_model, eps, norm, steps=pgd_steps, seed=seed))


@ATTACKS.register("rob", description="transfer PGD-20 crafted on the robust model h alone",
                  mixed_only=True, options=("pgd_steps",))
def build_transfer_from_rob(model, eps, norm, seed, batch_size, pgd_steps: int = PGD_STEPS) -> TransferAttack:
    return TransferAttack(model, PGD(model.rob_model, eps, norm, steps=pgd_steps, seed=seed))
