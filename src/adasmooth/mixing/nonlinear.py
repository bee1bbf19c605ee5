"""Nonlinear mixing (MixedNUTS, Bai et al., TMLR 2024): transform h's logits, then mix with a hardmax g.

The robust model h is more confident where it is right than where it is wrong; a monotone
transform of its logits that widens that confidence gap lets a fixed alpha close to 1 keep most
of h's robustness while g (entering as a one-hot of its argmax) repairs many of h's clean errors.

- :func:`normalize_top_k`: (z - mean) / std over the top-k logits of each row (all for k >= C).
- :func:`nonlinear_map`: s * sign(a) * |a|^p with a = act(normalize_top_k(z) + c), act = GELU by
  default (ReLU, ELU, Softplus as alternatives). Per row it is monotone, so h's ranking is kept.
- :func:`nonlinear_mix_log_probs`: log((1 - alpha) * hardmax(g) + alpha * softmax(map(h))).
- :class:`NonlinearParams`: (s, c, p, top_k, activation), a config block (``--nonlinear-*``).
- :func:`nonlinear_rule`: the mixing rule for given parameters; ``"nonlinear"`` in
  :data:`~adasmooth.mixing.rules.MIXING_RULES` is the rule with the default parameters (use
  :func:`nonlinear_rule` or ``adasmooth calibrate --rule nonlinear`` for calibrated ones).
- :class:`TransformedModel`: h with the map applied, for analyses of the transformed h.

Precision. The map runs in float64 (float32 on MPS, which has no float64) and the mixture's
log-probabilities are cast back to the input dtype only at the end. The power and the scale make
the transformed logits large (s * |a|^p reaches 10^3 - 10^5 for p around 4), and a float32 logit
of that size is only resolved to about 10^-3 - 10^-2: the calibrated alpha sits within ~10^-3 of 1
and its cutoff compares probability margins of order 10^-3, so those rounding errors would move
inputs across the cutoff. log-probabilities are bounded above by 0 and keep their meaningful
digits in float32, so the cast at the end is harmless. (The authors compute their maps in float64
for the same reason.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import from_mapping, option
from ..core.errors import ConfigError, InputError
from .rules import MixingRule, MixInputs, check_class_counts, hardmax, mix_log_probs, register_rule_with_params

__all__ = [
    "ACTIVATIONS",
    "NonlinearParams",
    "wide_dtype",
    "normalize_top_k",
    "nonlinear_map",
    "nonlinear_mix_log_probs",
    "nonlinear_rule",
    "nonlinear_params_of",
    "TransformedModel",
]

# The clamp functions of MixedNUTS: GELU is the authors' choice, the others their ablations.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "elu": F.elu,
    "softplus": F.softplus,
}

LOG_ZERO = -1e4  # stands for log 0 where a -inf would poison gradients
TOP_K = 250  # the authors' k: every class of CIFAR-10/100 and the digit sets, the top 250 of ImageNet


@dataclass
class NonlinearParams:
    """The MixedNUTS map on h's logits: s * sign(a) * |a|^p, a = activation(normalised logits + c)."""

    s: float = option(1.0, help="scale applied after the power (> 0)")
    c: float = option(0.0, help="shift added to the normalised logits before the activation")
    p: float = option(1.0, help="exponent of the sign-preserving power (> 0)")
    top_k: int = option(TOP_K, help="normalise by the mean and std of each row's top-k logits (all if >= classes)")
    activation: Literal["gelu", "relu", "elu", "softplus"] = option("gelu", help="activation after the shift")

    def validate(self) -> None:
        for name, value in (("s", self.s), ("p", self.p)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"nonlinear {name} must be a finite number > 0, got {value}")
        if not math.isfinite(self.c):
            raise ConfigError(f"nonlinear c must be finite, got {self.c}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 2:
            raise ConfigError(f"nonlinear top_k must be an integer >= 2, got {self.top_k!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NonlinearParams":
        return from_mapping(cls, dict(data), "nonlinear")


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 where the device has it (MPS does not: float32 there)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def normalize_top_k(logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """(z - m) / sqrt(v + 1e-8) per row, m and v the mean and (unbiased) variance of the row's top-k logits."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InputError(f"expected (N, C) logits with C >= 2, got {tuple(logits.shape)}")
    top = logits if k >= logits.shape[1] else logits.topk(k, dim=1).values
    mean = top.mean(1, keepdim=True)
    var = top.var(1, keepdim=True)
    return (logits - mean) / (var + 1e-8).sqrt()


def _signed_power(a: torch.Tensor, p: float) -> torch.Tensor:
    # The clamp keeps the gradient finite at a = 0 for p < 1 (ReLU gives exact zeros); sign(0) = 0
    # keeps the value there exactly 0.
    return a.sign() * a.abs().clamp_min(1e-30).pow(p)


def nonlinear_map(logits: torch.Tensor, s: float, c: float, p: float, top_k: int = TOP_K,
                  activation: str = "gelu") -> torch.Tensor:
    """s * sign(a) * |a|^p, a = act(normalize_top_k(logits) + c); computed and returned in :func:`wide_dtype`."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    z = normalize_top_k(logits.to(wide_dtype(logits)), top_k)
    return s * _signed_power(ACTIVATIONS[activation](z + c), p)


def _map(logits: torch.Tensor, params: NonlinearParams) -> torch.Tensor:
    return nonlinear_map(logits, params.s, params.c, params.p, params.top_k, params.activation)


def nonlinear_mix_log_probs(std_logits: torch.Tensor, rob_logits: torch.Tensor, alpha: torch.Tensor | float,
                            params: NonlinearParams) -> torch.Tensor:
    """log((1 - alpha) * hardmax(g) + alpha * softmax(map(h))), (N, C), in ``std_logits``' dtype."""
    if std_logits.dim() != 2 or rob_logits.dim() != 2:
        raise InputError("base-model outputs must be (N, C) logits")
    check_class_counts(std_logits, rob_logits)
    wide = wide_dtype(rob_logits)
    # log of a one-hot, floored at LOG_ZERO instead of -inf: at alpha = 0 every other term is -inf too,
    # and a logsumexp of -infs has a NaN gradient. exp(LOG_ZERO) is 0 in float64 and float32 alike,
    # so no probability changes.
    log_p_std = torch.log(hardmax(std_logits.detach()).to(wide)).clamp_min(LOG_ZERO)
    log_p_rob = F.log_softmax(_map(rob_logits, params), dim=1)
    alpha = alpha.to(wide) if isinstance(alpha, torch.Tensor) else alpha
    return mix_log_probs(log_p_std, log_p_rob, alpha).to(std_logits.dtype)


@register_rule_with_params("nonlinear", NonlinearParams, label="MixedNUTS: hardmax g, transformed h")
def nonlinear_rule(params: NonlinearParams | None = None, **values: Any) -> MixingRule:
    """The MixedNUTS mixing rule with ``params`` (or ``NonlinearParams(**values)``); g's logit scale and
    hardmax flag play no part (g is always a hardmax; h's scale cancels in the normalisation)."""
    if params is None:
        params = NonlinearParams(**values)
    elif values:
        raise ConfigError("give either params or keyword values, not both")
    params.validate()

    def rule(inputs: MixInputs, alpha: torch.Tensor) -> torch.Tensor:
        return nonlinear_mix_log_probs(inputs.std_logits(), inputs.rob_logits(), alpha, params)

    rule.__name__ = "nonlinear"
    rule.params = params  # read back by nonlinear_params_of, the surrogate attack and the checkpoint writer
    return rule


def nonlinear_params_of(model: nn.Module) -> NonlinearParams | None:
    """The map parameters of a mixed model that uses one (fixed rule or adaptive), else None."""
    params = getattr(getattr(model, "rule_fn", None), "params", None)
    if params is None:
        params = getattr(model, "nonlinear", None)
    return params if isinstance(params, NonlinearParams) else None


class TransformedModel(nn.Module):
    """``model`` with the map applied to its logits (returned in the input's dtype).

    The map keeps each row's ranking, so the points that fool ``model`` fool this one too; analyses
    craft their attacks on ``attack_source`` (the untransformed model, whose gradients are useful).
    """

    def __init__(self, model: nn.Module, params: NonlinearParams):
        super().__init__()
        params.validate()
        self.model = model
        self.params = params

    @property
    def attack_source(self) -> nn.Module:
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _map(self.model(x), self.params).to(x.dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.as_dict().items())
