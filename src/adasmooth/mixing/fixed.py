"""Fixed-alpha mixing of a standard classifier g and a robust classifier h (paper Section 3, App. B).

With the default rule "prob", the mixed classifier returns the logits of Eq. 3.4,

    h_alpha(x) = log((1 - alpha) * softmax(s_g * g(x)) + alpha * softmax(s_h * h(x))),

and with the other rules of :data:`~adasmooth.mixing.rules.MIXING_RULES` the ablations of
Eqs. 3.1-3.3. The formulas live in :mod:`adasmooth.mixing.rules`; this module holds the module
that carries alpha and the two base models.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from .protocol import MixedModel, MixOutput
from .rules import MIXING_RULES, MixingRule, MixInputs

__all__ = ["MixOutput", "MixedModel", "MixedClassifier"]


def _check_alpha(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InputError(f"alpha must lie in [0, 1], got {value}")
    return value


class MixedClassifier(nn.Module):
    """A fixed-alpha mixture of a standard model g and a robust model h, returning logits.

    ``rule`` names an entry of :data:`~adasmooth.mixing.rules.MIXING_RULES` ("prob", Eq. 3.4, is the
    paper's choice) or is a rule function itself, e.g. an unregistered combination such as
    ``trust_weighted_rule("grad_g", "probability")``. ``norm`` is the threat model whose dual norm the
    gradient-based trust weights R_i use; R_i is a constant to the attacker unless
    ``differentiate_r=True`` (second-order, slower). The base models are used as given: their mode
    and ``requires_grad`` flags are the caller's.
    """

    def __init__(
        self,
        std_model: nn.Module,
        rob_model: nn.Module,
        alpha: float,
        std_scale: float = 1.0,
        rob_scale: float = 1.0,
        std_hardmax: bool = False,
        rule: str | MixingRule = "prob",
        norm: Literal["linf", "l2"] = "linf",
        differentiate_r: bool = False,
    ):
        super().__init__()
        alpha = _check_alpha(alpha)
        if isinstance(rule, str):
            self.rule_fn = MIXING_RULES.get(rule)
            self.rule = rule
        elif callable(rule):
            self.rule_fn = rule
            self.rule = getattr(rule, "__name__", repr(rule))
        else:
            raise ConfigError(f"rule must be a mixing rule name or function, got {rule!r}")
        if std_scale <= 0 or rob_scale <= 0:
            raise InputError(f"logit scales must be positive, got {std_scale} and {rob_scale}")
        if norm not in ("linf", "l2"):
            raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}")
        n_std = getattr(getattr(std_model, "spec", None), "num_classes", None)
        n_rob = getattr(getattr(rob_model, "spec", None), "num_classes", None)
        if n_std is not None and n_rob is not None and n_std != n_rob:
            raise InputError(f"base models disagree on the class count: g has {n_std}, h has {n_rob}")
        self.std_model = std_model
        self.rob_model = rob_model
        self.register_buffer("_alpha", torch.tensor(alpha))
        self.std_scale = float(std_scale)
        self.rob_scale = float(rob_scale)
        self.std_hardmax = std_hardmax
        self.norm = norm
        self.differentiate_r = differentiate_r

    @property
    def alpha(self) -> float:
        return float(self._alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha.fill_(_check_alpha(value))

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput:
        if x.dim() != 4:
            raise InputError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        n = x.shape[0]
        alpha = self._alpha.to(x.dtype).expand(n)
        # logit is exactly -inf / +inf at alpha = 0 / 1, so no branch on alpha's value (reading it
        # would synchronise with the device on every forward pass)
        alpha_logit = torch.logit(alpha.double()).to(x.dtype)
        inputs = MixInputs(x, self.std_model, self.rob_model, self.std_scale, self.rob_scale, self.std_hardmax,
                           self.norm, self.differentiate_r)
        return MixOutput(logits=self.rule_fn(inputs, alpha), alpha=alpha, alpha_logit=alpha_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).logits

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, rule={self.rule}, std_scale={self.std_scale}, rob_scale={self.rob_scale}, "
            f"std_hardmax={self.std_hardmax}"
        )
