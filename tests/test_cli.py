"""The command line end to end on tiny data: train-base twice, sweep, demo, and bad-input errors."""

from __future__ import annotations

import csv
import json

import pytest

from adasmooth.models.checkpoint import read_sidecar, save_checkpoint
from adasmooth.cli import main
from adasmooth.models.base import create_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPS = 0.2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-ckpt")
    common = ["--dataset", "digits", "--epochs", "2", "--eps", str(EPS), "--attack-steps", "3",
              "--eval-examples", "30", "--no-progress", "--config"]
    cfg = out / "train.yaml"
    cfg.write_text("model_kwargs: {width: 8}\neval_pgd_steps: 3\n")
    assert main(["train-base", "--method", "standard", "--output", str(out / "std"), *common, str(cfg)]) == 0
    assert main(["train-base", "--method", "pgd", "--output", str(out / "rob"), *common, str(cfg)]) == 0
    return out / "std", out / "rob"


def test_sweep_end_to_end(checkpoints, tmp_path, capsys):
    std, rob = checkpoints
    out = tmp_path / "sweep"
    rc = main(["sweep", "--std", str(std), "--rob", str(rob), "--alphas", "0:1:0.5", "--n-examples", "60",
               "--steps", "4", "--variants", "prob,logit", "--batch-size", "32", "--output", str(out),
               "--no-progress", "--seed", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mix_attack_acc" in printed and str(out / "sweep.json") in printed

    payload = json.loads((out / "sweep.json").read_text())
    assert set(payload) >= {"results", "config", "seed", "provenance"}
    assert payload["seed"] == 5
    cfg = payload["config"]
    # defaults taken from the checkpoints' sidecars: data set, and eps / norm of the robust model
    assert cfg["dataset"] == "digits" and cfg["eps"] == EPS and cfg["norm"] == "linf"
    assert cfg["alphas"] == [0.0, 0.5, 1.0] and cfg["variants"] == ["prob", "logit"]
    results = payload["results"]
    assert results["status"] == "complete" and results["n_examples"] == 60
    rows, ref = results["rows"], results["reference"]
    assert [(r["alpha"], r["variant"]) for r in rows] == [(a, v) for a in (0.0, 0.5, 1.0) for v in ("prob", "logit")]
    for r in rows:
        if r["alpha"] == 0.0:
            assert r["clean_acc"] == ref["g_clean_acc"] and r["std_attack_acc"] == ref["g_std_attack_acc"]
        if r["alpha"] == 1.0:
            assert r["clean_acc"] == ref["h_clean_acc"] and r["rob_attack_acc"] == ref["h_rob_attack_acc"]

    with (out / "sweep.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert [float(r["mix_attack_acc"]) for r in csv_rows] == pytest.approx([r["mix_attack_acc"] for r in rows])
    for name in ("accuracy_vs_alpha.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_demo_with_tiny_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--epochs", "1", "--n-examples", "50", "--alphas", "0,0.6,1", "--variants", "prob",
               "--width", "8", "--steps", "3", "--output", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"Results in {out.resolve()}" in printed
    for name in ("std.safetensors", "std.json", "rob.safetensors", "rob.json", "sweep.json", "sweep.csv"):
        assert (out / name).is_file(), name
    for name in ("accuracy_vs_alpha.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert read_sidecar(out / "rob")["training"]["method"] == "pgd"
    assert read_sidecar(out / "std")["training"]["method"] == "standard"
    payload = json.loads((out / "sweep.json").read_text())
    assert len(payload["results"]["rows"]) == 3 and payload["config"]["eps"] == 0.2


def _fails(argv, capsys, *fragments):
    """Exit code 2 and each fragment in the message: from our checks, or from argparse (which exits)."""
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code
    assert rc == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_sweep_bad_input(checkpoints, tmp_path, capsys):
    std, rob = map(str, checkpoints)
    out = str(tmp_path / "never")
    base = ["sweep", "--std", std, "--rob", rob, "--output", out, "--no-progress"]
    _fails([*base, "--dataset", "no-such-set"], capsys, "unknown data set", "no-such-set")
    _fails([*base, "--alphas", "0,1.5"], capsys, "alpha", "1.5")
    _fails(["sweep", "--std", str(tmp_path / "nope"), "--rob", rob, "--output", out], capsys,
           "not found", "nope.safetensors")
    _fails([*base, "--variants", "prob,softmax"], capsys, "softmax")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("alphas: [0.0, 1.0]\nnum_steps: 10\n")
    _fails([*base, "--config", str(cfg)], capsys, "unknown key", "num_steps")
    _fails(["sweep", "--output", out], capsys, "--std", "--rob")
    assert not (tmp_path / "never").exists()


def test_sweep_refuses_checkpoints_that_cannot_be_mixed(checkpoints, tmp_path, capsys):
    std, rob = map(str, checkpoints)
    three = create_model("small-cnn", 3, in_channels=1, width=8)
    save_checkpoint(three, tmp_path / "three", {"dataset": "digits"})
    _fails(["sweep", "--std", std, "--rob", str(tmp_path / "three"), "--output", str(tmp_path)], capsys,
           "class count", "10", "3")
    other = create_model("small-cnn", 10, in_channels=1, width=8)
    save_checkpoint(other, tmp_path / "other", {"dataset": "mnist"})
    _fails(["sweep", "--std", std, "--rob", str(tmp_path / "other"), "--output", str(tmp_path)], capsys,
           "different data sets", "digits", "mnist")


def test_demo_bad_input(tmp_path, capsys):
    _fails(["demo", "--dataset", "cifar10", "--output", str(tmp_path)], capsys, "cifar10")
    _fails(["demo", "--alphas=-0.5,0.5", "--output", str(tmp_path)], capsys, "alpha")
    _fails(["demo", "--epochs", "0", "--output", str(tmp_path)], capsys, "epochs")
