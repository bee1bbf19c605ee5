"""``adasmooth evaluate`` end to end on tiny digits models."""

from __future__ import annotations

import json

import pytest

from adasmooth.models.checkpoint import save_checkpoint
from adasmooth.cli import main

from digits_models import train_digits_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    std = train_digits_model(adversarial=False, epochs=2, seed=1)
    rob = train_digits_model(adversarial=True, epochs=2, seed=0)
    save_checkpoint(std, folder / "std", {"dataset": "digits"})
    save_checkpoint(rob, folder / "rob", {"dataset": "digits"})
    return folder


def test_evaluate_fixed_mixture(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--std", str(checkpoints / "std"), "--rob", str(checkpoints / "rob"), "--alpha", "0.7",
               "--dataset", "digits", "--attacks", "pgd,A,B,std,rob,apgd-ce", "--n-examples", "30",
               "--batch-size", "16", "--eps", "0.1", "--seed", "3", "--no-progress", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("clean", "pgd", "std", "rob", "apgd-ce", "worst case"):
        assert name in printed
    payload = json.loads(out.read_text())
    assert payload["seed"] == 3
    results = payload["results"]
    examples = results["examples"]
    assert len(examples) == 30
    summary = results["summary"]
    assert summary["complete"] is True
    # the summary is exactly what the per-example outcomes say
    assert summary["clean_accuracy"] == pytest.approx(100 * sum(e["clean_correct"] for e in examples) / 30)
    for attack in ("pgd", "A", "B", "std", "rob", "apgd-ce"):
        robust = sum(bool(e["robust"][attack]) for e in examples)
        assert summary["robust_accuracy"][attack] == pytest.approx(100 * robust / 30)
    worst = sum(e["worst_case_robust"] for e in examples)
    assert summary["worst_case_accuracy"] == pytest.approx(100 * worst / 30)
    assert summary["worst_case_accuracy"] <= min(summary["robust_accuracy"].values())
    for e in examples:
        assert e["worst_case_robust"] == (e["broken_by"] == [])
    assert payload["config"]["alpha"] == 0.7


def test_evaluate_single_model_writes_partial_progress(checkpoints, tmp_path, monkeypatch):
    from adasmooth.evaluate import robustness

    out = tmp_path / "single.json"
    partial: list[dict] = []
    real = robustness.evaluate_robustness

    def capture_after_each_batch(*args, on_batch=None, **kwargs):
        def save_then_read(report):
            on_batch(report)
            partial.append(json.loads(out.read_text()))

        return real(*args, on_batch=save_then_read, **kwargs)

    monkeypatch.setattr(robustness, "evaluate_robustness", capture_after_each_batch)
    rc = main(["evaluate", "--model", str(checkpoints / "rob"), "--attacks", "apgd-ce,apgd-t", "--n-examples", "20",
               "--batch-size", "10", "--eps", "0.1", "--no-progress", "-o", str(out)])
    assert rc == 0
    final = json.loads(out.read_text())["results"]
    assert final["summary"]["complete"] is True
    assert len(final["examples"]) == 20
    # after the first batch the file held exactly its 10 finished examples, marked incomplete
    assert len(partial) == 2
    first = partial[0]["results"]
    assert first["summary"]["complete"] is False
    assert [e["index"] for e in first["examples"]] == list(range(10))
    assert first["examples"] == final["examples"][:10]
    assert first["summary"]["n"] == 10
    assert partial[1]["results"]["summary"]["complete"] is False  # still running until the loop ends
    assert all(set(e["robust"]) == {"apgd-ce", "apgd-t"} for e in final["examples"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attacks", "apgd-ce,no-such-attack-xyz"], "unknown attack"),
        (["--eps", "-0.5"], "eps must be a finite number >= 0 and <= 1"),
        (["--eps", "0.1", "--attacks", "D"], "needs a mixed classifier"),
        ([], "records no eps; give --eps"),
    ],
)
def test_evaluate_clear_errors(checkpoints, tmp_path, capsys, extra, message):
    rc = main(["evaluate", "--model", str(checkpoints / "rob"), "--n-examples", "4", "--no-progress",
               "-o", str(tmp_path / "x.json"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_evaluate_missing_mixnet_and_bad_combinations(checkpoints, tmp_path, capsys):
    rc = main(["evaluate", "--mixnet", str(tmp_path / "nothing"), "--n-examples", "4", "--no-progress"])
    assert rc == 2
    assert "not found" in capsys.readouterr().err
    rc = main(["evaluate", "--std", str(checkpoints / "std"), "--rob", str(checkpoints / "rob"), "--no-progress"])
    assert rc == 2
    assert "--alpha" in capsys.readouterr().err


def test_evaluate_refuses_data_of_another_data_set(checkpoints, tmp_path, capsys, data_dir):
    """The silent wrong result of old: a digits model run on Fashion-MNIST. Now an error naming both."""
    base = ["evaluate", "--model", str(checkpoints / "rob"), "--eps", "0.1", "--n-examples", "4", "--no-progress",
            "--data-dir", str(data_dir), "-o", str(tmp_path / "x.json")]
    assert main(base + ["--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "--dataset fashion-mnist" in err and "trained on digits" in err and err.count("\n") == 1
    # overriding the data set visibly still cannot run an 8x8 model on 28x28 images
    assert main(base + ["--dataset", "fashion-mnist", "--force-dataset"]) == 2
    err = capsys.readouterr().err
    assert "(1, 8, 8)" in err and "(1, 28, 28)" in err
    assert not (tmp_path / "x.json").exists()


def test_evaluate_output_may_not_overwrite_an_input(checkpoints, capsys):
    sidecar = checkpoints / "rob.json"
    before = sidecar.read_bytes()
    assert main(["evaluate", "--model", str(checkpoints / "rob"), "--eps", "0.1", "--n-examples", "4",
                 "--no-progress", "-o", str(sidecar)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert sidecar.read_bytes() == before
