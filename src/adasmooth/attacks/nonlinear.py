"""The adaptive attack on nonlinear (MixedNUTS) mixtures: gradients of a surrogate, margins of the truth.

A MixedNUTS mixture gives an attacker almost no usable gradient: g enters as a hardmax (zero
gradient), and the power in h's map flattens or explodes the gradient of the robust branch. The
authors' adaptive attack therefore differentiates a smooth stand-in and judges every iterate on the
true classifier:

- :class:`NonlinearSurrogate`: log((1 - alpha) softmax(T * normalize_top_k(g)) +
  alpha (r softmax(h) + (1 - r) softmax(map(h)))): g layer-normalised and scaled up by T instead of
  the hardmax, h's probabilities mostly (r = 0.9) unmapped. alpha is the model's own (fixed, or
  alpha(x) of an adaptive mixture, whose gradient the surrogate keeps).
- ``surrogate`` (registered in :data:`~adasmooth.attacks.registry.ATTACKS`, like setting D):
  APGD-CE (with the alpha term of setting D for adaptive mixtures) and targeted APGD-DLR on the
  surrogate's losses, each in minimum-margin mode on the TRUE mixture: per input the point with
  the smallest probability margin of the true classifier is kept, the clean input included.

On a mixture without a map (rule "prob", adaptive without ``nonlinear``) the surrogate is the
model itself (with a softmax g where g is a hardmax), so the attack is setting D's minimum-margin
APGD pair.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError
from ..mixing.nonlinear import NonlinearParams, nonlinear_map, nonlinear_params_of, normalize_top_k, wide_dtype
from ..mixing.protocol import MixOutput
from ..mixing.rules import mix_log_probs
from .adaptive import ADAPTIVE_WEIGHT, SurrogateLoss, _MixedView, adaptive_alpha_loss, differentiable_surrogate
from .apgd import APGD, APGD_STEPS, N_TARGET_CLASSES, APGDTargeted
from .ensemble import EnsembleAttack
from .losses import dlr_from_logits
from .registry import ATTACKS

__all__ = ["NonlinearSurrogate", "surrogate_for", "surrogate_targeted_loss", "STD_TEMPERATURE", "RAW_RATIO"]

STD_TEMPERATURE = 3.0  # T: the layer-normalised g scaled up, so the surrogate's g is nearly as decisive as a hardmax
RAW_RATIO = 0.9  # r: the share of the robust branch taken from h's raw softmax (the authors' value)


class NonlinearSurrogate(_MixedView):
    """A differentiable stand-in for a nonlinear mixed model (fixed or adaptive); follows the mixed-model protocol."""

    def __init__(self, model: nn.Module, params: NonlinearParams | None = None,
                 std_temperature: float = STD_TEMPERATURE, raw_ratio: float = RAW_RATIO):
        super().__init__(model)  # checks that model is a mixed model; keeps it as self.mixed
        params = params or nonlinear_params_of(model)
        if params is None:
            raise InputError(f"{type(model).__name__} has no nonlinear map: use it directly (no surrogate needed)")
        if not (math.isfinite(std_temperature) and std_temperature > 0):
            raise InputError(f"std_temperature must be > 0, got {std_temperature}")
        if not 0 <= raw_ratio <= 1:
            raise InputError(f"raw_ratio must lie in [0, 1], got {raw_ratio}")
        self.params = params
        self.std_temperature = float(std_temperature)
        self.raw_ratio = float(raw_ratio)

    def _base_and_alpha(self, x: torch.Tensor, detach_alpha: bool):
        m = self.mixed
        if hasattr(m, "base_outputs"):  # adaptive: alpha(x) from the mixing network, gradient kept
            g, h, first, second = m.base_outputs(x)
            alpha, alpha_logit = m.alpha_from_features(first, second, detach=detach_alpha)
            return g, h, alpha, alpha_logit
        g, h = m.std_model(x), m.rob_model(x)
        alpha = torch.full((x.shape[0],), float(m.alpha), device=x.device, dtype=x.dtype)
        return g, h, alpha, torch.logit(alpha.double()).to(x.dtype)  # +-inf at alpha 0 or 1, as fixed.mix gives

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput:
        g, h, alpha, alpha_logit = self._base_and_alpha(x, detach_alpha)
        wide = wide_dtype(h)
        p = self.params
        log_p_std = F.log_softmax(self.std_temperature * normalize_top_k(g.to(wide), p.top_k), dim=1)
        log_raw = F.log_softmax(h.to(wide), dim=1)
        log_mapped = F.log_softmax(nonlinear_map(h, p.s, p.c, p.p, p.top_k, p.activation), dim=1)
        # r * softmax(h) + (1 - r) * softmax(map(h)) is itself a two-component mixture: Eq. 3.4's maths
        log_p_rob = mix_log_probs(log_raw, log_mapped, 1.0 - self.raw_ratio)
        logits = mix_log_probs(log_p_std, log_p_rob, alpha.to(wide))
        return MixOutput(logits=logits.to(x.dtype), alpha=alpha, alpha_logit=alpha_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).logits


def surrogate_for(model: nn.Module, std_temperature: float = STD_TEMPERATURE, raw_ratio: float = RAW_RATIO) -> nn.Module:
    """The model to differentiate when attacking ``model``: a :class:`NonlinearSurrogate` for a nonlinear
    mixture, otherwise the model itself (with a softmax g where it uses a hardmax)."""
    if nonlinear_params_of(model) is None:
        return differentiable_surrogate(model)
    return NonlinearSurrogate(model, std_temperature=std_temperature, raw_ratio=raw_ratio)


def surrogate_targeted_loss(surrogate: nn.Module):
    """Targeted DLR of ``surrogate``'s logits, as a :class:`~adasmooth.attacks.losses.TargetedLoss`."""

    def loss(_model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dlr_from_logits(surrogate(x), y, target)

    loss.stateless = True
    return loss


@ATTACKS.register("surrogate", description="MixedNUTS adaptive attack: APGD-CE (+ alpha term) and APGD-T through a "
                  "differentiable surrogate (softmax of layer-normalised g scaled up, h's probabilities mostly "
                  "unmapped), keeping per input the smallest-margin point of the true mixture",
                  mixed_only=True, options=("apgd_steps", "n_target_classes", "adaptive_weight"))
def build_surrogate_attack(model, eps, norm, seed, batch_size, apgd_steps: int = APGD_STEPS,
                           n_target_classes: int = N_TARGET_CLASSES,
                           adaptive_weight: float = ADAPTIVE_WEIGHT) -> EnsembleAttack:
    surrogate = surrogate_for(model)
    apgd = dict(eps=eps, norm=norm, steps=apgd_steps, seed=seed, minimum_margin=True)
    return EnsembleAttack(model, [
        ("apgd-ce@surrogate", APGD(model, loss=SurrogateLoss(adaptive_alpha_loss(adaptive_weight, "ce"), surrogate),
                                   **apgd)),
        ("apgd-t@surrogate", APGDTargeted(model, loss=surrogate_targeted_loss(surrogate),
                                          n_target_classes=n_target_classes, **apgd)),
    ], eps=eps, norm=norm, seed=seed)
