"""Training-free calibration of the MixedNUTS rule: the objective by hand, a planted optimum, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adasmooth.cli import main
from adasmooth.core.errors import ConfigError, InputError
from adasmooth.evaluate.calibrate import CalibrateConfig
from adasmooth.evaluate.mixednuts import calibrate_nonlinear_to_accuracy, grid_search_nonlinear, nonlinear_grid, probability_margins, spca_objective
from adasmooth.mixing.fixed import load_fixed_mixture
from adasmooth.mixing.nonlinear import nonlinear_params_of
from adasmooth.models.checkpoint import save_checkpoint


def test_objective_cutoff_and_alpha_by_hand():
    attacked = np.array([0.02, 0.1, 0.2, 0.3, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0, 1.0])
    # (100 - 90) = 10th percentile of 11 sorted values, linear interpolation: rank 1.0 -> 0.1
    objective, cutoff, alpha = spca_objective(attacked, np.array([0.05, 0.1, 0.4, 0.7]), beta=90)
    assert cutoff == pytest.approx(0.1)
    assert alpha == pytest.approx(1 / 1.1)
    assert objective == pytest.approx(3 / 4)  # 0.1, 0.4 and 0.7 reach the cutoff
    # every margin at 1: the cutoff stays just below 1, alpha just above 1/2
    _, cutoff, alpha = spca_objective(np.ones(5), np.array([1.0]), beta=50)
    assert cutoff < 1 and alpha == pytest.approx(0.5)
    with pytest.raises(InputError):
        spca_objective(np.array([]), np.array([0.5]), 98.5)


def test_grid_is_log_spaced_in_s():
    ss, cs, ps = nonlinear_grid(8)
    assert ss[0] == pytest.approx(0.05) and ss[-1] == pytest.approx(5.0)
    np.testing.assert_allclose(np.diff(np.log(ss)), np.log(100) / 7)
    np.testing.assert_allclose(cs, np.linspace(-1.1, 0, 8))
    with pytest.raises(ConfigError):
        nonlinear_grid(8, s_range=(0.0, 1.0))


def test_grid_search_recovers_a_planted_optimum():
    grid = nonlinear_grid(4, (0.1, 10.0), (-1.0, 0.5), (1.0, 4.0))
    planted = (float(grid[0][2]), float(grid[1][1]), float(grid[2][3]))
    rng = np.random.default_rng(0)
    attacked = rng.uniform(0.3, 1.0, size=200)

    def margins(s, c, p):
        # clean errors sit below every cutoff only at the planted point; elsewhere some reach it,
        # more the further the point is from the plant
        distance = abs(np.log(s / planted[0])) + abs(c - planted[1]) + abs(p - planted[2])
        wrong = np.full(50, 0.01)
        wrong[: int(min(50, 5 + 10 * distance)) if distance > 0 else 0] = 0.99
        return attacked, wrong

    fit = grid_search_nonlinear(None, None, grid, beta=98.5, margins=margins)
    assert (fit["s"], fit["c"], fit["p"]) == pytest.approx(planted)
    assert fit["objective"] == 0.0
    assert fit["alpha"] == pytest.approx(1 / (1 + np.percentile(attacked, 1.5)))


def test_target_accuracy_fit_reaches_the_target():
    rng = np.random.default_rng(2)
    n = 400
    y = torch.tensor(rng.integers(0, 10, n))
    onehot = torch.eye(10, dtype=torch.float64)[y]
    g = torch.randn(n, 10, dtype=torch.float64) + 4 * onehot * torch.tensor(rng.random(n) < 0.9)[:, None]
    h = torch.randn(n, 10, dtype=torch.float64) + 3 * onehot * torch.tensor(rng.random(n) < 0.6)[:, None]
    acc_g = 100 * (g.argmax(1) == y).double().mean().item()
    acc_h = 100 * (h.argmax(1) == y).double().mean().item()
    assert acc_g > acc_h + 10
    target = (acc_g + acc_h) / 2
    attacked = h[h.argmax(1) == y]
    fit = calibrate_nonlinear_to_accuracy(g, h, y, attacked, nonlinear_grid(2), target)
    assert fit["reached"] and fit["clean_acc"] >= target and 0 < fit["alpha"] < 1
    assert 0 <= fit["robust_share"] <= 100
    margins = probability_margins(attacked)
    assert margins.min() >= 0 and margins.max() <= 1


def test_config_needs_models_for_the_nonlinear_rule():
    with pytest.raises(ConfigError, match="mixnet"):
        CalibrateConfig(rule="nonlinear").validate()
    with pytest.raises(ConfigError, match="beta"):
        CalibrateConfig(rule="nonlinear", std="g", rob="h", beta=0).validate()
    CalibrateConfig(rule="nonlinear", std="g", rob="h").validate()  # no target: the beta fit alone


def test_calibrate_command_writes_a_loadable_nonlinear_mixture(tmp_path, std_digits_model, robust_model, capsys):
    save_checkpoint(std_digits_model, tmp_path / "g", {"dataset": "digits"})
    save_checkpoint(robust_model, tmp_path / "h", {"dataset": "digits"})
    rc = main(["calibrate", "--rule", "nonlinear", "--std", str(tmp_path / "g"), "--rob", str(tmp_path / "h"),
               "--eps", "0.1", "--split", "test", "--calib-examples", "100", "--grid-size", "2",
               "--margin-apgd-steps", "5", "--target-between", "0.5", "--no-progress", "-o", str(tmp_path / "mix")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "nonlinear (MixedNUTS)" in out and "beta 98.5" in out
    model, info = load_fixed_mixture(tmp_path / "mix")
    fit = info["calibration"]["at_target"]
    params = nonlinear_params_of(model)
    assert (params.s, params.c, params.p) == (fit["s"], fit["c"], fit["p"]) and model.alpha == fit["alpha"]
    results = json.loads((tmp_path / "mix.calibration.json").read_text())
    assert results["results"]["nonlinear"]["chosen"] == "at_target"
    assert len(results["results"]["nonlinear"]["beta_fit"]["objectives"]) == 2  # the 2 x 2 x 2 grid, kept
