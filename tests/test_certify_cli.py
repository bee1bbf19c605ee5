"""``adasmooth certify`` and ``adasmooth analyze`` end to end on tiny digits models."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm

from adasmooth.certify import certified_accuracy, rs_radius
from adasmooth.cli import main

from digits_models import save_smoothing_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_smoothing_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _read_tsv(path):
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_certify_cli_outputs_are_consistent(checkpoints, tmp_path):
    out = tmp_path / "cert" / "run"
    code = main(["certify", "--model", checkpoints["h25"], "--std", checkpoints["g"], "--alpha", "0.9",
                 "--n0", "20", "--n", "300", "--n-examples", "12", "--batch-size", "150", "--alpha-conf", "0.01",
                 "--radii", "0,0.1,0.2,0.3", "--output", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    header, rows = _read_tsv(tmp_path / "cert" / "run_sigma0.25.tsv")
    assert header == ["idx", "label", "predict", "radius", "correct", "time"]
    assert len(rows) == 12
    counts = json.loads((tmp_path / "cert" / "run_sigma0.25_counts.json").read_text())
    assert counts["n"] == 300 and len(counts["estimation"]) == 12
    assert all(sum(c) == 20 for c in counts["selection"]) and all(sum(c) == 300 for c in counts["estimation"])
    # every Cohen radius is sigma * Phi^-1(one-sided CP lower bound) of the saved counts
    for row, sel, est in zip(rows, counts["selection"], counts["estimation"]):
        cand = int(np.argmax(sel))
        k = est[cand]
        p_lower = beta.ppf(0.01, k, 300 - k + 1) if k > 0 else 0.0
        if p_lower < 0.5:
            assert int(row["predict"]) == -1 and float(row["radius"]) == 0.0
        else:
            assert int(row["predict"]) == cand
            assert math.isclose(float(row["radius"]), 0.25 * norm.ppf(p_lower), abs_tol=1e-4)
    result = json.loads((tmp_path / "cert" / "run.json").read_text())
    model = result["results"]["models"][0]
    parsed = [{"radius": float(r["radius"]), "correct": int(r["correct"])} for r in rows]
    expected = [100 * v for v in certified_accuracy(parsed, [0, 0.1, 0.2, 0.3])]
    assert model["cohen_certified_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert model["cohen_certified_accuracy"][1] > 0  # a trained smoothed model certifies something
    assert result["results"]["confidence"] == pytest.approx(0.99)
    assert "Bonferroni" in result["results"]["statistics"]
    assert result["config"]["n"] == 300 and result["seed"] == 0
    # the mixed TSV's radii follow Theorem A.2 from its own bounds
    header, mixed = _read_tsv(tmp_path / "cert" / "run_sigma0.25_mixed_alpha0.9.tsv")
    assert "radius_rs" in header and len(mixed) == 12
    for r in mixed:
        want = float(rs_radius(torch.tensor(float(r["p_lower"]), dtype=torch.float64), float(r["p_other_upper"]), 0.25, 0.9))
        assert math.isclose(float(r["radius_rs"]), want, abs_tol=2e-4)
    # with alpha 0.9 no radius can exceed sigma/2 * (Phi^-1(0.9) - Phi^-1(0.1))
    assert max(float(r["radius_rs"]) for r in mixed) <= 0.125 * 2 * norm.ppf(0.9) + 1e-6
    assert (tmp_path / "cert" / "run_curves.png").stat().st_size > 1000


def test_certify_cli_frontier_with_two_sigmas(checkpoints, tmp_path):
    out = tmp_path / "run"
    code = main(["certify", "--model", checkpoints["h25"], checkpoints["h50"], "--std", checkpoints["g"],
                 "--hardmax", "--n0", "10", "--n", "200", "--n-examples", "8", "--batch-size", "200",
                 "--radii", "0,0.25,0.5", "--output", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    result = json.loads((tmp_path / "run.json").read_text())["results"]
    for bound in ("rs", "lip"):
        front = result["frontier"][bound]
        assert front["baseline"]["sigma"] == 0.25
        for cand in front["candidates"]:
            assert cand["clean_accuracy"] >= front["target_clean_accuracy"] - 1e-9
        assert front["frontier"] == pytest.approx(np.max([c["certified_accuracy"] for c in front["candidates"]], 0))
        assert (tmp_path / f"run_frontier_{bound}.png").is_file()


def test_certify_cli_errors(checkpoints, tmp_path, capsys):
    assert main(["certify", "--model", checkpoints["g"], "--output", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "sigma" in capsys.readouterr().err
    assert main(["certify", "--model", checkpoints["h25"], "--alpha", "0.8", "--no-progress"]) == 2
    assert "--std" in capsys.readouterr().err
    assert main(["certify", "--model", checkpoints["h25"], "--alpha-conf", "2", "--no-progress"]) == 2


def test_analyze_cli_gap_and_lipschitz(checkpoints, tmp_path):
    out = tmp_path / "an"
    code = main(["analyze", "--std", checkpoints["g"], "--rob", checkpoints["h50"], "--eps", "0.1",
                 "--n-examples", "24", "--aa-steps", "10", "--lipschitz-steps", "5", "--alphas", "0.4,0.9,1",
                 "--output", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    res = json.loads((tmp_path / "an.json").read_text())["results"]
    rows = {(r["model"], r["setting"]): r for r in res["confidence_gap"]["rows"]}
    assert set(rows) == {(m, s) for m in ("g", "h") for s in ("clean", "pgd20", "autoattack")}
    for m in ("g", "h"):
        assert rows[(m, "pgd20")]["accuracy"] <= rows[(m, "clean")]["accuracy"]
    lip = res["lipschitz"]
    per_alpha = {r["alpha"]: r["robust_at_eps_pct"] for r in lip["per_alpha"]}
    assert per_alpha[0.4] == 0.0 and per_alpha[1.0] >= per_alpha[0.9]
    assert lip["mean_lipschitz_eq_c1"] >= 0
    assert (tmp_path / "an_gap.png").is_file() and (tmp_path / "an_lipschitz.png").is_file()
    assert main(["analyze", "--std", checkpoints["g"], "--what", "lipschitz", "--eps", "0.1", "--no-progress"]) == 2
