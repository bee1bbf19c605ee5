"""Long runs survive a SIGKILL (the journal), and results do not depend on how inputs are split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adasmooth.core.journal import journal_path
from adasmooth.models.checkpoint import save_checkpoint

from digits_models import train_digits_model


@pytest.fixture(scope="module")
def rob(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    save_checkpoint(train_digits_model(adversarial=True, epochs=4, seed=0), folder / "rob",
                    {"dataset": "digits", "metrics": {"eval_eps": 0.1, "eval_norm": "linf"}})
    return folder / "rob"


def evaluate_cmd(rob: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adasmooth", "evaluate", "--model", str(rob), "--attacks", "pgd,apgd-ce",
            "--n-examples", "120", "--batch-size", "10", "--no-progress", "-o", str(out), *extra]


def outcomes(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]["examples"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_evaluate_killed_mid_run_resumes_to_the_same_result(rob, tmp_path):
    full = tmp_path / "full.json"
    subprocess.run(evaluate_cmd(rob, full), check=True, env=env(), capture_output=True)
    out = tmp_path / "killed.json"
    journal = journal_path(out)
    proc = subprocess.Popen(evaluate_cmd(rob, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 3:  # header + two finished batches
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(journal.read_text().splitlines()) - 1
    assert 2 <= done_before < 12
    partial = json.loads(out.read_text())["results"]
    assert partial["summary"]["complete"] is False and len(partial["examples"]) < 120
    resumed = subprocess.run(evaluate_cmd(rob, out), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert outcomes(out) == outcomes(full)
    assert not journal.exists()


def test_a_changed_config_refuses_to_resume_unless_restarting(rob, tmp_path):
    out = tmp_path / "e.json"
    journal = journal_path(out)
    journal.write_text(json.dumps({"format": "adasmooth-journal", "config": {"eps": 0.3}}) + "\n"
                       + json.dumps({"records": [{"index": 0}]}) + "\n")
    refused = subprocess.run(evaluate_cmd(rob, out), env=env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "--restart" in refused.stderr and "different config" in refused.stderr
    restarted = subprocess.run(evaluate_cmd(rob, out, "--restart"), env=env(), capture_output=True, text=True)
    assert restarted.returncode == 0, restarted.stderr
    assert len(outcomes(out)) == 120


def test_an_inputs_smoothing_counts_do_not_depend_on_the_others(rob):
    """Noise is seeded from (seed, example index): certifying input 7 alone, or after inputs 0-6, or on
    another process, gives the same counts (what sharding and resuming rely on)."""
    from adasmooth.certify.mixed import collect_counts
    from adasmooth.certify.smoothing import Smooth
    from adasmooth.data import load_dataset
    from adasmooth.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(rob)
    data = load_dataset("digits", "test").subset(8)
    all_in_order = collect_counts(Smooth(model, 10, 0.25, seed=3), data, 10, 200, 64, progress=False)
    alone = Smooth(model, 10, 0.25, seed=3).selection_and_estimation_counts(data.x[7], 10, 200, 64, index=7)
    assert all_in_order.idx[7] == 7
    assert (all_in_order.selection[7] == alone[0]).all() and (all_in_order.estimation[7] == alone[1]).all()
    other_seed = Smooth(model, 10, 0.25, seed=4).selection_and_estimation_counts(data.x[7], 10, 200, 64, index=7)
    assert not (other_seed[1] == alone[1]).all()


def test_batch_size_does_not_change_any_outcome(rob):
    """Random starts are seeded per example: batches of 7 or 64 give the same per-example outcomes."""
    from adasmooth.data import load_dataset
    from adasmooth.evaluate.robustness import evaluate_robustness
    from adasmooth.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(rob)
    data = load_dataset("digits", "test").subset(64)
    runs = [evaluate_robustness(model, data, attacks=["pgd", "apgd-ce", "apgd-t"], eps=0.3, batch_size=b, seed=2,
                                progress=False, attack_options={"apgd_steps": 10, "pgd_steps": 5})
            for b in (7, 64)]
    assert runs[0].examples() == runs[1].examples()
    broken = sum(not r["worst_case_robust"] for r in runs[0].examples() if r["clean_correct"])
    assert broken > 0, "no input was broken: the comparison would say nothing"


def test_torchrun_two_processes_give_the_single_process_outcomes(rob, tmp_path):
    """`torchrun --nproc-per-node 2 -m adasmooth evaluate` (gloo): each rank takes a strided share, rank 0
    writes one result file whose per-example outcomes equal a single process's."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    cmd = ["evaluate", "--model", str(rob), "--attacks", "pgd,apgd-ce", "--n-examples", "30", "--batch-size", "8",
           "--eps", "0.2", "--no-progress", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "adasmooth", *cmd, "-o", str(one)], check=True, env=env(),
                   capture_output=True)
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000), "-m", "adasmooth", *cmd, "-o", str(two)],
                         env=env(), capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "2 processes" in ran.stdout
    assert outcomes(one) == outcomes(two)
    assert any(e["clean_correct"] and not e["worst_case_robust"] for e in outcomes(one)), "nothing broken: vacuous"
