"""The sweep's plots say what was attacked, how and on how many images, label alpha, keep reference labels
apart and draw 95 % Wilson intervals; the interval itself against hand-derived values."""

import pytest

from adasmooth.evaluate import plots
from adasmooth.evaluate.plots import describe_attack, plot_accuracy_vs_alpha, plot_tradeoff, wilson_interval

ALPHAS = [0.0, 0.5, 1.0]
# clean accuracy not monotone in alpha (0.5 is the most accurate), as on digits
ROWS = [
    {"variant": v, "alpha": a, "clean_acc": c, "std_attack_acc": 1.0 + 40 * a, "rob_attack_acc": 45.0,
     "mix_attack_acc": m, "worst_attack_acc": m}
    for v in ("prob", "logit") for a, c, m in zip(ALPHAS, (96.0, 97.0, 90.0), (0.0, 20.0, 44.0))
]
# g and h equally accurate: their clean reference lines coincide
REFERENCE = {"g_clean_acc": 96.0, "h_clean_acc": 96.0, "g_std_attack_acc": 0.0, "h_rob_attack_acc": 44.0}


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, caught before they are closed."""
    figures = []
    save = plots.save_figure

    def keep(fig, path, *args, **kwargs):
        figures.append(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_wilson_interval_matches_hand_derived_values():
    # n = 10, z = 1.959964: 0 of 10 -> [0, z^2/n / (1 + z^2/n)] = [0, 0.27753]; 5 of 10 -> 0.5 -/+ 0.26340
    lo, hi = wilson_interval(0.0, 10)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(27.753, abs=1e-3)
    lo, hi = wilson_interval(50.0, 10)
    assert (lo, hi) == (pytest.approx(23.659, abs=1e-3), pytest.approx(76.341, abs=1e-3))
    lo, hi = wilson_interval(100.0, 10)
    assert hi == pytest.approx(100.0) and lo == pytest.approx(72.247, abs=1e-3)
    # more examples, narrower interval; the interval contains the estimate
    assert wilson_interval(90.0, 1000)[1] - wilson_interval(90.0, 1000)[0] < wilson_interval(90.0, 100)[1] - \
        wilson_interval(90.0, 100)[0]
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(50.0, 0)
    with pytest.raises(ValueError, match="accuracy"):
        wilson_interval(101.0, 10)


def test_accuracy_vs_alpha_names_attack_and_n_and_draws_bands(drawn, tmp_path):
    plot_accuracy_vs_alpha(ROWS, REFERENCE, tmp_path / "a.png", attack=describe_attack(20, "linf", 0.2),
                           n_examples=360)
    ax = drawn[0].axes[0]
    title = ax.get_title()
    for words in ("PGD-20", "linf", "eps=0.2", "n = 360", "95 %"):
        assert words in title
    assert len(ax.collections) == 4  # one interval band per curve
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    # the clean band runs from the lower bound at 90 % to the upper bound at 97 %
    assert band.min() == pytest.approx(wilson_interval(90.0, 360)[0])
    assert band.max() == pytest.approx(wilson_interval(97.0, 360)[1])
    # the two coinciding clean reference lines get labels apart by more than a 7-point line of text
    # (2.7 % of this 104-point-high axis)
    labels = {t.get_text(): t for t in ax.texts}
    g, h = labels["g clean 96.0"], labels["h clean 96.0"]
    low, high = ax.get_ylim()
    assert abs(g.xyann[1] - h.xyann[1]) > 0.04 * (high - low)
    assert g.xy[1] == h.xy[1] == 96.0  # each still points at its line


def test_tradeoff_labels_alpha_in_order_with_error_bars(drawn, tmp_path):
    plot_tradeoff(ROWS, tmp_path / "t.png", REFERENCE, attack=describe_attack(10, "l2", 0.5), n_examples=100)
    ax = drawn[0].axes[0]
    title = ax.get_title()
    for words in ("PGD-10", "l2", "eps=0.5", "n = 100", "alpha"):
        assert words in title
    assert "MIX-attacked" in ax.get_ylabel()
    # every alpha is written at its point (shared points once), and each curve runs in alpha order
    texts = _texts(ax)
    assert {"0", "0.5", "1"} <= set(texts)
    curve = next(line for line in ax.lines if line.get_label() == "prob")
    assert list(curve.get_xdata()) == [96.0, 97.0, 90.0]
    point = next(t for t in ax.texts if t.get_text() == "0.5")
    assert tuple(point.xy) == (97.0, 20.0)
    # error bars: the y bar at alpha = 1 spans the Wilson interval of 44 % on 100 images
    lo, hi = wilson_interval(44.0, 100)
    spans = [seg for c in ax.collections if hasattr(c, "get_segments") for seg in c.get_segments() if len(seg) == 2]
    assert any(seg[0][0] == pytest.approx(90.0) and seg[0][0] == seg[1][0]
               and sorted((seg[0][1], seg[1][1])) == [pytest.approx(lo), pytest.approx(hi)] for seg in spans)


def test_plots_without_n_still_draw(drawn, tmp_path):
    """Without n_examples (as older callers call them): no intervals, title from the caller."""
    plot_accuracy_vs_alpha(ROWS, REFERENCE, tmp_path / "a.png", title="my title")
    plot_tradeoff(ROWS, tmp_path / "t.png", REFERENCE)
    assert drawn[0].axes[0].get_title() == "my title" and not drawn[0].axes[0].collections
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
