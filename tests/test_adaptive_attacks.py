"""Adaptive attacks on mixed classifiers: the alpha term, gray-box gradients, settings A-D, reports."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasmooth.attacks import (
    APGD,
    APGDTargeted,
    DetachedAlpha,
    LogitsOnly,
    adaptive_alpha_loss,
    alpha_bce_loss,
    differentiable_surrogate,
    list_attacks,
    make_attack,
)
from adasmooth.data.base import load_dataset
from adasmooth.evaluate.robustness import evaluate_robustness, report_rows
from adasmooth.mixing import MixedClassifier, MixOutput, mix_logits

from digits_models import train_digits_model

EPS = 0.1


class ToyAdaptiveMixture(nn.Module):
    """A mixed classifier whose alpha(x) comes from a tiny linear net on the pixels."""

    def __init__(self, std_model: nn.Module, rob_model: nn.Module, n_pixels: int = 64, seed: int = 0):
        super().__init__()
        self.std_model, self.rob_model = std_model, rob_model
        gen = torch.Generator().manual_seed(seed)
        self.alpha_net = nn.Linear(n_pixels, 1)
        with torch.no_grad():
            self.alpha_net.weight.copy_(torch.randn(1, n_pixels, generator=gen) * 0.3)
            self.alpha_net.bias.fill_(0.0)

    def mix(self, x, detach_alpha: bool = False) -> MixOutput:
        alpha_logit = self.alpha_net(x.flatten(1)).squeeze(1)
        if detach_alpha:
            alpha_logit = alpha_logit.detach()
        alpha = torch.sigmoid(alpha_logit)
        return MixOutput(mix_logits(self.std_model(x), self.rob_model(x), alpha), alpha, alpha_logit)

    def forward(self, x):
        return self.mix(x).logits


@pytest.fixture(scope="module")
def models():
    return train_digits_model(adversarial=False, epochs=4, seed=1), train_digits_model(adversarial=True, epochs=6)


@pytest.fixture(scope="module")
def toy(models):
    return ToyAdaptiveMixture(*models).eval()


@pytest.fixture(scope="module")
def test_data():
    data = load_dataset("digits", "test")
    return data.x[:120], data.y[:120]


def mean_alpha(model, x) -> float:
    with torch.no_grad():
        return float(model.mix(x).alpha.mean())


def test_adaptive_loss_lowers_alpha(toy, test_data):
    x, y = test_data
    plain = APGD(toy, EPS, steps=30, attack_misclassified=True)(x, y)
    adaptive = APGD(toy, EPS, steps=30, loss=adaptive_alpha_loss(0.5), attack_misclassified=True)(x, y)
    a_clean, a_plain, a_adaptive = mean_alpha(toy, x), mean_alpha(toy, plain), mean_alpha(toy, adaptive)
    assert a_adaptive < a_plain - 0.05, (a_clean, a_plain, a_adaptive)
    assert a_adaptive < a_clean


def test_adaptive_targeted_extra_term_lowers_alpha(toy, test_data):
    x, y = test_data
    plain = APGDTargeted(toy, EPS, steps=20, n_target_classes=1, attack_misclassified=True)(x, y)
    adaptive = APGDTargeted(toy, EPS, steps=20, n_target_classes=1, extra_loss=alpha_bce_loss, extra_weight=0.5,
                            attack_misclassified=True)(x, y)
    assert mean_alpha(toy, adaptive) < mean_alpha(toy, plain) - 0.05


def test_adaptive_loss_by_hand_and_per_example_weight(toy, test_data):
    x, y = test_data[0][:6], test_data[1][:6]
    w = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    loss = adaptive_alpha_loss(w)(toy, x, y)
    out = toy.mix(x)
    expected = (1 - w) * F.cross_entropy(out.logits, y, reduction="none") + w * F.softplus(-out.alpha_logit)
    assert torch.allclose(loss, expected, atol=1e-6)
    sub = adaptive_alpha_loss(w).select(torch.tensor([1, 4]))
    assert torch.allclose(sub(toy, x[[1, 4]], y[[1, 4]]), expected[[1, 4]], atol=1e-6)
    with pytest.raises(ValueError, match="entries"):
        adaptive_alpha_loss(w)(toy, x[:3], y[:3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adaptive_alpha_loss(1.5)
    # a per-example weight vector survives APGD dropping broken inputs (select)
    x_adv = APGD(toy, EPS, steps=10, loss=adaptive_alpha_loss(torch.full((120,), 0.3)))(*test_data)
    assert x_adv.shape == test_data[0].shape


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fixed_alpha_at_the_ends_gives_finite_loss(models, test_data, alpha):
    mixed = MixedClassifier(*models, alpha=alpha).eval()
    x, y = test_data[0][:10], test_data[1][:10]
    assert math.isinf(float(mixed.mix(x).alpha_logit[0]))
    xr = x.clone().requires_grad_(True)
    loss = adaptive_alpha_loss(0.5)(mixed, xr, y)
    (grad,) = torch.autograd.grad(loss.sum(), xr)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # the alpha term is constant: the loss is half the cross-entropy
    ce = F.cross_entropy(mixed(x), y, reduction="none")
    assert torch.allclose(loss.detach(), 0.5 * ce, atol=1e-5)


def test_gray_box_gradient_ignores_alpha(toy, test_data):
    x = test_data[0][:8].clone().requires_grad_(True)
    (g_gray,) = torch.autograd.grad(DetachedAlpha(toy)(x)[:, 0].sum(), x)
    (g_white,) = torch.autograd.grad(LogitsOnly(toy)(x)[:, 0].sum(), x)
    alpha = toy.mix(x).alpha.detach()
    manual = mix_logits(toy.std_model(x), toy.rob_model(x), alpha)
    (g_manual,) = torch.autograd.grad(manual[:, 0].sum(), x)
    assert torch.allclose(g_gray, g_manual, atol=1e-6)
    assert not torch.allclose(g_white, g_manual, atol=1e-4)  # alpha(x) does depend on x


def test_surrogate_replaces_hardmax_only(models):
    hard = MixedClassifier(*models, alpha=0.7, std_hardmax=True)
    soft = differentiable_surrogate(hard)
    assert hard.std_hardmax and not soft.std_hardmax
    assert soft.std_model is hard.std_model
    plain = MixedClassifier(*models, alpha=0.7)
    assert differentiable_surrogate(plain) is plain


def test_settings_on_a_mixture(toy, test_data):
    x, y = test_data[0][:60], test_data[1][:60]
    report = evaluate_robustness(toy, (x, y), attacks=["A", "B", "D", "std", "rob"], eps=EPS, batch_size=60,
                                 progress=False, attack_options={"apgd_steps": 20})
    clean = report.accuracy()
    worst = report.accuracy("worst")
    for a in report.attacks:
        assert worst <= report.accuracy(a) <= clean
    # the worst case is the conjunction, and broken_by names exactly the attacks that broke an input
    for i, (w, broken) in enumerate(zip(report.worst_case(), report.broken_by())):
        assert w == (not broken)
        for a in report.attacks:
            if report.clean_correct[i]:
                assert (a in broken) == (report.robust[a][i] is False)
    assert report.accuracy("D") <= report.accuracy("A")  # the adaptive attack is not weaker than gray-box PGD
    rows = report_rows(report)
    assert [r["attack"] for r in rows] == ["clean", "A", "B", "D", "std", "rob", "worst case"]
    assert report.component_broken_by["D"]  # which part of D broke each input is recorded


def test_cascade_only_attacks_survivors(toy, test_data):
    x, y = test_data[0][:40], test_data[1][:40]
    report = evaluate_robustness(toy, (x, y), attacks=["B", "apgd-ce"], eps=EPS, batch_size=20, progress=False,
                                 cascade=True, attack_options={"apgd_steps": 10})
    correct = report.clean_correct
    broken_by_b = [ok and report.robust["B"][i] is False for i, ok in enumerate(correct)]
    survived_b = [ok and report.robust["B"][i] is True for i, ok in enumerate(correct)]
    # the premise: B breaks some inputs (in both batches) and leaves others for apgd-ce
    assert sum(broken_by_b[:20]) >= 1 and sum(broken_by_b[20:]) >= 1, report.robust["B"]
    assert sum(survived_b) >= 1
    for i in range(report.n):
        if not correct[i]:  # misclassified when clean: broken for every attack, nothing to skip
            assert report.robust["B"][i] is False and report.robust["apgd-ce"][i] is False
        elif broken_by_b[i]:  # skipped: exactly the inputs B broke
            assert report.robust["apgd-ce"][i] is None and report.adv_pred["apgd-ce"][i] is None
        else:  # B's survivors were attacked
            assert isinstance(report.robust["apgd-ce"][i], bool) and report.adv_pred["apgd-ce"][i] is not None
    # the worst case counts a skipped input as broken once, by B
    assert report.worst_case() == [ok and not b and report.robust["apgd-ce"][i] for i, (ok, b) in
                                   enumerate(zip(correct, broken_by_b))]


def test_errors(models, toy, test_data):
    std_model, _ = models
    x, y = test_data[0][:4], test_data[1][:4]
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("no-such-attack-xyz", toy, EPS)
    with pytest.raises(ValueError, match="needs a mixed classifier"):
        make_attack("D", std_model, EPS)
    with pytest.raises(ValueError, match="eps"):
        make_attack("pgd", toy, -1.0)
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_robustness(toy, (x, y), attacks=["apgd-ce", "no-such-attack-xyz"], progress=False)
    with pytest.raises(ValueError, match="probabilities"):
        evaluate_robustness(nn.Sequential(std_model, nn.Softmax(dim=1)), (x, y), attacks=["pgd"], progress=False)
    with pytest.raises(ValueError, match="alpha"):
        adaptive_alpha_loss(0.3)(std_model, x, y)
    assert set(list_attacks()) >= {"pgd", "apgd-ce", "apgd-t", "autoattack", "A", "B", "C", "D", "std", "rob"}
