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
import torch

from adasmooth.core.journal import journal_path
from adasmooth.models.checkpoint import save_checkpoint

from digits_models import save_smoothing_checkpoints, train_digits_model


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


def kill_when_journaled(cmd: list[str], journal: Path, lines: int = 3) -> int:
    """Start ``cmd``, SIGKILL it once its journal has ``lines`` lines (header + finished work); the
    number of work lines the journal then holds. Fails if the run ended before it could be killed."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(journal.read_text().splitlines()) - 1


def test_evaluate_killed_mid_run_resumes_to_the_same_result(rob, tmp_path):
    full = tmp_path / "full.json"
    subprocess.run(evaluate_cmd(rob, full), check=True, env=env(), capture_output=True)
    out = tmp_path / "killed.json"
    journal = journal_path(out)
    done_before = kill_when_journaled(evaluate_cmd(rob, out), journal)  # header + two finished batches
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


def test_counts_of_chosen_indices_equal_those_of_a_full_pass(rob):
    """collect_counts(indices=...) counts exactly those data-set inputs, in the order given (what a
    rank's share or a resumed run's pending inputs are), with the counts a full pass gives them."""
    from adasmooth.certify.mixed import collect_counts, counts_from_records, count_inputs
    from adasmooth.certify.smoothing import Smooth
    from adasmooth.data import load_dataset
    from adasmooth.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(rob)
    data = load_dataset("digits", "test").subset(9)
    full = collect_counts(Smooth(model, 10, 0.5, seed=1), data, 10, 300, 100, std_model=model, progress=False)
    part = collect_counts(Smooth(model, 10, 0.5, seed=1), data, 10, 300, 100, std_model=model, progress=False,
                          indices=[8, 2, 5])
    assert part.idx == [8, 2, 5] and part.labels == [int(data.y[i]) for i in (8, 2, 5)]
    for k, i in enumerate(part.idx):
        assert (part.estimation[k] == full.estimation[i]).all() and (part.selection[k] == full.selection[i]).all()
        assert (part.std_logits[k] == full.std_logits[i]).all()
    # records through JSON (as a journal holds them) rebuild the same counts
    records = []
    count_inputs({0.5: Smooth(model, 10, 0.5, seed=1)}, (data.x, data.y), 10, 300, 100, std_model=model,
                 indices=[8, 2, 5], progress=False, on_input=lambda record, _: records.append(record))
    rebuilt = counts_from_records(json.loads(json.dumps(records, default=lambda a: a.tolist())), [0.5], 10, 300)[0.5]
    assert rebuilt.idx == part.idx
    for name in ("selection", "estimation", "std_logits"):
        assert all((a == b).all() for a, b in zip(getattr(rebuilt, name), getattr(part, name)))
    assert not (full.estimation[8] == full.estimation[2]).all()


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


# ---------------------------------------------------------------- certify


def certify_args(ckpts: dict, *extra: str) -> list[str]:
    """-N, not --n: torchrun's own parser refuses --n (ambiguous with its --nnodes, --nproc-per-node).
    About 40 ms an input, so a kill after two inputs lands well before the end."""
    return ["certify", "--model", ckpts["h25"], ckpts["h50"], "--std", ckpts["g"], "--alpha", "0.6,0.9",
            "--n0", "20", "-N", "20000", "--batch-size", "1000", "--n-examples", "40", "--skip", "3",
            "--alpha-conf", "0.01", "--radii", "0,0.1,0.2,0.3,0.5", "--no-progress", "--device", "cpu", *extra]


def certify_cmd(ckpts: dict, prefix: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adasmooth", *certify_args(ckpts, *extra), "-o", str(prefix)]


TIMING = ("seconds", "noisy_samples_per_second", "images_per_second")


def certificates(prefix: Path) -> dict:
    """Everything a certify run concludes about its inputs, without the timings: the result JSON's
    curves and frontier, the Cohen TSVs minus their time column, the mixed TSVs, the counts."""
    results = json.loads(Path(f"{prefix}.json").read_text())["results"]
    files = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}_sigma*")):
        if path.suffix == ".tsv":
            rows = [line.split("\t") for line in path.read_text().splitlines()]
            files[path.name[len(prefix.name):]] = [r[:-1] for r in rows] if rows[0][-1] == "time" else rows
        elif path.name.endswith("_counts.json"):
            counts = json.loads(path.read_text())
            files[path.name[len(prefix.name):]] = {k: v for k, v in counts.items() if k != "seconds"}
    return {"models": [{k: v for k, v in m.items() if k not in TIMING} for m in results["models"]],
            "frontier": results.get("frontier"), "files": files}


@pytest.fixture(scope="module")
def smoothing(tmp_path_factory):
    return save_smoothing_checkpoints(tmp_path_factory.mktemp("smoothing"))


@pytest.fixture(scope="module")
def certified_once(smoothing, tmp_path_factory):
    """The certificates of one uninterrupted single-process run of ``certify_args``."""
    prefix = tmp_path_factory.mktemp("certified_once") / "run"
    subprocess.run(certify_cmd(smoothing, prefix), check=True, env=env(), capture_output=True)
    return certificates(prefix)


def test_certify_killed_mid_run_resumes_to_the_same_result(smoothing, certified_once, tmp_path):
    out = tmp_path / "run"
    journal = journal_path(f"{out}.json")
    done_before = kill_when_journaled(certify_cmd(smoothing, out), journal)  # header + two inputs
    assert 2 <= done_before < 40
    assert not Path(f"{out}.json").exists(), "the killed run had finished"
    resumed = subprocess.run(certify_cmd(smoothing, out), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done_before} of 40 inputs already done" in resumed.stdout
    expected = certified_once
    assert certificates(out) == expected
    assert len(expected["files"]) == 2 * (1 + 1 + 2)  # per sigma: Cohen TSV, counts, two mixed TSVs
    assert [int(r[0]) for r in expected["files"]["_sigma0.25.tsv"][1:]] == list(range(0, 120, 3))
    assert not journal.exists() and not list(journal.parent.glob(journal.name + ".*"))


def test_certify_changed_counting_config_refuses_to_resume_unless_restarting(smoothing, tmp_path, capsys):
    from adasmooth.cli import main

    out = tmp_path / "run"
    journal = journal_path(f"{out}.json")
    kill_when_journaled(certify_cmd(smoothing, out), journal)
    kept = journal.read_text()
    capsys.readouterr()
    # the later runs in this process: no comparison with another process's numbers is made below
    assert main([*certify_args(smoothing, "--n", "3000"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--restart" in err and "differs in: n" in err and len(err.strip().splitlines()) == 1
    assert journal.read_text() == kept  # a refused run leaves the journal alone
    # the certificates are computed from the journaled counts at the end: other alphas and radii resume
    assert main([*certify_args(smoothing, "--alpha", "0.8", "--radii", "0,0.25"), "-o", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    results = json.loads(Path(f"{out}.json").read_text())["results"]
    assert results["radii"] == [0, 0.25] and [m["alpha"] for m in results["models"][0]["mixed"]] == [0.8]
    journal.write_text(kept)
    assert main([*certify_args(smoothing, "--n", "3000", "--restart"), "-o", str(out)]) == 0
    assert "resuming" not in capsys.readouterr().out
    results = json.loads(Path(f"{out}.json").read_text())["results"]
    assert results["n"] == 3000 and [m["examples"] for m in results["models"]] == [40, 40]
    assert not journal.exists()


def test_certify_batch_size_changes_no_draw_so_a_run_may_resume_with_another():
    """An input's noise comes in seeded blocks of draws: batches of 7, 100, 300 or all draws at once give
    the same predictions (a block a batch cuts is drawn whole and sliced); another input index or seed
    draws other values."""
    from adasmooth.certify.smoothing import NOISE_BLOCK, Smooth
    from adasmooth.cli.certify import NOT_JOURNAL_FIELDS

    def first_pixels(x):  # scores that follow the noise: any other draw gives other classes
        return x.flatten(1)[:, :10]

    x = torch.full((3, 5, 5), 0.5)
    smooth = Smooth(first_pixels, 10, 0.5, seed=1)
    num = 3 * NOISE_BLOCK + 45  # batch sizes that cut blocks, match them, and cover several
    draws = [smooth.sample_predictions(x, num, b, index=3) for b in (7, NOISE_BLOCK, 300, num)]
    assert all(torch.equal(draws[0], d) for d in draws[1:])
    assert not torch.equal(draws[0], smooth.sample_predictions(x, num, 50, index=4))
    assert not torch.equal(draws[0], Smooth(first_pixels, 10, 0.5, seed=2).sample_predictions(x, num, 50, index=3))
    assert "batch_size" in NOT_JOURNAL_FIELDS


def test_torchrun_two_processes_certify_like_one(smoothing, certified_once, tmp_path):
    """`torchrun --nproc-per-node 2 -m adasmooth certify` (gloo): each rank counts a strided share, rank 0
    writes the files; every certificate (Cohen, mixed at two alphas, the frontier) equals one process's."""
    two = tmp_path / "run"
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + (os.getpid() + 500) % 1000), "-m", "adasmooth",
                          *certify_args(smoothing), "-o", str(two)], env=env(), capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "2 processes" in ran.stdout
    expected = certified_once
    assert certificates(two) == expected
    assert not list(two.parent.glob("*.journal*"))
    cohen = [r for name, rows in expected["files"].items() if name.endswith(".tsv") and "mixed" not in name
             for r in rows[1:]]
    radius = [float(r[3]) for r in cohen]
    assert any(r > 0 for r in radius) and any(r == 0 for r in radius), "all or no inputs certified: vacuous"
    mixed = [r for name, rows in expected["files"].items() if "mixed" in name for r in rows[1:]]
    assert any(float(r[7]) > 0 for r in mixed) and any(float(r[7]) == 0 for r in mixed)
