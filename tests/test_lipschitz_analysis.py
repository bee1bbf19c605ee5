"""Theorem 3.5 against attacks on a model with a known Lipschitz constant; local Lipschitz estimates;
the confidence-gap statistics.

The robust model is h(x) = W x + b with softmax probabilities p. A valid Lipschitz constant of each
p_i, in the l_p norm with dual norm q, follows from the gradient
    grad p_i = p_i * (W_i - sum_j p_j W_j) = p_i * sum_{j != i} p_j (W_i - W_j),
so ||grad p_i||_q <= p_i (1 - p_i) max_j ||W_i - W_j||_q <= max_j ||W_i - W_j||_q / 4, and by the mean
value theorem |p_i(x') - p_i(x)| <= (max_j ||W_i - W_j||_q / 4) ||x' - x||_p.
"""

import math

import pytest
import torch
from torch import nn

from adasmooth.evaluate.analysis import (
    attack_for_gap,
    autoattack_mode,
    confidence_gap,
    confidence_gap_table,
    gap_statistics,
    lipschitz_analysis,
)
from adasmooth.attacks import APGD, PGD, APGDTargeted
from adasmooth.certify import lipschitz_radius
from adasmooth.certify.lipschitz import estimate_local_lipschitz, estimated_radius
from adasmooth.mixing.fixed import MixedClassifier


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def softmax_lipschitz(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-class l_p Lipschitz bound of softmax(W x + b) (derivation in the module docstring)."""
    q = 1 if norm == "linf" else 2
    diffs = (weight[:, None, :] - weight[None, :, :]).norm(p=q, dim=2)
    return diffs.max(1).values / 4


def _setup(seed=0, n=32, classes=4):
    gen = torch.Generator().manual_seed(seed)
    weight = 2 * torch.randn(classes, 20, generator=gen)
    bias = torch.randn(classes, generator=gen)
    x = torch.rand(n, 1, 4, 5, generator=gen)
    return Linear(weight, bias), weight, x, gen


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_no_attack_below_the_certified_radius_changes_the_mixture(norm):
    h, weight, x, gen = _setup()
    # g is adversarial: it confidently votes for h's LEAST likely class, everywhere
    g = Linear(-50 * weight, -50 * h.bias)
    lip = softmax_lipschitz(weight, norm)
    with torch.no_grad():
        probs = torch.softmax(h(x), 1)
    flips_outside = 0
    for alpha in (0.55, 0.75, 1.0):
        radius = lipschitz_radius(probs, lip, alpha)
        certified = radius > 0
        assert certified.sum() >= 8
        mixture = MixedClassifier(g, h, alpha)
        with torch.no_grad():
            before = mixture(x).argmax(1)
        # the certified class is h's top class
        assert (before[certified] == probs.argmax(1)[certified]).all()
        for scale, must_hold in ((0.999, True), (10.0, False)):
            eps = (radius * scale).clamp_min(0)
            flipped = torch.zeros_like(certified)
            for loss in ("margin", "ce"):
                x_adv = PGD(mixture, eps, norm, steps=40, restarts=2, loss=loss, seed=1)(x, before)
                delta = (x_adv - x).flatten(1)
                size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
                assert (size <= eps + 1e-5).all()
                with torch.no_grad():
                    flipped |= mixture(x_adv).argmax(1) != before
            if must_hold:
                assert not flipped[certified].any(), f"attack inside the certified radius succeeded (alpha={alpha})"
            else:
                flips_outside += int(flipped[certified].sum())
    # the same attack does break the mixture beyond the radius: the check above has teeth
    assert flips_outside > 20


def test_local_lipschitz_two_class_closed_form():
    """h = (w.x, 0): p_1 = sigmoid(w.x). In l_2, away from the box edges, the largest drop of p_1
    within eps is sigmoid(s) - sigmoid(s - ||w|| eps) and the largest rise of p_0 is the same."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, generator=gen, dtype=torch.float64) * 0.5
    x = torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64)
    x += 0.05 * torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    weight = torch.stack([w, torch.zeros_like(w)])
    bias = torch.tensor([0.8, 0.0], dtype=torch.float64)
    h = Linear(weight, bias)
    eps = 0.3
    # large steps: with small l_2 steps PGD only slowly turns towards -w along the sphere
    est = estimate_local_lipschitz(h, x, eps, "l2", steps=30, step_size=eps / 3, seed=0)
    s = x.flatten(1) @ w + 0.8
    assert (s > 0).all()  # class 0 is predicted (logit s vs 0)
    drop = torch.sigmoid(s) - torch.sigmoid(s - w.norm() * eps)
    assert torch.allclose(est.lipschitz[:, 0], drop / eps, rtol=1e-3)
    assert torch.allclose(est.lipschitz[:, 1], drop / eps, rtol=1e-3)
    assert torch.allclose(est.mean_lipschitz, drop / eps, rtol=1e-3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_local_lipschitz_below_global_bound_and_above_random(norm):
    h, weight, x, gen = _setup(seed=2, n=16)
    eps = 0.05 if norm == "linf" else 0.3
    est = estimate_local_lipschitz(h, x, eps, norm, steps=20, restarts=2, seed=0)
    bound = softmax_lipschitz(weight, norm)
    assert (est.lipschitz <= bound[None, :] + 1e-5).all()
    assert (est.lipschitz >= 0).all()
    # PGD must do at least as well as random points of the ball
    with torch.no_grad():
        p0 = torch.softmax(h(x), 1)
        best = torch.zeros_like(p0)
        sign = torch.ones_like(p0)
        sign.scatter_(1, p0.argmax(1, keepdim=True), -1.0)
        for _ in range(50):
            d = torch.rand(x.shape, generator=gen) * 2 - 1
            if norm == "l2":
                d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
            else:
                d = d.sign() * eps
            p = torch.softmax(h((x + d).clamp(0, 1)), 1)
            best = torch.maximum(best, sign * (p - p0))
    assert (est.lipschitz * eps >= best - 1e-4).all()
    # the estimated radius uses these constants in Theorem 3.5
    r = estimated_radius(est, 0.8)
    assert torch.allclose(r, lipschitz_radius(est.probs, est.lipschitz, 0.8))


def test_local_lipschitz_bad_input():
    h, _, x, _ = _setup(n=2)
    with pytest.raises(ValueError):
        estimate_local_lipschitz(h, x, 0.0)
    with pytest.raises(ValueError):
        estimate_local_lipschitz(h, x, 0.1, norm="l1")


def test_gap_statistics_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])
    logits = probs.log()
    labels = torch.tensor([0, 1, 2, 2])
    assert torch.allclose(confidence_gap(logits), torch.tensor([0.5, 0.1, 0.3, 0.4]), atol=1e-6)
    stats = gap_statistics(logits, labels)
    assert stats["accuracy"] == 75.0 and stats["n_correct"] == 3
    assert math.isclose(stats["gap_correct_mean"], (0.5 + 0.3 + 0.4) / 3, rel_tol=1e-5)
    assert math.isclose(stats["gap_correct_median"], 0.4, rel_tol=1e-5)
    assert math.isclose(stats["gap_incorrect_mean"], 0.1, rel_tol=1e-5)
    all_right = gap_statistics(logits[:1], labels[:1])
    assert all_right["gap_incorrect_mean"] is None


def test_gap_table_attacks_lower_accuracy_and_robust_model_keeps_margin():
    """Scaling a linear model keeps its decisions but changes its confidence: a flat copy makes only
    small gaps, a steep copy makes confident mistakes under attack; attacks never raise accuracy."""
    h, weight, x, _ = _setup(seed=5, n=24)
    with torch.no_grad():
        y = h(x).argmax(1)
    flat, steep = Linear(0.02 * weight, 0.02 * h.bias), Linear(40 * weight, 40 * h.bias)
    result = confidence_gap_table({"flat": flat, "steep": steep}, x, y, eps=0.1,
                                  norm="linf", batch_size=12, aa_steps=20, progress=False)
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    for name in ("flat", "steep"):
        assert rows[(name, "clean")]["accuracy"] == 100.0
        assert rows[(name, "pgd20")]["accuracy"] < 100.0
        assert rows[(name, "autoattack")]["accuracy"] <= rows[(name, "clean")]["accuracy"]
    assert rows[("flat", "clean")]["gap_correct_mean"] < 0.2
    assert rows[("steep", "clean")]["gap_correct_mean"] > 0.5
    assert rows[("steep", "pgd20")]["gap_incorrect_mean"] > 0.5
    assert len(result["raw"]["flat"]["clean"]["gap"]) == 24


def test_autoattack_setting_returns_minimum_margin_points():
    assert "minimum-margin" in autoattack_mode()
    h, weight, x, _ = _setup(seed=7, n=16)
    with torch.no_grad():
        y = h(x).argmax(1)
    x_aa = attack_for_gap(h, x, y, "autoattack", eps=0.02, norm="linf", aa_steps=20)
    assert ((x_aa - x).abs().max() <= 0.02 + 1e-6)
    with torch.no_grad():
        p_clean, p_aa = torch.softmax(h(x), 1), torch.softmax(h(x_aa), 1)
    margin = lambda p: p.gather(1, y[:, None]).squeeze(1) - p.scatter(1, y[:, None], -1.0).max(1).values
    assert (margin(p_aa) <= margin(p_clean) + 1e-6).all()
    assert (margin(p_aa) < margin(p_clean) - 1e-3).float().mean() > 0.9
    # the point of the smaller margin of the two APGD components is kept, per input
    _, m_ce = APGD(h, 0.02, "linf", steps=20, seed=0, minimum_margin=True).attack_with_margins(x, y)
    _, m_t = APGDTargeted(h, 0.02, "linf", steps=20, seed=0, minimum_margin=True,
                          n_target_classes=3).attack_with_margins(x, y)
    assert torch.allclose(margin(p_aa), torch.minimum(m_ce, m_t), atol=1e-6)
    assert (m_t < m_ce - 1e-6).any() and (m_ce < m_t - 1e-6).any()  # each component wins somewhere


def test_lipschitz_analysis_summary():
    h, weight, x, _ = _setup(seed=6, n=10)
    with torch.no_grad():
        y = h(x).argmax(1)
    res = lipschitz_analysis(h, x, y, eps=0.01, norm="linf", alphas=(0.4, 0.9, 1.0), steps=10, batch_size=5,
                             progress=False)
    assert res["clean_accuracy"] == 100.0
    fracs = {r["alpha"]: r["robust_at_eps_pct"] for r in res["per_alpha"]}
    assert fracs[0.4] == 0.0 and fracs[1.0] >= fracs[0.9]
    assert res["mean_lipschitz_eq_c1"] <= float(softmax_lipschitz(weight, "linf").max())
