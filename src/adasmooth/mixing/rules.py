"""Mixing rules: how the logits of a standard model g and a robust model h become one classifier.

The pure maths lives here, each formula once:

- :func:`mix_log_probs`: Eq. 3.4 in log space, log((1 - w) p_g + w p_h), as a logsumexp of
  log-probabilities plus log-weights, so it is exact at w = 0 and 1 and never takes the log of an
  underflowed probability. The weight w is alpha (a scalar or one per sample) or per class.
- :func:`mix_logits`: Eq. 3.4 from base-model logits, with logit scales and an optional hardmax g.
- :func:`mix_in_logit_space`: the "No SoftMax" ablation, (1 - w) g + w h.
- :func:`trust_weight`: the weight on h of Eq. 3.3, alpha R_i / ((1 - alpha) + alpha R_i), and the
  R_i(x) options (:data:`TRUST_FUNCTIONS`), built on :func:`dual_norm` of input gradients.

:data:`MIXING_RULES` holds the named rules the fixed-alpha classifier and the sweep use. A rule is a
function ``rule(inputs: MixInputs, alpha: Tensor (N,)) -> logits (N, C)``; adding one is one
decorated function::

    @MIXING_RULES.register("geometric", label="log-linear pooling")
    def geometric(inputs, alpha):
        a = alpha[:, None]
        return (1 - a) * F.log_softmax(inputs.std_logits(), 1) + a * F.log_softmax(inputs.rob_logits(), 1)

A rule with parameters declares them as a dataclass of :func:`~adasmooth.core.config.option` fields
(name, type, default, help) and registers the function that builds the rule from them; every command
that builds a mixture then takes ``--<rule>-<parameter>`` (generated from the declaration) and hands the
values to :func:`build_rule`::

    @dataclass
    class TemperedParams:
        t: float = option(2.0, help="temperature of h's softmax")

    @register_rule_with_params("tempered", TemperedParams, label="h at temperature t")
    def tempered(params):
        def rule(inputs, alpha):
            return mix_log_probs(F.log_softmax(inputs.std_logits(), 1),
                                 F.log_softmax(inputs.rob_logits() / params.t, 1), alpha)
        return rule
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import from_mapping, validated
from ..core.errors import ConfigError, InputError
from ..core.registry import Registry

__all__ = [
    "MixInputs",
    "MixingRule",
    "MIXING_RULES",
    "TRUST_FUNCTIONS",
    "check_class_counts",
    "mix_log_probs",
    "mix_logits",
    "mix_in_logit_space",
    "hardmax",
    "dual_norm",
    "trust_weight",
    "per_class_grad_norms",
    "trust_weighted_rule",
    "register_rule_with_params",
    "rule_params_class",
    "build_rule",
    "check_rule_params",
]


# ---------------------------------------------------------------------------- the maths


def check_class_counts(std_out: torch.Tensor, rob_out: torch.Tensor) -> None:
    if std_out.shape[-1] != rob_out.shape[-1]:
        raise InputError(f"base models disagree on the class count: {std_out.shape[-1]} vs {rob_out.shape[-1]}")


def _weight_tensor(weight: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """The mixing weight as (N, 1) or (N, C) on ``like``'s device and dtype, checked to lie in [0, 1]."""
    # A Python float goes through float64: torch.as_tensor would round it to float32 first, and
    # 1 - alpha would then lose up to 1e-4 relative precision near alpha = 1 even in float64 runs.
    w = weight if isinstance(weight, torch.Tensor) else torch.tensor(weight, dtype=torch.float64)
    n, c = like.shape
    if w.dim() == 1 and w.shape[0] != n or w.dim() == 2 and tuple(w.shape) != (n, c) or w.dim() > 2:
        raise InputError(f"alpha must be a scalar, shape ({n},) or ({n}, {c}), got {tuple(w.shape)}")
    # Outside [0, 1] the log-weights are NaN and the output silently NaN. Weights on an accelerator
    # come from the classifiers, which check alpha where it is set (MixedClassifier) or make it in
    # [0, 1] (a sigmoid); checking them here would synchronise with the device on every forward.
    # torch.export cannot keep a check on values (it traces without them).
    if w.device.type == "cpu" and not torch.compiler.is_exporting() and bool(((w < 0) | (w > 1) | torch.isnan(w)).any()):
        raise InputError(f"alpha must lie in [0, 1], got {w.detach().flatten()[:8].tolist()}")
    w = w.to(device=like.device, dtype=like.dtype)
    if w.dim() == 0:
        return w.expand(n, 1)
    return w.reshape(n, 1) if w.dim() == 1 else w


def mix_log_probs(log_p_std: torch.Tensor, log_p_rob: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """log((1 - alpha) * p_std + alpha * p_rob) from (N, C) log-probabilities; alpha scalar, (N,) or (N, C)."""
    if log_p_std.shape != log_p_rob.shape:
        raise InputError(f"base outputs differ in shape: {tuple(log_p_std.shape)} vs {tuple(log_p_rob.shape)}")
    w = _weight_tensor(alpha, log_p_std)
    stacked = torch.stack([torch.log1p(-w) + log_p_std, torch.log(w) + log_p_rob], dim=0)
    return torch.logsumexp(stacked, dim=0)


def hardmax(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the top class, in ``logits``' dtype (Appendix A.2's hardmax g)."""
    return F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)


def mix_logits(
    std_logits: torch.Tensor,
    rob_logits: torch.Tensor,
    alpha: torch.Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
    std_hardmax: bool = False,
) -> torch.Tensor:
    """Eq. 3.4 on base-model logits, with logit scales and an optional hardmax (one-hot) g."""
    if std_logits.dim() != 2 or rob_logits.dim() != 2:
        raise InputError("base-model outputs must be (N, C) logits")
    check_class_counts(std_logits, rob_logits)
    # log of a one-hot: 0 for the top class, -inf elsewhere, which the logsumexp handles exactly
    log_p_std = torch.log(hardmax(std_logits)) if std_hardmax else F.log_softmax(std_scale * std_logits, dim=1)
    log_p_rob = F.log_softmax(rob_scale * rob_logits, dim=1)
    return mix_log_probs(log_p_std, log_p_rob, alpha)


def mix_in_logit_space(std_logits: torch.Tensor, rob_logits: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - alpha) * g + alpha * h on (N, C) logits (the paper's "No SoftMax" ablation, Eqs. 3.1-3.3)."""
    check_class_counts(std_logits, rob_logits)
    w = _weight_tensor(alpha, std_logits)
    return (1 - w) * std_logits + w * rob_logits


def dual_norm(grad: torch.Tensor, norm: Literal["linf", "l2"]) -> torch.Tensor:
    """||grad||_* per sample: l1 for an l_inf threat model, l2 for l2."""
    flat = grad.flatten(1)
    if norm == "linf":
        return flat.abs().sum(1)
    if norm == "l2":
        return flat.norm(dim=1)
    raise ConfigError(f"unknown norm {norm!r}; use 'linf' or 'l2'")


def trust_weight(alpha: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Eq. 3.3's weight on h per class, alpha R_i / ((1 - alpha) + alpha R_i), in [0, 1]."""
    return (alpha * r) / ((1 - alpha) + alpha * r).clamp_min(1e-12)


# ---------------------------------------------------------------------------- what a rule sees


@dataclass(frozen=True)
class MixInputs:
    """The input batch, the two base models and the classifier's settings, as a rule receives them."""

    x: torch.Tensor
    std_model: nn.Module
    rob_model: nn.Module
    std_scale: float = 1.0
    rob_scale: float = 1.0
    std_hardmax: bool = False
    norm: Literal["linf", "l2"] = "linf"
    differentiate_r: bool = False  # let the attacker differentiate R_i(x) (second order, slower)

    def std_logits(self) -> torch.Tensor:
        return self.std_model(self.x)

    def rob_logits(self) -> torch.Tensor:
        return self.rob_model(self.x)

    def std_for_logit_space(self, g: torch.Tensor) -> torch.Tensor:
        """g as it enters a logit-space mixture: scaled, or its hardmax."""
        return hardmax(g) if self.std_hardmax else self.std_scale * g


MixingRule = Callable[[MixInputs, torch.Tensor], torch.Tensor]

MIXING_RULES: Registry[MixingRule] = Registry("mixing rule")


# ---------------------------------------------------------------------------- rules with parameters


def register_rule_with_params(name: str, params: type, **info: Any) -> Callable:
    """Decorator: register ``build(params) -> MixingRule`` as rule ``name`` whose parameters are the
    dataclass ``params`` (every field an ``option(...)`` with a default and a help text). The registry
    holds the rule built with the defaults; :func:`build_rule` builds it with other values."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"mixing rule {name!r}: params must be a dataclass, got {params!r}")
    for f in dataclasses.fields(params):
        if not f.metadata.get("help"):
            raise TypeError(f"mixing rule {name!r}: parameter {f.name!r} has no help text; declare it with option()")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise TypeError(f"mixing rule {name!r}: parameter {f.name!r} has no default")

    def wrap(build: Callable[[Any], MixingRule]) -> Callable[[Any], MixingRule]:
        MIXING_RULES.add(name, build(params()), params=params, build=build, **info)
        return build

    return wrap


def rule_params_class(name: str) -> type | None:
    """The dataclass of parameters rule ``name`` declares, None when it has none."""
    return MIXING_RULES.info(name).get("params")


def build_rule(name: str, params: Any = None) -> MixingRule:
    """Rule ``name`` with ``params``: its parameter dataclass, or a mapping of some of its fields (the
    rest keep their defaults); None: the registered rule. Parameters for a rule without any are refused."""
    rule = MIXING_RULES.get(name)
    cls = rule_params_class(name)
    if params is None or (isinstance(params, Mapping) and not params and cls is None):
        return rule
    if cls is None:
        raise ConfigError(f"mixing rule {name!r} takes no parameters, got {dict(params)}")
    if isinstance(params, Mapping):
        params = from_mapping(cls, dict(params), f"parameters of mixing rule {name!r}")
    if not isinstance(params, cls):
        raise ConfigError(f"parameters of mixing rule {name!r} must be a {cls.__name__}, got {type(params).__name__}")
    return MIXING_RULES.info(name)["build"](validated(params, f"parameters of mixing rule {name!r}"))


def check_rule_params(rule_params: Mapping[str, Any], used: list[str]) -> None:
    """Refuse parameters of a rule the run does not use (they would be silently ignored), and check the
    values of the others by building their rules."""
    for name, values in rule_params.items():
        if name not in used:
            flag = "--" + name + "-*"
            raise ConfigError(f"{flag} given, but mixing rule {name!r} is not a rule of this run "
                              f"({', '.join(used) or 'it mixes with no named rule'}): it would be ignored")
        build_rule(name, values)


# ---------------------------------------------------------------------------- R_i(x) of Eq. 3.3


def per_class_grad_norms(model: nn.Module, x: torch.Tensor, norm: str,
                         create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, C) of ``model`` and the dual norms of d out_i / dx, one backward pass per class."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    out = model(x)
    norms = []
    for i in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        norms.append(dual_norm(g, norm))
    return out, torch.stack(norms, dim=1)


def _r_grad_g(inputs: MixInputs, create: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return per_class_grad_norms(inputs.std_model, inputs.x, inputs.norm, create)


def _r_grad_max_g(inputs: MixInputs, create: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs.x if inputs.x.requires_grad else inputs.x.detach().requires_grad_(True)
    g = inputs.std_model(x)
    (grad,) = torch.autograd.grad(g.max(1).values.sum(), x, retain_graph=True, create_graph=create)
    return g, dual_norm(grad, inputs.norm).unsqueeze(1).expand_as(g)


def _r_grad_ratio(inputs: MixInputs, create: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g, r_g = per_class_grad_norms(inputs.std_model, inputs.x, inputs.norm, create)
    _, r_h = per_class_grad_norms(inputs.rob_model, inputs.x, inputs.norm, create)
    check_class_counts(r_g, r_h)
    return g, r_g / r_h.clamp_min(1e-12)


# name -> (g logits, R (N, C)) for the R_i(x) options of Eq. 3.3; R = 1 needs no function
TRUST_FUNCTIONS: dict[str, Callable[[MixInputs, bool], tuple[torch.Tensor, torch.Tensor]]] = {
    "grad_g": _r_grad_g,
    "grad_max_g": _r_grad_max_g,
    "grad_ratio": _r_grad_ratio,
}


def trust_weighted_rule(trust: str, space: Literal["logit", "probability"]) -> MixingRule:
    """Eq. 3.3's mixture with weights R_i(x) = ``trust`` ("one" or a :data:`TRUST_FUNCTIONS` name), in
    logit or probability space. R_i is a constant to the attacker unless ``differentiate_r``."""
    if trust != "one" and trust not in TRUST_FUNCTIONS:
        raise ConfigError(f"unknown R_i option {trust!r}; known: one, {', '.join(TRUST_FUNCTIONS)}")
    if space not in ("logit", "probability"):
        raise ConfigError(f"space must be 'logit' or 'probability', got {space!r}")

    def rule(inputs: MixInputs, alpha: torch.Tensor) -> torch.Tensor:
        if trust == "one":
            g, h = inputs.std_logits(), inputs.rob_logits()
            check_class_counts(g, h)
            weight = alpha
        else:
            create = inputs.differentiate_r and torch.is_grad_enabled()
            with torch.enable_grad():  # R_i needs input gradients even when evaluating without autograd
                g, r = TRUST_FUNCTIONS[trust](inputs, create)
            if not create:
                r = r.detach()
            h = inputs.rob_logits()
            if not torch.is_grad_enabled():
                g = g.detach()
            check_class_counts(g, h)
            weight = trust_weight(alpha.to(r.dtype)[:, None], r)
        if space == "probability":
            return mix_logits(g, h, weight, inputs.std_scale, inputs.rob_scale, inputs.std_hardmax)
        return mix_in_logit_space(inputs.std_for_logit_space(g), inputs.rob_scale * h, weight)

    rule.__name__ = f"{trust}_{space}"
    return rule


# ---------------------------------------------------------------------------- the named rules

# "prob" is the paper's Eq. 3.4; the rest are the ablations of Figure 1 (Eqs. 3.1-3.3 with R_i(x)
# options, mixing logits: "No SoftMax"). The labels are the sweep plot's legend.
MIXING_RULES.add("prob", trust_weighted_rule("one", "probability"), label="R=1, probabilities (Eq. 3.4)")
MIXING_RULES.add("logit", trust_weighted_rule("one", "logit"), label="R=1, logits")
MIXING_RULES.add("grad_g", trust_weighted_rule("grad_g", "logit"), label="R=||grad g_i||*, logits")
MIXING_RULES.add("grad_max_g", trust_weighted_rule("grad_max_g", "logit"), label="R=||grad max_j g_j||*, logits")
MIXING_RULES.add("grad_ratio", trust_weighted_rule("grad_ratio", "logit"),
                 label="R=||grad g_i||* / ||grad h_i||*, logits")
