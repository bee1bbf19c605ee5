"""Fixed-alpha mixing (Eq. 3.4 and the ablations of Eqs. 3.1-3.3) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasmooth.mixing.fixed import MixedClassifier, MixedModel, MixOutput
from adasmooth.mixing.rules import dual_norm, mix_log_probs, mix_logits, trust_weighted_rule
from adasmooth.models.base import create_model


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def t(values):
    return torch.as_tensor(values, dtype=torch.float64).clone()


class Linear(nn.Module):
    """g(x) = W x on the flattened input: every input gradient is a row of W, known in closed form."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(t(weight))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


class Fixed(nn.Module):
    """Returns the same logits whatever the input (batch of one), to test the formula alone."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", t(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


# ------------------------------------------------------------------ Eq. 3.4, hand-computed


def test_simple_fractions():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([ln 2, 0]) = [2/3, 1/3]; alpha = 1/2 gives [11/24, 13/24].
    g = t([[0.0, math.log(3)]])
    h = t([[math.log(2), 0.0]])
    out = mix_logits(g, h, 0.5)
    torch.testing.assert_close(out, t([[math.log(11 / 24), math.log(13 / 24)]]))
    # Scales: 2*g -> softmax [1/10, 9/10]; 0.5*[ln 4, 0] -> [2/3, 1/3]; alpha = 1/4:
    # 3/4*[1/10, 9/10] + 1/4*[2/3, 1/3] = [29/120, 91/120].
    out = mix_logits(g, t([[math.log(4), 0.0]]), 0.25, std_scale=2.0, rob_scale=0.5)
    torch.testing.assert_close(out, t([[math.log(29 / 120), math.log(91 / 120)]]))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (2.0, 1.0), (1.2, 0.3), (3.0, 0.5)])
def test_mixed_logits_match_numpy(alpha, scales):
    s_g, s_h = scales
    g = [[2.0, 1.0, 0.0, -1.5], [0.3, -0.2, 4.0, 1.0]]
    h = [[0.0, 3.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]]
    with np.errstate(divide="ignore"):
        expected = np.log((1 - alpha) * np_softmax(s_g * np.array(g)) + alpha * np_softmax(s_h * np.array(h)))
    out = mix_logits(t(g), t(h), alpha, std_scale=s_g, rob_scale=s_h)
    torch.testing.assert_close(out, torch.from_numpy(expected))
    # exp of the mixed logits is a probability vector: the output is already normalised.
    torch.testing.assert_close(out.exp().sum(1), t([1.0, 1.0]))
    # And the module gives the same on models returning those logits.
    mc = MixedClassifier(Fixed(g[0]), Fixed(h[0]), alpha, std_scale=s_g, rob_scale=s_h)
    torch.testing.assert_close(mc(torch.zeros(1, 1, 2, 2, dtype=torch.float64)), out[:1], rtol=1e-6, atol=1e-6)


def test_exact_at_alpha_zero_and_one():
    torch.manual_seed(0)
    g = 5 * torch.randn(6, 7)
    h = 5 * torch.randn(6, 7)
    assert torch.equal(mix_logits(g, h, 1.0), F.log_softmax(h, 1))
    assert torch.equal(mix_logits(g, h, 0.0), F.log_softmax(g, 1))
    assert torch.equal(mix_logits(g, h, 1.0, rob_scale=0.3), F.log_softmax(0.3 * h, 1))
    std = create_model("small-cnn", 7, 1, width=4, hidden=8).eval()
    rob = create_model("small-cnn", 7, 1, width=4, hidden=8).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(MixedClassifier(std, rob, 1.0)(x), F.log_softmax(rob(x), 1))
        assert torch.equal(MixedClassifier(std, rob, 0.0)(x), F.log_softmax(std(x), 1))


def test_huge_logits_stay_finite():
    g = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    h = torch.tensor([[-1e4, 1e4, 0.0]], requires_grad=True)
    out = mix_logits(g, h, 0.5)
    # p_g = [1, 0, 0], p_h = [0, 1, 0] up to e^-1e4; the third class has 0.5 e^-1e4 + 0.5 e^-2e4.
    log_half = math.log(0.5)
    torch.testing.assert_close(out, torch.tensor([[log_half, log_half, -1e4 + log_half]]))
    out[0, 2].backward()
    assert torch.isfinite(g.grad).all() and torch.isfinite(h.grad).all()
    for alpha in (0.0, 1e-30, 1 - 1e-7, 1.0):
        assert torch.isfinite(mix_logits(g.detach() * 3, h.detach() * 3, alpha)).all()


def test_hardmax_g():
    # g's top class is 1 -> one-hot [0, 1, 0]; softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]; alpha = 1/2:
    # [1/8, 5/8, 1/4]. The scale of g does not matter.
    g = t([[1.0, 3.0, 2.0]])
    h = t([[0.0, 0.0, math.log(2)]])
    expected = t([[math.log(1 / 8), math.log(5 / 8), math.log(1 / 4)]])
    for s_g in (1.0, 0.01, 50.0):
        torch.testing.assert_close(mix_logits(g, h, 0.5, std_scale=s_g, std_hardmax=True), expected)
    at_zero = mix_logits(g, h, 0.0, std_hardmax=True)
    assert at_zero[0, 1] == 0 and torch.isinf(at_zero[0, [0, 2]]).all()
    mc = MixedClassifier(Fixed(g[0]), Fixed(h[0]), 0.5, std_hardmax=True)
    torch.testing.assert_close(mc(torch.zeros(1, 1, 1, 1, dtype=torch.float64)), expected)
    # Gradient reaches x only through h: g's hardmax is piecewise constant.
    x = torch.rand(2, 1, 1, 3, dtype=torch.float64, requires_grad=True)
    std, rob = Linear([[1, 0, 0], [0, 1, 0]]), Linear([[0, 0, 1], [1, 1, 1]])
    MixedClassifier(std, rob, 0.5, std_hardmax=True)(x)[:, 0].sum().backward()
    assert std.weight.grad is None or std.weight.grad.abs().sum() == 0
    assert rob.weight.grad.abs().sum() > 0


def test_per_sample_alpha_in_mix_log_probs():
    torch.manual_seed(1)
    lg = F.log_softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    lh = F.log_softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    alphas = [0.0, 0.5, 1.0]
    out = mix_log_probs(lg, lh, t(alphas))
    for i, a in enumerate(alphas):
        with np.errstate(divide="ignore"):
            expected = np.log((1 - a) * lg[i].exp().numpy() + a * lh[i].exp().numpy())
        torch.testing.assert_close(out[i], torch.from_numpy(expected))
    assert torch.equal(out[0], lg[0]) and torch.equal(out[2], lh[2])


# ------------------------------------------------------------------ the module: mix(), gradients


def test_mix_returns_alpha_and_its_logit():
    mc = MixedClassifier(Fixed([0.0, 1.0]), Fixed([1.0, 0.0]), 0.25)
    x = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    res = mc.mix(x, detach_alpha=True)
    assert isinstance(res, MixOutput) and isinstance(mc, MixedModel)
    assert res.alpha.shape == (4,) and torch.allclose(res.alpha, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(res.alpha_logit, torch.full((4,), math.log(1 / 3), dtype=torch.float64))
    torch.testing.assert_close(res.logits, mc(x))
    assert torch.isposinf(MixedClassifier(Fixed([0.0, 1.0]), Fixed([1.0, 0.0]), 1.0).mix(x).alpha_logit).all()
    assert torch.isneginf(MixedClassifier(Fixed([0.0, 1.0]), Fixed([1.0, 0.0]), 0.0).mix(x).alpha_logit).all()
    mc.alpha = 0.75
    assert mc.alpha == 0.75 and float(mc.mix(x).alpha[0]) == 0.75
    assert "_alpha" in mc.state_dict()


def test_gradient_flows_into_x_through_both_models():
    torch.manual_seed(2)
    std = create_model("small-cnn", 5, 1, width=4, hidden=8).double().eval()
    rob = create_model("mlp", 5, 1, input_size=8, hidden=8).double().eval()
    mc = MixedClassifier(std, rob, 0.4, std_scale=1.5, rob_scale=0.7)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: mc(z), (x,), eps=1e-6, atol=1e-5)
    mc(x)[:, 2].sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (std.stem[0].weight, rob.head.weight))
    # At alpha = 1 the gradient is exactly that of log_softmax(h): g contributes nothing.
    x1 = x.detach().clone().requires_grad_(True)
    (grad_mix,) = torch.autograd.grad(MixedClassifier(std, rob, 1.0)(x1)[:, 2].sum(), x1)
    (grad_h,) = torch.autograd.grad(F.log_softmax(rob(x1), 1)[:, 2].sum(), x1)
    torch.testing.assert_close(grad_mix, grad_h)


def test_linear_models_gradient_of_probability_mixture():
    # d/dx log((1-a) p_g,k + a p_h,k) = [(1-a) p_g,k (W_g,k - p_g W_g) + a p_h,k (W_h,k - p_h W_h)] / mix_k
    wg = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [-1.0, 0.0, 3.0]])
    wh = np.array([[0.5, 0.5, 0.0], [1.0, -1.0, 2.0], [0.0, 0.0, -0.25]])
    xv = np.array([0.2, 0.5, 0.9])
    a, k = 0.3, 1
    pg, ph = np_softmax(wg @ xv), np_softmax(wh @ xv)
    mix_k = (1 - a) * pg[k] + a * ph[k]
    expected = ((1 - a) * pg[k] * (wg[k] - pg @ wg) + a * ph[k] * (wh[k] - ph @ wh)) / mix_k
    x = t(xv).view(1, 1, 1, 3).requires_grad_(True)
    MixedClassifier(Linear(wg), Linear(wh), a)(x)[0, k].backward()
    torch.testing.assert_close(x.grad.flatten(), torch.from_numpy(expected))


# ------------------------------------------------------------------ ablations: logit space, R_i of Eq. 3.3

WG = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [-1.0, 0.0, 3.0]])
WH = np.array([[0.5, 0.5, 0.0], [1.0, -1.0, 2.0], [0.0, 0.0, -0.25]])
XV = np.array([0.2, 0.5, 0.9])


def _r_by_hand(option: str, norm: str) -> np.ndarray:
    ord_ = 1 if norm == "linf" else 2  # dual norm of l_inf is l_1; l_2 is self-dual
    ng = np.linalg.norm(WG, ord=ord_, axis=1)  # ||grad g_i|| = ||W_g,i||
    nh = np.linalg.norm(WH, ord=ord_, axis=1)
    if option == "one":
        return np.ones(3)
    if option == "grad_g":
        return ng
    if option == "grad_max_g":
        return np.full(3, ng[np.argmax(WG @ XV)])
    return ng / nh


def test_logit_space_variant():
    a, s_g, s_h = 0.3, 2.0, 0.5
    expected = (1 - a) * s_g * (WG @ XV) + a * s_h * (WH @ XV)
    mc = MixedClassifier(Linear(WG), Linear(WH), a, std_scale=s_g, rob_scale=s_h, rule="logit")
    torch.testing.assert_close(mc(t(XV).view(1, 1, 1, 3))[0], torch.from_numpy(expected))


def _rule(option: str, space: str):
    """The registered rule for the sweep's variants; probability-space R_i options are unregistered."""
    named = {("one", "probability"): "prob", ("one", "logit"): "logit", ("grad_g", "logit"): "grad_g",
             ("grad_max_g", "logit"): "grad_max_g", ("grad_ratio", "logit"): "grad_ratio"}
    return named.get((option, space)) or trust_weighted_rule(option, space)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("option", ["one", "grad_g", "grad_max_g", "grad_ratio"])
@pytest.mark.parametrize("space", ["logit", "probability"])
def test_r_options_eq_3_3(option, norm, space):
    alpha = 0.3
    gamma = alpha / (1 - alpha)  # Eq. 3.4's alpha = gamma / (1 + gamma)
    r = _r_by_hand(option, norm)
    g, h = WG @ XV, WH @ XV
    if space == "logit":  # Eq. 3.3 literally
        expected = (g + gamma * r * h) / (1 + gamma * r)
    else:
        expected = np.log((np_softmax(g) + gamma * r * np_softmax(h)) / (1 + gamma * r))
    mc = MixedClassifier(Linear(WG), Linear(WH), alpha, rule=_rule(option, space), norm=norm)
    x = t(XV).view(1, 1, 1, 3)
    torch.testing.assert_close(mc(x)[0], torch.from_numpy(expected))
    with torch.no_grad():  # evaluation without autograd still computes the gradient norms
        torch.testing.assert_close(mc(x)[0], torch.from_numpy(expected))
    # R_i is held constant for the attacker: gradient still reaches x through g and h.
    xg = x.clone().requires_grad_(True)
    mc(xg)[0, 0].backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_dual_norm():
    grad = t([[[3.0, -4.0]], [[0.0, -2.0]]])
    torch.testing.assert_close(dual_norm(grad, "linf"), t([7.0, 2.0]))
    torch.testing.assert_close(dual_norm(grad, "l2"), t([5.0, 2.0]))
    with pytest.raises(ValueError):
        dual_norm(grad, "l1")


# ------------------------------------------------------------------ errors


def test_bad_alpha():
    std, rob = Fixed([0.0, 1.0]), Fixed([1.0, 0.0])
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            MixedClassifier(std, rob, bad)
    mc = MixedClassifier(std, rob, 0.5)
    for bad in (2.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            mc.alpha = bad
    assert mc.alpha == 0.5
    lp = F.log_softmax(torch.randn(2, 3), 1)
    for bad in (1.5, -1e-3, float("nan"), torch.tensor([0.5, 1.2]), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match="alpha"):
            mix_log_probs(lp, lp, bad)
    with pytest.raises(ValueError, match="alpha"):
        mix_log_probs(lp, lp, torch.tensor([0.5, 0.5, 0.5]))  # one alpha per sample, 3 for 2 samples
    with pytest.raises(ValueError, match="alpha"):
        mix_logits(lp, lp, 2.0)


def test_class_counts_must_match():
    with pytest.raises(ValueError, match="class count"):
        MixedClassifier(create_model("mlp", 10, 1, input_size=8), create_model("mlp", 100, 1, input_size=8), 0.5)
    # Models without a spec are checked when they run.
    mc = MixedClassifier(Linear(np.ones((3, 4))), Linear(np.ones((4, 4))), 0.5)
    with pytest.raises(ValueError, match="class count"):
        mc(torch.rand(1, 1, 1, 4, dtype=torch.float64))
    mc_r = MixedClassifier(Linear(np.ones((3, 4))), Linear(np.ones((4, 4))), 0.5, rule="grad_max_g")
    with pytest.raises(ValueError, match="class count"):
        mc_r(torch.rand(1, 1, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        mix_log_probs(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)


def test_wrong_rank_and_bad_options():
    mc = MixedClassifier(Linear(np.ones((3, 4))), Linear(np.ones((3, 4))), 0.5)
    with pytest.raises(ValueError, match="N, C, H, W"):
        mc(torch.rand(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="N, C, H, W"):
        mc.mix(torch.rand(2, 1, 1, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="logits"):
        mix_logits(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), 0.5)
    std, rob = Fixed([0.0, 1.0]), Fixed([1.0, 0.0])
    with pytest.raises(ValueError, match="mixing rule 'softmax'"):
        MixedClassifier(std, rob, 0.5, rule="softmax")
    with pytest.raises(ValueError, match="mixing rule 'grad_h'"):
        MixedClassifier(std, rob, 0.5, rule="grad_h")
    with pytest.raises(ValueError, match="space"):
        trust_weighted_rule("one", "softmax")
    with pytest.raises(ValueError, match="R_i option 'grad_h'"):
        trust_weighted_rule("grad_h", "logit")
    with pytest.raises(ValueError, match="scales"):
        MixedClassifier(std, rob, 0.5, std_scale=0.0)
    with pytest.raises(ValueError, match="norm"):
        MixedClassifier(std, rob, 0.5, norm="l1")
