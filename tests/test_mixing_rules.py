"""The mixing-rule registry: a newly registered rule is usable by MixedClassifier and the sweep."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adasmooth.core.errors import ConfigError
from adasmooth.data.base import load_dataset
from adasmooth.evaluate.sweep import SweepConfig, alpha_sweep, check_variants, variant_labels
from adasmooth.mixing import MIXING_RULES, MixedClassifier, MixInputs


def geometric_pooling(inputs: MixInputs, alpha: torch.Tensor) -> torch.Tensor:
    """A toy rule: log-linear pooling, (1 - alpha) log p_g + alpha log p_h (unnormalised)."""
    a = alpha[:, None]
    return (1 - a) * F.log_softmax(inputs.std_logits(), 1) + a * F.log_softmax(inputs.rob_logits(), 1)


@pytest.fixture
def toy_rule():
    MIXING_RULES.register("test-log-linear-pool", label="log-linear pooling")(geometric_pooling)
    yield "test-log-linear-pool"
    MIXING_RULES.remove("test-log-linear-pool")


def test_builtin_rules_are_registered():
    assert {"prob", "logit", "grad_g", "grad_max_g", "grad_ratio", "nonlinear"} <= set(MIXING_RULES.names())
    with pytest.raises(ConfigError, match="unknown mixing rule 'no-such-rule-xyz'; known: prob, logit"):
        MIXING_RULES.get("no-such-rule-xyz")


def test_registered_rule_runs_in_the_classifier(toy_rule, bases):
    g, h = bases
    x = torch.rand(3, 1, 8, 8)
    mc = MixedClassifier(g, h, 0.25, rule=toy_rule)
    assert mc.rule == "test-log-linear-pool" and mc.rule_fn is geometric_pooling
    with torch.no_grad():
        expected = 0.75 * F.log_softmax(g(x), 1) + 0.25 * F.log_softmax(h(x), 1)
        torch.testing.assert_close(mc(x), expected)
        out = mc.mix(x)
    torch.testing.assert_close(out.alpha_logit, torch.full((3,), math.log(1 / 3)))
    # an unregistered function works too
    assert torch.equal(MixedClassifier(g, h, 0.25, rule=geometric_pooling)(x), mc(x))


def test_registered_rule_is_a_sweep_variant(toy_rule, bases):
    g, h = bases
    assert check_variants(["prob", toy_rule]) == ["prob", toy_rule]
    assert variant_labels()[toy_rule] == "log-linear pooling"
    SweepConfig(variants=[toy_rule]).validate()
    data = load_dataset("digits", "test").subset(24)
    result = alpha_sweep(g, h, data, [0.0, 1.0], 0.1, steps=2, variants=[toy_rule, "prob"], batch_size=12,
                         progress=False)
    assert [(r["alpha"], r["variant"]) for r in result.rows] == [
        (0.0, "test-log-linear-pool"), (0.0, "prob"), (1.0, "test-log-linear-pool"), (1.0, "prob")]
    ref = result.reference
    by = {(r["alpha"], r["variant"]): r for r in result.rows}
    # log-linear pooling is g at alpha 0 and h at alpha 1, like every rule
    assert by[0.0, "test-log-linear-pool"]["clean_acc"] == ref["g_clean_acc"]
    assert by[1.0, "test-log-linear-pool"]["clean_acc"] == ref["h_clean_acc"]
    assert by[1.0, "test-log-linear-pool"]["rob_attack_acc"] == ref["h_rob_attack_acc"]


def test_unregistered_rule_is_gone_after_removal():
    assert "test-log-linear-pool" not in MIXING_RULES
    with pytest.raises(ConfigError, match="test-log-linear-pool"):
        check_variants(["test-log-linear-pool"])
