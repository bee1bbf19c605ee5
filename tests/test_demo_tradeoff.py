"""The demo, with its default models, shows a trade-off: h is visibly less accurate than g, and a mixture
keeps most of h's robustness with more of g's accuracy; its plots name the attack and the image count.

Trains the demo's two digits models as the demo does (about 25 s of CPU) and sweeps three alphas only.
"""

import json

import pytest

from adasmooth.cli import main
from adasmooth.evaluate import plots
from adasmooth.evaluate.plots import wilson_interval


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    titles = []
    save = plots.save_figure

    def keep(fig, path, *args, **kwargs):
        titles.append(fig.axes[0].get_title())
        return save(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "save_figure", keep)
        assert main(["demo", "--quiet", "--alphas", "0,0.9,1", "--variants", "prob", "--output", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())["results"]
    return result, titles


def test_h_is_visibly_less_accurate_and_the_mixture_lies_between(demo_run):
    result, _ = demo_run
    ref, n = result["reference"], result["n_examples"]
    # "visibly": h's interval lies wholly below g's
    assert wilson_interval(ref["h_clean_acc"], n)[1] < wilson_interval(ref["g_clean_acc"], n)[0]
    assert ref["h_rob_attack_acc"] > ref["g_std_attack_acc"] + 20  # and h is the robust one
    mix = next(r for r in result["rows"] if r["alpha"] == 0.9)
    assert ref["h_clean_acc"] + 2 < mix["clean_acc"] <= ref["g_clean_acc"]
    assert mix["mix_attack_acc"] >= 0.75 * ref["h_rob_attack_acc"]  # most of h's robustness, white-box


def test_demo_plots_name_attack_norm_eps_and_n(demo_run):
    result, titles = demo_run
    assert len(titles) == 2
    for title in titles:
        for words in ("PGD-20", "linf", "eps=0.2", f"n = {result['n_examples']}"):
            assert words in title
