"""The surrogate (MixedNUTS adaptive) attack: a smooth stand-in for the gradient, the true mixture for the outcome."""

from __future__ import annotations

import pytest
import torch

from adasmooth.attacks import APGD, make_attack
from adasmooth.attacks.nonlinear import NonlinearSurrogate, surrogate_for
from adasmooth.core.errors import InputError
from adasmooth.mixing import MixedClassifier
from adasmooth.mixing.nonlinear import NonlinearParams, nonlinear_rule

from digits_models import EPS

PARAMS = NonlinearParams(s=2.0, c=-0.5, p=3.0)


@pytest.fixture(scope="module")
def mixture(std_digits_model, robust_model):
    return MixedClassifier(std_digits_model, robust_model, 0.97, rule=nonlinear_rule(PARAMS)).eval()


def test_true_mixture_gives_g_no_gradient_but_the_surrogate_does(mixture, test_data):
    x = test_data[0][:8].clone().requires_grad_(True)
    y = test_data[1][:8]
    # with alpha = 0 the true mixture is g's hardmax: no gradient at all
    mixture.alpha = 0.0
    try:
        out = mixture(x)
        loss = torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum()
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
        assert grad is None or torch.count_nonzero(grad) == 0
        (grad_s,) = torch.autograd.grad(NonlinearSurrogate(mixture)(x).gather(1, y[:, None]).sum(), x)
        assert torch.count_nonzero(grad_s) > 0
    finally:
        mixture.alpha = 0.97


def test_surrogate_matches_the_true_mixture_at_the_ends(mixture, test_data):
    x = test_data[0][:32]
    s = NonlinearSurrogate(mixture, raw_ratio=0.0)
    with torch.no_grad():
        mixture.alpha = 1.0  # raw_ratio 0 and alpha 1: the surrogate is the true mixture (transformed h)
        try:
            torch.testing.assert_close(s(x), mixture(x), atol=1e-4, rtol=1e-4)
        finally:
            mixture.alpha = 0.97
    assert surrogate_for(MixedClassifier(mixture.std_model, mixture.rob_model, 0.5)).rule == "prob"
    with pytest.raises(InputError):
        NonlinearSurrogate(MixedClassifier(mixture.std_model, mixture.rob_model, 0.5))


def test_surrogate_attack_breaks_at_least_as_many_as_plain_apgd(mixture, test_data):
    x, y = test_data[0][:120], test_data[1][:120]
    with torch.no_grad():
        clean_ok = mixture(x).argmax(1) == y
    plain = APGD(mixture, EPS, steps=20, seed=0)(x, y)
    attack = make_attack("surrogate", mixture, EPS, seed=0, apgd_steps=20, n_target_classes=3)
    result = attack.run(x, y)
    with torch.no_grad():
        broken_plain = int((clean_ok & (mixture(plain).argmax(1) != y)).sum())
    broken_surrogate = int((clean_ok & result.fooled).sum())
    assert broken_surrogate >= broken_plain
    assert broken_surrogate > 0
    assert (result.x_adv - x).abs().max() <= EPS + 1e-6
    assert {b for b in result.broken_by if b} <= {"clean", "apgd-ce@surrogate", "apgd-t@surrogate"}
