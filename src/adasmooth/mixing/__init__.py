"""Mixing: Eq. 3.4 and its variants (rules), the fixed-alpha and the adaptive mixed classifiers.

A new mixing rule is one function registered in :data:`MIXING_RULES` (see :mod:`.rules`); put it in
a new module here and import that module below so that the registration runs.
"""

from .protocol import MixedModel, MixOutput
from .rules import (
    MIXING_RULES,
    MixInputs,
    MixingRule,
    dual_norm,
    hardmax,
    mix_in_logit_space,
    mix_log_probs,
    mix_logits,
    trust_weight,
    trust_weighted_rule,
)
from .fixed import MixedClassifier
from .nonlinear import NonlinearParams, TransformedModel, nonlinear_map, nonlinear_mix_log_probs, nonlinear_rule

__all__ = [
    "MixOutput",
    "MixedModel",
    "MIXING_RULES",
    "MixInputs",
    "MixingRule",
    "mix_log_probs",
    "mix_logits",
    "mix_in_logit_space",
    "hardmax",
    "dual_norm",
    "trust_weight",
    "trust_weighted_rule",
    "MixedClassifier",
    "NonlinearParams",
    "TransformedModel",
    "nonlinear_map",
    "nonlinear_mix_log_probs",
    "nonlinear_rule",
]
