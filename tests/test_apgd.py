"""APGD / APGD-T: threat-model constraints, strength against PGD-20, determinism, margins, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasmooth.attacks import APGD, PGD, APGDTargeted, probability_margin
from adasmooth.models.base import create_model

from digits_models import robust_count, train_digits_model

EPS = 0.1


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.6)])
def test_apgd_stays_in_ball_and_box(robust_model, test_data, norm, eps):
    x, y = test_data[0][:120], test_data[1][:120]
    for attack in (APGD(robust_model, eps, norm, steps=30), APGDTargeted(robust_model, eps, norm, steps=10,
                                                                         n_target_classes=2)):
        x_adv = attack(x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= eps + 1e-5).all())
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert robust_count(robust_model, x_adv, y) < robust_count(robust_model, x, y)  # it does attack


def test_apgd_per_sample_eps(robust_model, test_data):
    x, y = test_data[0][:100], test_data[1][:100]
    eps = torch.linspace(0.0, 0.15, 100)
    x_adv = APGD(robust_model, eps, steps=30, attack_misclassified=True)(x, y)
    linf = (x_adv - x).flatten(1).abs().amax(1)
    assert bool((linf <= eps + 1e-6).all())
    assert torch.equal(x_adv[0], x[0])  # eps 0: nothing may move
    # a larger radius must break at least as many points as a smaller one, on average
    with torch.no_grad():
        wrong = robust_model(x_adv).argmax(1) != y
    assert wrong[50:].sum() >= wrong[:50].sum()


def test_apgd_at_least_as_strong_as_pgd20(robust_model, test_data):
    # Summed over three seeds so that one lucky random start cannot decide the comparison.
    x, y = test_data
    pgd = sum(robust_count(robust_model, PGD(robust_model, EPS, steps=20, seed=s)(x, y), y) for s in range(3))
    apgd = sum(robust_count(robust_model, APGD(robust_model, EPS, seed=s)(x, y), y) for s in range(3))
    clean = 3 * robust_count(robust_model, x, y)
    assert pgd < clean  # the model is attackable at this eps, so the comparison means something
    print(f"robust (3 seeds): clean {clean}, PGD-20 {pgd}, APGD-CE {apgd}")
    assert apgd <= pgd


def test_apgd_deterministic_by_seed(robust_model, test_data):
    x, y = test_data[0][:80], test_data[1][:80]
    a = APGD(robust_model, EPS, steps=20, seed=3, attack_misclassified=True)(x, y)
    b = APGD(robust_model, EPS, steps=20, seed=3, attack_misclassified=True)(x, y)
    c = APGD(robust_model, EPS, steps=20, seed=4, attack_misclassified=True)(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    t1 = APGDTargeted(robust_model, EPS, steps=10, n_target_classes=2, seed=5)(x, y)
    t2 = APGDTargeted(robust_model, EPS, steps=10, n_target_classes=2, seed=5)(x, y)
    assert torch.equal(t1, t2)


def test_minimum_margin_never_above_clean(robust_model, test_data):
    x, y = test_data[0][:150], test_data[1][:150]
    with torch.no_grad():
        clean_margin = probability_margin(robust_model(x), y)
    attack = APGD(robust_model, EPS, steps=40, minimum_margin=True)
    x_adv, margin = attack.attack_with_margins(x, y)
    assert bool((margin <= clean_margin + 1e-6).all())
    # it returns low-margin points also where the attack failed, not the clean input
    survived = margin > 0
    assert survived.sum() > 10
    assert float(margin[survived].mean()) < float(clean_margin[survived].mean()) - 0.05
    assert bool(((x_adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6).all())
    # every input the plain attack breaks, the minimum-margin attack breaks too (margin < 0)
    plain = APGD(robust_model, EPS, steps=40)(x, y)
    with torch.no_grad():
        broken_plain = robust_model(plain).argmax(1) != y
    assert int((broken_plain & (margin >= 0)).sum()) <= 2


def test_probability_margin_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]))
    m = probability_margin(logits, torch.tensor([0, 0]))
    assert torch.allclose(m, torch.tensor([0.5, -0.3]), atol=1e-6)


def test_targeted_uses_at_most_c_minus_1_classes_and_checks_loss():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    for n_classes in (3, 5):
        model = create_model("small-cnn", n_classes, in_channels=1, width=4, hidden=8).eval()
        y = torch.randint(0, n_classes, (16,))
        attack = APGDTargeted(model, 0.1, steps=5, loss="ce-targeted", attack_misclassified=True)
        x_adv = attack(x, y)  # 9 requested targets, C - 1 available: no error
        assert x_adv.shape == x.shape
    with pytest.raises(ValueError, match="at least 4 classes"):
        APGDTargeted(model_3 := create_model("small-cnn", 3, in_channels=1, width=4, hidden=8).eval(), 0.1)(
            x, torch.zeros(16, dtype=torch.long))
    del model_3


def test_callable_loss_and_float64(robust_model, test_data):
    x, y = test_data[0][:60], test_data[1][:60]

    def ce(model, inp, target):  # no select(): APGD must run it on the whole batch
        return F.cross_entropy(model(inp), target, reduction="none")

    with_callable = robust_count(robust_model, APGD(robust_model, EPS, steps=30, loss=ce)(x, y), y)
    builtin = robust_count(robust_model, APGD(robust_model, EPS, steps=30, loss="ce")(x, y), y)
    assert abs(with_callable - builtin) <= 2
    model64 = train_digits_model(adversarial=False, epochs=1).double()
    x_adv = APGD(model64, EPS, steps=5)(x.double(), y)
    assert x_adv.dtype == torch.float64


class _Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return F.softmax(self.inner(x), dim=1)


def test_clear_errors(robust_model, test_data):
    x, y = test_data[0][:8], test_data[1][:8]
    with pytest.raises(ValueError, match="probabilities"):
        APGD(_Softmaxed(robust_model), EPS)(x, y)
    with pytest.raises(ValueError, match="probabilities"):
        APGDTargeted(_Softmaxed(robust_model), EPS)(x, y)
    with pytest.raises(ValueError, match="eps"):
        APGD(robust_model, -0.1)
    with pytest.raises(ValueError, match="unknown attack loss"):
        APGD(robust_model, EPS, loss="hinge")
    with pytest.raises(ValueError, match="unknown targeted loss"):
        APGDTargeted(robust_model, EPS, loss="ce")
    with pytest.raises(ValueError, match="norm"):
        APGD(robust_model, EPS, norm="l1")
    with pytest.raises(ValueError, match="labels"):
        APGD(robust_model, EPS)(x, y[:3])


def test_targeted_apgd_target_ranks_run_only_those_targets():
    from adasmooth.attacks import APGDTargeted

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6)).eval()
    x, y = torch.rand(5, 3, 2, 2), torch.arange(5) % 6
    seen = []

    def loss(m, xa, yy, target):
        seen.append(target.clone())
        return -torch.nn.functional.cross_entropy(m(xa), target, reduction="none")

    APGDTargeted(model, 0.1, steps=2, loss=loss, target_ranks=[2], attack_misclassified=True)(x, y)
    ranked = model(x).detach().scatter(1, y[:, None], -float("inf")).argsort(1, descending=True)
    assert seen and all(torch.equal(t, ranked[: len(t), 2]) for t in seen)
    seen.clear()
    # ranks past the other classes (6 classes: ranks 0-4) are skipped, not an error
    APGDTargeted(model, 0.1, steps=2, loss=loss, target_ranks=[7], attack_misclassified=True)(x, y)
    assert not seen
