"""Randomized smoothing: abstention, the radius recomputed from the counts, soundness on a linear model."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from adasmooth.certify import ABSTAIN, TSV_COLUMNS, Smooth, certified_accuracy, certify_dataset


class RandomClassifier(nn.Module):
    """Ignores its input and answers a uniformly random class: nothing about it can be certified."""

    def __init__(self, num_classes: int, seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return torch.rand(x.shape[0], self.num_classes, generator=self.gen)


class ConstantClassifier(nn.Module):
    def __init__(self, num_classes: int, cls: int):
        super().__init__()
        self.num_classes, self.cls = num_classes, cls

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes, dtype=x.dtype)
        out[:, self.cls] = 1.0
        return out


class HalfSpace(nn.Module):
    """Class 1 where w.x + b > 0, else class 0: smoothing leaves it unchanged, and its exact
    smoothed radius at x is the distance |w.x + b| / ||w|| to the hyperplane."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten().to(x.dtype) + self.b
        return torch.stack([-s, s], dim=1)


def test_random_base_classifier_abstains():
    smooth = Smooth(RandomClassifier(7), num_classes=7, sigma=0.25, seed=0)
    x = torch.rand(1, 4, 4)
    for _ in range(3):
        assert smooth.certify(x, n0=50, n=500, alpha=0.001, batch_size=128) == (ABSTAIN, 0.0)
        assert smooth.predict(x, n=500, alpha=0.001, batch_size=128) == ABSTAIN


def test_constant_classifier_radius_closed_form():
    """All n draws agree: pA = alpha^(1/n) exactly, radius sigma * Phi^-1(alpha^(1/n))."""
    smooth = Smooth(ConstantClassifier(12, 11), num_classes=12, sigma=0.5, seed=1)
    pred, radius = smooth.certify(torch.zeros(3, 2, 2), n0=10, n=200, alpha=0.001, batch_size=64)
    assert pred == 11
    assert math.isclose(radius, 0.5 * norm.ppf(0.001 ** (1 / 200)), rel_tol=1e-9)
    assert smooth.predict(torch.zeros(3, 2, 2), n=200, alpha=0.001, batch_size=64) == 11


def test_certify_radius_recomputed_from_counts():
    torch.manual_seed(0)
    w = torch.randn(1, 5, 5)
    x = torch.rand(1, 5, 5) * 0.3
    b = float(-(w.flatten() @ x.flatten()) + 0.4 * w.norm())  # class 1, distance 0.4 from the boundary
    model = HalfSpace(w, b)
    n0, n, alpha = 64, 1000, 0.001
    pred, radius = Smooth(model, 2, sigma=0.5, seed=123).certify(x, n0, n, alpha, batch_size=300)
    # replay the same noise: the first n0 draws select, the next n estimate
    predictions = Smooth(model, 2, sigma=0.5, seed=123).sample_predictions(x, n0 + n, 300).numpy()
    selection = np.bincount(predictions[:n0], minlength=2)
    estimation = np.bincount(predictions[n0:], minlength=2)
    candidate = int(selection.argmax())
    p_lower = beta.ppf(alpha, estimation[candidate], n - estimation[candidate] + 1)
    assert pred == candidate == 1
    assert p_lower > 0.5
    assert math.isclose(radius, 0.5 * norm.ppf(p_lower), rel_tol=1e-9)
    # sound: below the exact smoothed radius, and not far below it with 1000 draws
    assert radius <= 0.4
    assert radius > 0.15


def test_certify_is_sound_on_halfspaces():
    """Certified radii never exceed the exact smoothed radius (up to the 1e-3 failure rate)."""
    gen = torch.Generator().manual_seed(3)
    violations = 0
    for _ in range(20):
        w = torch.randn(2, 3, 3, generator=gen)
        x = torch.rand(2, 3, 3, generator=gen)
        b = float(torch.randn(1, generator=gen)) * float(w.norm())
        model = HalfSpace(w, b)
        exact = abs(float(w.flatten() @ x.flatten()) + b) / float(w.norm())
        pred, radius = Smooth(model, 2, sigma=0.3, seed=7).certify(x, 32, 400, 0.001, 400)
        if pred != ABSTAIN:
            true_cls = int(float(w.flatten() @ x.flatten()) + b > 0)
            violations += int(pred != true_cls or radius > exact)
    assert violations == 0


def test_predict_agrees_with_majority():
    model = HalfSpace(torch.ones(1, 2, 2), -2.0)  # class 1 iff pixel sum > 2
    smooth = Smooth(model, 2, sigma=0.1, seed=0)
    assert smooth.predict(torch.full((1, 2, 2), 0.9), 200, 0.001, 100) == 1
    assert smooth.predict(torch.full((1, 2, 2), 0.1), 200, 0.001, 100) == 0
    assert smooth.predict(torch.full((1, 2, 2), 0.5), 200, 0.001, 100) == ABSTAIN  # on the boundary


def test_seed_reproducible_and_float64():
    model = HalfSpace(torch.ones(1, 2, 2, dtype=torch.float64), -2.0)
    x = torch.full((1, 2, 2), 0.55, dtype=torch.float64)
    a = Smooth(model, 2, 0.25, seed=5).sample_counts(x, 500, 128)
    b = Smooth(model, 2, 0.25, seed=5).sample_counts(x, 500, 128)
    assert (a == b).all() and a.sum() == 500
    # P(class 1) = Phi(0.2 / (0.25 * 2)) = Phi(0.4) ~ 0.655
    assert abs(a[1] / 500 - norm.cdf(0.4)) < 0.07


def test_bad_arguments():
    smooth = Smooth(ConstantClassifier(3, 0), 3, 0.25)
    with pytest.raises(ValueError, match="ONE input"):
        smooth.certify(torch.zeros(2, 1, 4, 4), 10, 10, 0.01, 10)
    with pytest.raises(ValueError, match="n0"):
        smooth.certify(torch.zeros(1, 4, 4), 0, 10, 0.01, 10)
    with pytest.raises(ValueError, match="alpha"):
        smooth.certify(torch.zeros(1, 4, 4), 10, 10, 1.5, 10)
    with pytest.raises(ValueError, match="sigma"):
        Smooth(ConstantClassifier(3, 0), 3, 0.0)
    with pytest.raises(ValueError, match="expected"):
        Smooth(ConstantClassifier(3, 0), 5, 0.25).sample_counts(torch.zeros(1, 4, 4), 4, 4)


def test_certify_dataset_tsv_and_certified_accuracy(tmp_path):
    model = HalfSpace(torch.ones(1, 2, 2), -2.0)
    xs = torch.cat([torch.full((3, 1, 2, 2), 0.95), torch.full((3, 1, 2, 2), 0.5)])
    ys = torch.tensor([1, 1, 0, 1, 0, 1])
    smooth = Smooth(model, 2, sigma=0.1, seed=0)
    path = tmp_path / "out" / "cert.tsv"
    rows = certify_dataset(smooth, (xs, ys), 20, 200, 0.001, 100, skip=1, tsv_path=path, progress=False)
    assert [r["idx"] for r in rows] == list(range(6))
    assert [r["predict"] for r in rows[:3]] == [1, 1, 1]
    assert [r["correct"] for r in rows[:3]] == [1, 1, 0]
    # the boundary points must abstain
    assert all(r["predict"] == ABSTAIN and r["radius"] == 0.0 for r in rows[3:])
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    assert len(lines) == 7 and lines[1].split("\t")[:3] == ["0", "1", "1"]
    # distance of the all-0.95 image to the plane sum = 2 is 1.8 / 2 = 0.9 >> radius; with n=200
    # and sigma=0.1 the radius is 0.1 * Phi^-1(0.001^(1/200))
    assert math.isclose(rows[0]["radius"], 0.1 * norm.ppf(0.001 ** (1 / 200)), rel_tol=1e-3)
    skipped = certify_dataset(smooth, (xs, ys), 20, 50, 0.001, 100, skip=2, max_examples=2, progress=False)
    assert [r["idx"] for r in skipped] == [0, 2]


def test_certified_accuracy_hand_computed():
    rows = [
        {"radius": 0.0, "correct": 0},
        {"radius": 0.3, "correct": 1},
        {"radius": 0.6, "correct": 1},
        {"radius": 0.9, "correct": 0},
    ]
    assert certified_accuracy(rows, [0.0, 0.3, 0.5, 0.7]) == [0.5, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        certified_accuracy([], [0.0])


# ---------------------------------------------------------------- the mixed classifier over a smoothed h

from adasmooth.attacks import PGD  # noqa: E402
from adasmooth.certify import rs_radius, simultaneous_bounds, smoothing_lipschitz  # noqa: E402
from adasmooth.certify.mixed import (  # noqa: E402
    SmoothingCounts,
    choose_alpha,
    cohen_certificates,
    collect_counts,
    curve,
    mixed_certificates,
    pareto_frontier,
)
from adasmooth.mixing.fixed import MixedClassifier  # noqa: E402


def _hand_counts():
    counts = SmoothingCounts(sigma=0.5, n0=10, n=100)
    # input 0: h sure of class 0 (label 0); input 1: h leans to 1 (label 1); input 2: h wrong (label 2)
    for i, (sel, est, g, label) in enumerate([
        ([10, 0, 0], [95, 3, 2], [0.0, 5.0, 0.0], 0),
        ([2, 8, 0], [30, 60, 10], [0.0, 5.0, 0.0], 1),
        ([9, 1, 0], [70, 10, 20], [0.0, 0.0, 5.0], 2),
    ]):
        counts.idx.append(i)
        counts.labels.append(label)
        counts.selection.append(np.array(sel))
        counts.estimation.append(np.array(est))
        counts.std_logits.append(np.array(g))
        counts.seconds.append(0.1)
    return counts


def test_mixed_certificates_hand_computed():
    counts = _hand_counts()
    certs = mixed_certificates(counts, 0.8, 0.01)
    lower, upper = simultaneous_bounds(95, np.array([3, 2]), 100, 0.01)
    assert math.isclose(certs["p_lower"][0], float(lower)) and math.isclose(certs["p_other_upper"][0], float(upper))
    expected = 0.25 * (norm.ppf(0.8 * lower) - norm.ppf(0.8 * upper + 0.2))
    assert math.isclose(certs["radius_rs"][0], expected, rel_tol=1e-9)
    lip = smoothing_lipschitz(0.5)
    assert math.isclose(certs["radius_lip"][0], (0.8 * (lower - upper) - 0.2) / (2 * 0.8 * lip), rel_tol=1e-9)
    assert certs["h_class"].tolist() == [0, 1, 0]
    assert certs["certified_correct"].tolist() == [True, True, False]
    # clean prediction mixes g's softmax with h's frequencies: input 0 -> 0.2*softmax([0,5,0]) + 0.8*[.95,.03,.02]
    assert certs["predict"].tolist() == [0, 1, 0]
    # g rescues input 2 at alpha 0.3 (the certificate is then empty)
    low_alpha = mixed_certificates(counts, 0.3, 0.01)
    assert low_alpha["predict"][2] == 2 and (low_alpha["radius_rs"] == 0).all()
    # hardmax g (Appendix A.2) changes the clean prediction, never the radii
    hard = mixed_certificates(counts, 0.55, 0.01, std_hardmax=True)
    soft = mixed_certificates(counts, 0.55, 0.01)
    assert np.allclose(hard["radius_rs"], soft["radius_rs"]) and np.allclose(hard["radius_lip"], soft["radius_lip"])
    # curve: in % of inputs, positive radius and h's class right
    radii = [0.0, float(certs["radius_rs"][0]) + 1e-9]
    assert certs["radius_rs"][1] == 0.0  # 60/100 with alpha 0.8 is not enough margin
    assert curve(certs, radii, "rs") == pytest.approx([100 / 3, 0.0])


def test_mixed_alpha_one_is_h_alone_and_cohen_rows():
    counts = _hand_counts()
    certs = mixed_certificates(counts, 1.0, 0.01)
    assert certs["predict"].tolist() == [0, 1, 0]
    lower, upper = certs["p_lower"], certs["p_other_upper"]
    assert np.allclose(certs["radius_rs"], rs_radius(torch.tensor(lower), torch.tensor(upper), 0.5, 1.0).numpy())
    rows = cohen_certificates(counts, 0.001)
    pa = beta.ppf(0.001, 95, 6)
    assert rows[0]["predict"] == 0 and math.isclose(rows[0]["radius"], 0.5 * norm.ppf(pa), rel_tol=1e-9)
    assert rows[1]["predict"] == ABSTAIN  # 60/100 is not certainly above 1/2
    with pytest.raises(ValueError, match="g's outputs"):
        counts.std_logits.clear()
        mixed_certificates(counts, 0.9, 0.01)


def test_choose_alpha_and_frontier():
    counts = _hand_counts()
    # the mixture's clean accuracy: alpha 0.3 -> 3/3 (g fixes input 2), alpha >= 0.5 here -> 2/3
    assert choose_alpha(counts, 100.0, [0.5, 0.7, 0.9, 1.0]) is None
    assert choose_alpha(counts, 60.0, [0.5, 0.7, 0.9, 1.0]) == 1.0
    other = _hand_counts()
    other.sigma = 1.0
    front = pareto_frontier({0.5: counts, 1.0: other}, 0.5, [0.0, 0.5, 1.0], 0.01, [0.6, 0.8, 1.0])
    curves = [c["certified_accuracy"] for c in front["candidates"]]
    assert front["frontier"] == np.max(curves, axis=0).tolist()
    assert front["frontier"][1] >= front["baseline"]["certified_accuracy"][1]


def test_mixed_rs_certificate_holds_against_attacks_on_the_exact_mixture():
    """h = a smoothed half-space, whose smoothed probability is known in closed form:
    p_1(x) = Phi((w.x + b) / (sigma ||w||)). Radii certified from Monte Carlo counts (Theorem A.2,
    simultaneous bounds) are attacked with PGD on the exact mixture with an adversarial g."""
    gen = torch.Generator().manual_seed(11)
    sigma = 0.25
    w = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64)
    xs = torch.rand(12, 1, 3, 3, generator=gen, dtype=torch.float64)
    s = xs.flatten(1) @ w.flatten()
    b = float(-s.median())  # half the points on each side
    base = HalfSpace(w, b)

    class ExactSmoothed(nn.Module):
        def forward(self, x):
            z = (x.flatten(1) @ w.flatten().to(x.dtype) + b) / (sigma * w.norm())
            p1 = torch.special.ndtr(z).clamp(1e-12, 1 - 1e-12)
            return torch.stack([torch.log1p(-p1), torch.log(p1)], 1)

    class Adversarial(nn.Module):  # votes for the class h currently does not prefer
        def forward(self, x):
            return -30 * ExactSmoothed()(x)

    labels = (s + b > 0).long()
    counts = collect_counts(Smooth(base, 2, sigma, seed=0), (xs, labels), 50, 2000, 1000,
                            std_model=Adversarial(), progress=False)
    checked = 0
    for alpha in (0.6, 0.8, 1.0):
        certs = mixed_certificates(counts, alpha, 0.001)
        radius = torch.as_tensor(certs["radius_rs"])
        ok = radius > 0
        checked += int(ok.sum())
        mixture = MixedClassifier(Adversarial(), ExactSmoothed(), alpha)
        with torch.no_grad():
            before = mixture(xs).argmax(1)
        h_class = torch.as_tensor(certs["h_class"])
        assert (before[ok] == h_class[ok]).all()
        x_adv = PGD(mixture, radius * 0.999, "l2", steps=40, restarts=2, loss="margin", seed=0)(xs, before)
        with torch.no_grad():
            after = mixture(x_adv).argmax(1)
        assert (after[ok] == before[ok]).all()
        # sanity: far outside the radius the attack does flip
        x_far = PGD(mixture, radius * 4 + 0.05, "l2", steps=40, loss="margin", seed=0)(xs, before)
        with torch.no_grad():
            assert (mixture(x_far).argmax(1)[ok] != before[ok]).any()
    assert checked >= 6
