"""The certified-radius maths against hand-derived values, edge cases and the guarantees they promise."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm

from adasmooth.certify import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    cohen_radius,
    lemma_margin_certifies,
    lipschitz_radius,
    lipschitz_radius_from_bounds,
    required_margin,
    rs_radius,
    simultaneous_bounds,
    smoothing_lipschitz,
)


# ---------------------------------------------------------------- Lemma 3.2


def test_required_margin_values():
    got = required_margin(torch.tensor([0.5, 0.8, 1.0]))
    assert torch.allclose(got, torch.tensor([1.0, 0.25, 0.0]))
    assert math.isinf(float(required_margin(0.0)))


def test_lemma_condition():
    margins = torch.tensor([0.25, 0.2499, 1.0, 1.0, 0.0])
    alphas = torch.tensor([0.8, 0.8, 0.5, 0.49, 1.0])
    assert lemma_margin_certifies(margins, alphas).tolist() == [True, False, True, False, True]


def test_lemma_guarantee_against_worst_case_g():
    """When the lemma's condition holds, even a g that puts all its mass on h's strongest rival
    cannot flip the mixture; the check runs over many random probability vectors."""
    gen = torch.Generator().manual_seed(0)
    p_h = torch.softmax(3 * torch.randn(2000, 5, generator=gen, dtype=torch.float64), 1)
    alpha = 0.5 + 0.5 * torch.rand(2000, generator=gen, dtype=torch.float64)
    top2 = p_h.topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    ok = lemma_margin_certifies(margin, alpha)
    assert ok.any() and (~ok).any()
    y = top2.indices[:, 0]
    for rival in range(5):
        p_g = torch.zeros_like(p_h)
        p_g[:, rival] = 1.0
        mixed = (1 - alpha[:, None]) * p_g + alpha[:, None] * p_h
        # ties count as kept: the lemma proves >=
        kept = mixed.gather(1, y[:, None]).squeeze(1) >= mixed.max(1).values - 1e-12
        assert kept[ok].all()


# ---------------------------------------------------------------- Theorem 3.5


def test_lipschitz_radius_hand_computed_global_constant():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    # i=1: (0.8*0.5 + 0.8 - 1) / (0.8 * 2) = 0.125 ; i=2: (0.8*0.6 - 0.2) / 1.6 = 0.175
    assert torch.allclose(lipschitz_radius(probs, 1.0, 0.8), torch.tensor([0.125]))


def test_lipschitz_radius_per_class_constants_alpha_one_is_standard_radius():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    lip = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    got = lipschitz_radius(probs, lip, 1.0)
    # standard radius min_i (p_y - p_i) / (L_y + L_i)
    expected = torch.tensor([min(0.5 / 3.0, 0.6 / 1.5), min(0.5 / 1.5, 0.3 / 2.5)], dtype=torch.float64)
    assert torch.allclose(got, expected)
    assert got.dtype == torch.float64


def test_lipschitz_radius_alpha_edges():
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(lipschitz_radius(probs, 1.0, 0.4)) == 0.0  # alpha < 1/2 certifies nothing
    assert float(lipschitz_radius(probs, 1.0, 0.5)) == 0.0  # a fully confident h just reaches the threshold
    assert float(lipschitz_radius(probs, 1.0, 0.0)) == 0.0  # no division by alpha = 0
    # alpha = 0.6: (0.6 + 0.6 - 1) / (0.6 * 2) = 1/6
    assert math.isclose(float(lipschitz_radius(probs, 1.0, 0.6)), 1 / 6, rel_tol=1e-6)
    # the threshold 1 / (1 + p_y - p_i) of Section 3.1: at or below it the radius is 0
    probs = torch.tensor([[0.6, 0.4]])
    threshold = 1 / (1 + 0.2)
    assert float(lipschitz_radius(probs, 1.0, threshold - 1e-4)) == 0.0
    assert float(lipschitz_radius(probs, 1.0, threshold + 1e-3)) > 0.0


def test_lipschitz_radius_per_sample_alpha_label_and_constant_model():
    probs = torch.tensor([[0.7, 0.3], [0.7, 0.3]])
    got = lipschitz_radius(probs, 1.0, torch.tensor([1.0, 0.45]))
    assert torch.allclose(got, torch.tensor([0.2, 0.0]))
    # certifying a class that is not h's top class gives 0
    assert float(lipschitz_radius(probs[:1], 1.0, 1.0, label=torch.tensor([1]))) == 0.0
    # a constant h (Lipschitz constant 0) is robust everywhere
    assert math.isinf(float(lipschitz_radius(probs[:1], 0.0, 1.0)))


def test_lipschitz_radius_from_bounds_matches_full_form():
    probs = torch.tensor([[0.75, 0.15, 0.1]], dtype=torch.float64)
    full = lipschitz_radius(probs, 0.8, 0.7)
    from_bounds = lipschitz_radius_from_bounds(torch.tensor([0.75], dtype=torch.float64), 0.15, 0.8, 0.7)
    assert torch.allclose(full, from_bounds)
    assert float(lipschitz_radius_from_bounds(0.75, 0.15, 0.8, 0.3)) == 0.0


def test_lipschitz_radius_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        lipschitz_radius(torch.tensor([[0.6, 0.4]]), 1.0, 1.5)
    with pytest.raises(ValueError, match="per-class"):
        lipschitz_radius(torch.tensor([[0.6, 0.4]]), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="probabilities"):
        lipschitz_radius(torch.tensor([[1.6, -0.6]]), 1.0, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        lipschitz_radius(torch.tensor([[0.6, 0.4]]), -1.0, 1.0)


# ---------------------------------------------------------------- Theorem A.2


def test_rs_radius_hand_computed():
    # sigma/2 * (Phi^-1(0.8 * 0.9) - Phi^-1(0.8 * 0.05 + 0.2)) = 0.25 * (Phi^-1(0.72) - Phi^-1(0.24))
    expected = 0.25 * (norm.ppf(0.72) - norm.ppf(0.24))
    got = rs_radius(torch.tensor([0.9], dtype=torch.float64), 0.05, 0.5, 0.8)
    assert math.isclose(float(got), expected, rel_tol=1e-10)
    assert math.isclose(expected, 0.25 * (0.582842 + 0.706303), rel_tol=1e-5)


def test_rs_radius_alpha_one_is_cohen():
    pa = torch.tensor([0.6, 0.9, 0.999], dtype=torch.float64)
    pb = torch.tensor([0.3, 0.05, 0.0005], dtype=torch.float64)
    got = rs_radius(pa, pb, 0.25, 1.0)
    expected = 0.25 / 2 * (torch.tensor(norm.ppf(pa.numpy())) - torch.tensor(norm.ppf(pb.numpy())))
    assert torch.allclose(got, expected)
    # with pB = 1 - pA it is Cohen's sigma * Phi^-1(pA)
    assert torch.allclose(rs_radius(pa, 1 - pa, 0.25, 1.0), cohen_radius(pa, 0.25))
    assert torch.allclose(cohen_radius(pa, 0.25), 0.25 * torch.tensor(norm.ppf(pa.numpy())))


def test_rs_radius_edges_never_nan():
    grid = torch.linspace(0, 1, 21, dtype=torch.float64)
    pa, pb = torch.meshgrid(grid, grid, indexing="ij")
    for alpha in (0.0, 0.3, 0.5, 0.7, 1.0):
        r = rs_radius(pa.flatten(), pb.flatten(), 0.5, alpha)
        assert not torch.isnan(r).any()
        assert (r >= 0).all()
        if alpha < 0.5:
            assert (r == 0).all()
    assert math.isinf(float(rs_radius(1.0, 0.0, 0.5, 1.0)))  # only the exact 1 vs 0 at alpha = 1
    assert math.isfinite(float(rs_radius(1.0, 0.0, 0.5, 0.9)))
    assert float(rs_radius(0.0, 0.0, 0.5, 1.0)) == 0.0  # -inf - -inf is 0, not NaN
    assert float(rs_radius(0.4, 0.5, 0.5, 1.0)) == 0.0  # runner-up above the top: nothing certified
    assert float(cohen_radius(0.5, 1.0)) == 0.0 and float(cohen_radius(0.2, 1.0)) == 0.0


def test_rs_radius_keeps_dtype_and_monotone_in_alpha():
    pa = torch.tensor([0.95], dtype=torch.float32)
    radii = [float(rs_radius(pa, 0.03, 0.5, a)) for a in (0.6, 0.7, 0.8, 0.9, 1.0)]
    assert rs_radius(pa, 0.03, 0.5, 0.9).dtype == torch.float32
    assert radii == sorted(radii) and radii[0] > 0


def test_rs_radius_beats_lipschitz_radius_for_smoothed_models():
    """Appendix A.3: for an RS model the Phi^-1 bound certifies at least as much as Theorem 3.5 with
    Lip = sqrt(2/pi)/sigma (checked on a grid, two classes)."""
    sigma = 0.5
    for p in np.linspace(0.55, 0.99, 12):
        for alpha in (0.6, 0.8, 1.0):
            lip_r = float(lipschitz_radius(torch.tensor([[p, 1 - p]], dtype=torch.float64), smoothing_lipschitz(sigma), alpha))
            rs_r = float(rs_radius(torch.tensor(p, dtype=torch.float64), 1 - p, sigma, alpha))
            assert rs_r >= lip_r - 1e-12


def test_smoothing_lipschitz():
    assert math.isclose(smoothing_lipschitz(0.5), math.sqrt(2 / math.pi) / 0.5)
    with pytest.raises(ValueError):
        smoothing_lipschitz(0.0)


# ---------------------------------------------------------------- Clopper-Pearson


def test_clopper_pearson_against_beta_quantiles_and_closed_forms():
    k = np.array([0, 3, 50, 99, 100])
    n = 100
    lo = clopper_pearson_lower(k, n, 0.01)
    hi = clopper_pearson_upper(k, n, 0.01)
    for i, ki in enumerate(k):
        if ki > 0:
            assert math.isclose(lo[i], beta.ppf(0.01, ki, n - ki + 1), rel_tol=1e-12)
        if ki < n:
            assert math.isclose(hi[i], beta.ppf(0.99, ki + 1, n - ki), rel_tol=1e-12)
    assert lo[0] == 0.0 and hi[-1] == 1.0
    # closed forms: all successes -> alpha^(1/n); no successes -> 1 - alpha^(1/n)
    assert math.isclose(float(clopper_pearson_lower(10, 10, 0.05)), 0.05 ** 0.1, rel_tol=1e-10)
    assert math.isclose(float(clopper_pearson_upper(0, 10, 0.05)), 1 - 0.05 ** 0.1, rel_tol=1e-10)
    assert (lo <= k / n).all() and (hi >= k / n).all()


def test_clopper_pearson_bad_input():
    with pytest.raises(ValueError):
        clopper_pearson_lower(5, 4, 0.01)
    with pytest.raises(ValueError):
        clopper_pearson_upper(1, 4, 0.0)
    with pytest.raises(ValueError):
        clopper_pearson_lower(1.5, 4, 0.1)


def test_simultaneous_bounds_bonferroni_split():
    lower, upper = simultaneous_bounds(80, np.array([12, 5, 3]), 100, 0.01)
    assert math.isclose(float(lower), beta.ppf(0.005, 80, 21), rel_tol=1e-12)
    per_class = max(beta.ppf(1 - 0.005 / 3, k + 1, 100 - k) for k in (12, 5, 3))
    assert math.isclose(float(upper), min(per_class, 1 - float(lower)), rel_tol=1e-12)
    # when the top class has almost everything, 1 - lower is the tighter runner-up bound
    lower, upper = simultaneous_bounds(999, np.array([1, 0, 0]), 1000, 0.01)
    assert math.isclose(float(upper), 1 - float(lower))


def test_simultaneous_bounds_joint_coverage():
    """Both bounds hold together in at least 1 - alpha of repeated experiments (Monte Carlo)."""
    rng = np.random.default_rng(0)
    p = np.array([0.6, 0.25, 0.1, 0.05])
    alpha, n, trials = 0.1, 200, 3000
    counts = rng.multinomial(n, p, size=trials)
    lower, upper = simultaneous_bounds(counts[:, 0], counts[:, 1:], np.full(trials, n), alpha)
    covered = (lower <= p[0]) & (upper >= p[1:].max())
    assert covered.mean() >= 1 - alpha
    # and the bounds are not vacuous
    assert np.median(lower) > 0.5 and np.median(upper) < 0.4
