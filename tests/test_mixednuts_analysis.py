"""The nonlinear rule in the Table 1 analysis (transformed h) and in the alpha sweep."""

from __future__ import annotations

import torch

from adasmooth.evaluate.analysis import confidence_gap_table
from adasmooth.evaluate.sweep import alpha_sweep, variant_classifier
from adasmooth.mixing.nonlinear import NonlinearParams, TransformedModel, nonlinear_params_of

from digits_models import EPS

PARAMS = NonlinearParams(s=3.0, c=-0.5, p=3.0)


def test_gap_table_attacks_h_and_judges_the_transformed_h(robust_model, test_data):
    x, y = test_data[0][:40], test_data[1][:40]
    models = {"h": robust_model, "h (transformed)": TransformedModel(robust_model, PARAMS)}
    result = confidence_gap_table(models, x, y, EPS, settings=("clean", "pgd20"), progress=False)
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    for setting in ("clean", "pgd20"):
        # the same points (crafted on h) and the same ranking: the same accuracy, another gap
        assert rows[("h", setting)]["accuracy"] == rows[("h (transformed)", setting)]["accuracy"]
        assert result["raw"]["h"][setting]["correct"] == result["raw"]["h (transformed)"][setting]["correct"]
    assert rows[("h", "pgd20")]["accuracy"] < rows[("h", "clean")]["accuracy"]
    assert rows[("h", "clean")]["gap_correct_mean"] != rows[("h (transformed)", "clean")]["gap_correct_mean"]


def test_sweep_runs_the_nonlinear_variant_with_its_parameters(std_digits_model, robust_model):
    from adasmooth.data.base import load_dataset

    data = load_dataset("digits", "test").subset(48)
    mixed = variant_classifier(std_digits_model, robust_model, 0.5, "nonlinear", nonlinear=PARAMS)
    assert nonlinear_params_of(mixed) == PARAMS
    result = alpha_sweep(std_digits_model, robust_model, data, [0.0, 1.0], EPS, steps=3,
                         variants=["prob", "nonlinear"], nonlinear=PARAMS, progress=False)
    rows = {(r["variant"], r["alpha"]): r for r in result.rows}
    ref = result.reference
    # alpha 0: g's hardmax (same decisions as g); alpha 1: transformed h (same decisions as h)
    assert rows[("nonlinear", 0.0)]["clean_acc"] == ref["g_clean_acc"]
    assert rows[("nonlinear", 1.0)]["clean_acc"] == ref["h_clean_acc"]
    assert rows[("nonlinear", 1.0)]["rob_attack_acc"] == ref["h_rob_attack_acc"]
    # the MIX attack on the nonlinear mixture goes through the surrogate: it does break inputs of g
    assert rows[("nonlinear", 0.0)]["mix_attack_acc"] < rows[("nonlinear", 0.0)]["clean_acc"]
    assert torch.isfinite(torch.tensor([r["worst_attack_acc"] for r in result.rows])).all()
