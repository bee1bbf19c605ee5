"""Mixing: Eq. 3.4 and its variants (rules), the fixed-alpha and the adaptive mixed classifiers.

A new mixing rule is one function registered in :data:`MIXING_RULES` (see :mod:`.rules`; a rule with
parameters declares them there too, and the commands' ``--<rule>-<parameter>`` options follow); put it
in a new module here and import that module below so that the registration runs.
"""

from .protocol import MixedModel, MixOutput
from .rules import (
    MIXING_RULES,
    MixInputs,
    MixingRule,
    build_rule,
    check_rule_params,
    dual_norm,
    hardmax,
    mix_in_logit_space,
    mix_log_probs,
    mix_logits,
    trust_weight,
    register_rule_with_params,
    rule_params_class,
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
    "register_rule_with_params",
    "rule_params_class",
    "build_rule",
    "check_rule_params",
    "MixedClassifier",
    "NonlinearParams",
    "TransformedModel",
    "nonlinear_map",
    "nonlinear_mix_log_probs",
    "nonlinear_rule",
]
