"""Property tests for the maths entry points: random shapes, dtypes, extreme values, NaN and inf.

Each function either returns the correct value (checked against a float64 evaluation of its formula)
or raises its documented error. The documented contract of the pure maths on non-finite input: NaN
propagates to exactly the rows it touches (the pure functions never synchronise with the device to look
for it; the checks live at the entry points: attacks, commands, data loading).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adasmooth.attacks.base import project
from adasmooth.attacks.losses import dlr_from_logits, margin_from_logits
from adasmooth.certify.bounds import clopper_pearson_lower, clopper_pearson_upper, cohen_radius
from adasmooth.core.errors import InputError
from adasmooth.mixing import mix_log_probs, mix_logits
from adasmooth.mixing.rules import dual_norm

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64])
FLOATS = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def logits_pair(draw, min_classes: int = 2):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(min_classes, 12))
    g = draw(st.lists(FLOATS, min_size=n * c, max_size=n * c))
    h = draw(st.lists(FLOATS, min_size=n * c, max_size=n * c))
    dtype = draw(DTYPES)
    return torch.tensor(g, dtype=dtype).view(n, c), torch.tensor(h, dtype=dtype).view(n, c)


def reference_mix(g: torch.Tensor, h: torch.Tensor, alpha) -> torch.Tensor:
    """Eq. 3.4 evaluated directly in float64 (softmax, weighted sum, log)."""
    p = (1 - torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)) * torch.softmax(g.double(), 1) + \
        torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1) * torch.softmax(h.double(), 1)
    return torch.log(p)


@SETTINGS
@given(pair=logits_pair(), alpha=st.floats(0, 1))
def test_mix_logits_is_eq_3_4_and_stable_for_extreme_logits(pair, alpha):
    g, h = pair
    out = mix_logits(g, h, alpha)
    ref = reference_mix(g, h, alpha)
    assert out.dtype == g.dtype and out.shape == g.shape
    # probabilities agree everywhere (log-probabilities can be -inf where a class has probability 0)
    tol = 1e-5 if g.dtype == torch.float32 else 1e-10
    assert torch.allclose(out.double().exp(), ref.exp(), atol=tol)
    assert not torch.isnan(out).any()
    assert torch.allclose(torch.logsumexp(out.double(), 1), torch.zeros(g.shape[0], dtype=torch.float64), atol=1e-4)


@SETTINGS
@given(pair=logits_pair(), data=st.data())
def test_mix_log_probs_with_a_per_input_alpha(pair, data):
    g, h = pair
    alphas = data.draw(st.lists(st.floats(0, 1), min_size=g.shape[0], max_size=g.shape[0]))
    alpha = torch.tensor(alphas, dtype=g.dtype)
    out = mix_log_probs(torch.log_softmax(g, 1), torch.log_softmax(h, 1), alpha)
    tol = 1e-5 if g.dtype == torch.float32 else 1e-10
    assert torch.allclose(out.double().exp(), reference_mix(g, h, alpha).exp(), atol=tol)


@SETTINGS
@given(pair=logits_pair(), bad=st.sampled_from([-0.1, 1.1, math.nan, math.inf]))
def test_mix_log_probs_refuses_alphas_outside_0_1(pair, bad):
    g, h = pair
    with pytest.raises(InputError, match="alpha"):
        mix_log_probs(torch.log_softmax(g, 1), torch.log_softmax(h, 1), bad)


@SETTINGS
@given(pair=logits_pair(), row=st.integers(0, 5), alpha=st.floats(0.01, 0.99))
def test_nan_logits_propagate_to_their_row_only(pair, row, alpha):
    g, h = pair
    row = row % g.shape[0]
    g = g.clone()
    g[row, 0] = math.nan
    out = mix_logits(g, h, alpha)
    assert torch.isnan(out[row]).all()
    others = [i for i in range(g.shape[0]) if i != row]
    assert not torch.isnan(out[others]).any()


@SETTINGS
@given(pair=logits_pair(min_classes=2), data=st.data())
def test_margin_is_the_cw_margin(pair, data):
    logits, _ = pair
    y = torch.tensor(data.draw(st.lists(st.integers(0, logits.shape[1] - 1), min_size=logits.shape[0],
                                        max_size=logits.shape[0])))
    margin = margin_from_logits(logits, y)
    for i in range(logits.shape[0]):
        others = [logits[i, j].item() for j in range(logits.shape[1]) if j != y[i]]
        assert margin[i].item() == pytest.approx(max(others) - logits[i, y[i]].item(), rel=1e-6, abs=1e-3)


@SETTINGS
@given(pair=logits_pair(min_classes=3), data=st.data())
def test_dlr_is_scale_invariant_and_finite(pair, data):
    logits, _ = pair
    y = torch.tensor(data.draw(st.lists(st.integers(0, logits.shape[1] - 1), min_size=logits.shape[0],
                                        max_size=logits.shape[0])))
    logits = logits.double()
    dlr = dlr_from_logits(logits, y)
    assert torch.isfinite(dlr).all()
    spread = logits.sort(1).values
    well_spread = (spread[:, -1] - spread[:, -3]) > 1e-3
    scaled = dlr_from_logits(7.0 * logits + 3.0, y)
    assert torch.allclose(dlr[well_spread], scaled[well_spread], rtol=1e-6, atol=1e-6)


@st.composite
def perturbations(draw):
    n = draw(st.integers(1, 4))
    shape = (n, draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    size = int(np.prod(shape))
    values = draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=size, max_size=size))
    eps = draw(st.lists(st.floats(0, 2), min_size=n, max_size=n))
    dtype = draw(DTYPES)
    return torch.tensor(values, dtype=dtype).view(shape), torch.tensor(eps, dtype=dtype).view(-1, 1, 1, 1)


@SETTINGS
@given(case=perturbations(), norm=st.sampled_from(["linf", "l2"]))
def test_projection_lands_in_the_ball_and_fixes_its_points(case, norm):
    delta, eps = case
    out = project(delta, eps, norm)
    size = out.flatten(1).abs().max(1).values if norm == "linf" else out.flatten(1).norm(dim=1)
    slack = 1e-5 if delta.dtype == torch.float32 else 1e-12
    assert (size <= eps.flatten() * (1 + slack) + slack).all()
    again = project(out, eps, norm)
    assert torch.allclose(again, out, atol=1e-6)


@SETTINGS
@given(case=perturbations(), norm=st.sampled_from(["linf", "l2"]))
def test_dual_norm(case, norm):
    grad, _ = case
    got = dual_norm(grad, norm)
    flat = grad.double().flatten(1)
    want = flat.abs().sum(1) if norm == "linf" else flat.norm(dim=1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


@SETTINGS
@given(p=st.floats(0, 1), sigma=st.floats(1e-3, 10))
def test_cohen_radius(p, sigma):
    from scipy.stats import norm

    r = float(cohen_radius(torch.tensor(p, dtype=torch.float64), sigma))
    want = sigma * norm.ppf(p) if p > 0.5 else 0.0
    assert r == pytest.approx(want, rel=1e-9, abs=1e-12) or (math.isinf(want) and math.isinf(r))


@SETTINGS
@given(p=st.sampled_from([-0.1, 1.5, math.nan]), sigma=st.floats(1e-3, 10))
def test_cohen_radius_refuses_non_probabilities(p, sigma):
    with pytest.raises(InputError):
        cohen_radius(torch.tensor(p, dtype=torch.float64), sigma)


@SETTINGS
@given(n=st.integers(1, 10_000), data=st.data(), alpha=st.floats(1e-6, 0.5))
def test_clopper_pearson_brackets_the_frequency(n, data, alpha):
    k = data.draw(st.integers(0, n))
    lo, hi = float(clopper_pearson_lower(k, n, alpha)), float(clopper_pearson_upper(k, n, alpha))
    assert 0 <= lo <= k / n <= hi <= 1


@pytest.mark.parametrize("k, n, alpha", [(-1, 10, 0.01), (11, 10, 0.01), (3, 0, 0.01), (2.5, 10, 0.01),
                                         (3, 10, 0.0), (3, 10, 1.0), (3, 10, math.nan)])
def test_clopper_pearson_refuses_bad_counts_and_levels(k, n, alpha):
    with pytest.raises(InputError):
        clopper_pearson_lower(k, n, alpha)
