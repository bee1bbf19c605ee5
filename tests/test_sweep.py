"""The alpha sweep: its end points are the base models, transfer attacks are crafted once, results
are reproducible, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

import adasmooth.evaluate.sweep as sweep_mod
from adasmooth.core.config import ConfigError, from_mapping
from adasmooth.data.base import load_dataset
from adasmooth.mixing import MIXING_RULES, mix_logits
from adasmooth.mixing.fixed import MixedClassifier
from adasmooth.evaluate.sweep import SweepConfig, alpha_sweep, craft_adversarial, variant_classifier, variant_labels
from adasmooth.train.loop import TrainConfig, train_base

# the built-in mixing rules: Eq. 3.4 and the ablations of Figure 1
VARIANTS = ("prob", "logit", "grad_g", "grad_max_g", "grad_ratio")
EPS = 0.2
STEPS = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A standard and a PGD-trained small CNN on digits (a few seconds of CPU)."""
    out = tmp_path_factory.mktemp("sweep-models")
    common = dict(dataset="digits", model_kwargs={"width": 8}, eps=EPS, attack_steps=3, epochs=5, batch_size=64,
                  lr=0.05, eval_examples=20, eval_pgd_steps=2, progress=False, resume=False)
    from adasmooth.models.checkpoint import load_checkpoint

    train_base(TrainConfig(method="standard", output=str(out / "std"), **common))
    train_base(TrainConfig(method="pgd", output=str(out / "rob"), **common))
    g, _ = load_checkpoint(out / "std")
    h, _ = load_checkpoint(out / "rob")
    return g, h


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "test").subset(120)


def _row(result, variant, alpha):
    (row,) = [r for r in result.rows if r["variant"] == variant and r["alpha"] == alpha]
    return row


@pytest.fixture(scope="module")
def full_sweep(models, data):
    g, h = models
    return alpha_sweep(g, h, data, [0.0, 0.5, 1.0], EPS, steps=STEPS, variants=list(VARIANTS), batch_size=50,
                       seed=3, progress=False)


def test_end_points_are_the_base_models(full_sweep):
    ref = full_sweep.reference
    for variant in VARIANTS:
        at0, at1 = _row(full_sweep, variant, 0.0), _row(full_sweep, variant, 1.0)
        # alpha = 0 is g and alpha = 1 is h for every variant: same predictions on the same inputs
        assert at0["clean_acc"] == ref["g_clean_acc"], variant
        assert at0["std_attack_acc"] == ref["g_std_attack_acc"], variant
        assert at0["rob_attack_acc"] == ref["g_rob_attack_acc"], variant
        assert at1["clean_acc"] == ref["h_clean_acc"], variant
        assert at1["rob_attack_acc"] == ref["h_rob_attack_acc"], variant
        assert at1["std_attack_acc"] == ref["h_std_attack_acc"], variant


def test_mix_attack_at_the_end_points_replays_the_base_attack(full_sweep):
    ref = full_sweep.reference
    # Mixing logits at alpha 0 / 1 is g / h to the last bit (1*g + 0*h), gradients included, and every
    # attack on batch b uses seed + b: the MIX attack is then the STD / ROB attack exactly.
    assert _row(full_sweep, "logit", 0.0)["mix_attack_acc"] == ref["g_std_attack_acc"]
    assert _row(full_sweep, "logit", 1.0)["mix_attack_acc"] == ref["h_rob_attack_acc"]
    # Mixing probabilities passes g through a second log-softmax, which changes gradients by rounding
    # only; sign steps may flip on near-zero components, so allow a few examples of 120.
    assert abs(_row(full_sweep, "prob", 0.0)["mix_attack_acc"] - ref["g_std_attack_acc"]) <= 2.5
    assert abs(_row(full_sweep, "prob", 1.0)["mix_attack_acc"] - ref["h_rob_attack_acc"]) <= 2.5


def test_prob_mix_attack_at_alpha_zero_finds_nearly_the_same_examples(models, data):
    g, h = models
    device = torch.device("cpu")
    x_g = craft_adversarial(g, data, EPS, "linf", STEPS, None, 50, 7, device)
    x_mix = craft_adversarial(MixedClassifier(g, h, 0.0).eval(), data, EPS, "linf", STEPS, None, 50, 7, device)
    with torch.no_grad():
        agree = (g(x_g).argmax(1) == g(x_mix).argmax(1)).float().mean().item()
    assert agree >= 0.95
    assert (x_g - data.x).abs().max() <= EPS + 1e-6 and (x_mix - data.x).abs().max() <= EPS + 1e-6


def test_rows_cover_every_alpha_and_variant_with_consistent_numbers(full_sweep):
    assert [(r["alpha"], r["variant"]) for r in full_sweep.rows] == [
        (a, v) for a in (0.0, 0.5, 1.0) for v in VARIANTS
    ]
    step = 100.0 / full_sweep.n_examples
    for r in full_sweep.rows:
        for key in ("clean_acc", "std_attack_acc", "rob_attack_acc", "mix_attack_acc", "worst_attack_acc"):
            assert 0.0 <= r[key] <= 100.0
            assert abs(r[key] / step - round(r[key] / step)) < 1e-3  # a whole number of examples
        # surviving all three attacks is at most surviving any one of them
        assert r["worst_attack_acc"] <= min(r["std_attack_acc"], r["rob_attack_acc"], r["mix_attack_acc"]) + 1e-9
    # the robust model resists its own attack better than the standard model resists its own
    ref = full_sweep.reference
    assert ref["h_rob_attack_acc"] > ref["g_std_attack_acc"]


def test_transfer_attacks_are_crafted_once(models, data, monkeypatch):
    g, h = models
    sources = []
    real = sweep_mod.craft_adversarial

    def counting(model, *args, **kwargs):
        sources.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sweep_mod, "craft_adversarial", counting)
    alphas, variants = [0.0, 0.3, 0.6, 1.0], ["prob", "logit"]
    alpha_sweep(g, h, data.subset(40), alphas, EPS, steps=2, variants=variants, progress=False)
    assert sum(s is g for s in sources) == 1
    assert sum(s is h for s in sources) == 1
    mixed = [s for s in sources if isinstance(s, MixedClassifier)]
    assert len(mixed) == len(alphas) * len(variants)
    assert len(sources) == 2 + len(mixed)


def test_sweep_is_deterministic_and_reports_after_each_alpha(models, data):
    g, h = models
    seen = []
    kwargs = dict(steps=3, variants=["prob"], batch_size=32, seed=11, progress=False)
    first = alpha_sweep(g, h, data.subset(64), [0.2, 0.7], EPS, on_alpha=lambda r: seen.append(len(r.rows)), **kwargs)
    second = alpha_sweep(g, h, data.subset(64), [0.2, 0.7], EPS, **kwargs)
    assert first.rows == second.rows and first.reference == second.reference
    assert seen == [1, 2]


def test_variant_classifier_matches_the_named_ablation(models, data):
    g, h = models
    x = data.x[:16]
    assert set(VARIANTS) <= set(MIXING_RULES.names())  # the sweep's variants are the registry's
    labels = variant_labels()
    assert labels["prob"] == "R=1, probabilities (Eq. 3.4)" and set(VARIANTS) <= set(labels)
    for name in VARIANTS:
        m = variant_classifier(g, h, 0.4, name)
        assert m.rule == name and m.rule_fn is MIXING_RULES.get(name) and m.alpha == pytest.approx(0.4)
    with torch.no_grad():
        # "logit" is the plain convex combination of logits
        expected = 0.6 * g(x) + 0.4 * h(x)
        torch.testing.assert_close(variant_classifier(g, h, 0.4, "logit")(x), expected)
        # "prob" is Eq. 3.4
        torch.testing.assert_close(variant_classifier(g, h, 0.4, "prob")(x), mix_logits(g(x), h(x), 0.4))


def test_bad_input_is_refused(models, data):
    g, h = models
    with pytest.raises(ValueError, match="alpha"):
        alpha_sweep(g, h, data, [0.0, 1.5], EPS, progress=False)
    with pytest.raises(ValueError, match="variant"):
        alpha_sweep(g, h, data, [0.5], EPS, variants=["softmax"], progress=False)
    with pytest.raises(ValueError, match="eps"):
        alpha_sweep(g, h, data, [0.5], -0.1, progress=False)
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(SweepConfig, {"alpha": [0.5]})
    with pytest.raises(ConfigError, match="alpha"):
        from_mapping(SweepConfig, {"alphas": [-0.1, 0.5]})
    with pytest.raises(ConfigError, match="data set"):
        from_mapping(SweepConfig, {"dataset": "no-such-set"})


def test_plots_write_valid_pngs(full_sweep, tmp_path):
    from adasmooth.evaluate.plots import plot_accuracy_vs_alpha, plot_tradeoff

    a = plot_accuracy_vs_alpha(full_sweep.rows, full_sweep.reference, tmp_path / "a.png")
    b = plot_tradeoff(full_sweep.rows, tmp_path / "b.png", full_sweep.reference)
    for p in (a, b):
        assert p.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="variant"):
        plot_accuracy_vs_alpha(full_sweep.rows, full_sweep.reference, tmp_path / "c.png", variant="nope")
