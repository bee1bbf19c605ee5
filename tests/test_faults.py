"""Faults lose nothing finished: a journal torn by a crash heals, two runs writing one output do not
both run (a lock that a killed run cannot leave stuck), and a diverging training run is one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adasmooth.cli import main
from adasmooth.core.errors import OutputError
from adasmooth.core.io import output_lock
from adasmooth.core.journal import Journal, journal_path

from digits_models import save_smoothing_checkpoints

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_smoothing_checkpoints(tmp_path_factory.mktemp("faults"))


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def evaluate_cmd(model: str, out: Path, n: int = 120) -> list[str]:
    return [sys.executable, "-m", "adasmooth", "evaluate", "--model", model, "--eps", "0.1", "--norm", "linf",
            "--attacks", "pgd,apgd-ce", "--n-examples", str(n), "--batch-size", "10", "--no-progress",
            "-o", str(out)]


def outcomes(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]["examples"]


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {what}: make it longer"
    assert condition(), f"timed out waiting for {what}"


def journal_lines(journal: Path) -> int:
    return len(journal.read_bytes().splitlines()) if journal.is_file() else 0


def tear_last_line(path: Path) -> int:
    """Cut the file inside its last line, as a crash in the middle of writing it leaves it; the number of
    complete lines left."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + (len(data) - start) // 2])
    return data[:start].count(b"\n")


# ---------------------------------------------------------------------------- torn journals


def test_a_torn_last_line_is_cut_off_with_a_warning_and_every_complete_record_kept(tmp_path, caplog):
    path = tmp_path / "run.json.journal"
    first = Journal(path, {"eps": 0.1})
    first.append([{"index": 0, "ok": True}, {"index": 1, "ok": False}])
    first.append([{"index": 2, "ok": True}])
    first.append([{"index": 3, "ok": True}, {"index": 4, "ok": True}])
    assert tear_last_line(path) == 3  # header + two complete lines of records
    with caplog.at_level(logging.WARNING, logger="adasmooth.core.journal"):
        again = Journal(path, {"eps": 0.1})
    assert set(again.done) == {0, 1, 2}
    assert any("torn" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert path.read_bytes().endswith(b"\n")  # the torn bytes are gone: the next line starts on its own
    again.append([{"index": 3, "ok": False}])
    third = Journal(path, {"eps": 0.1})  # before the fix: "journal ... is damaged at line 4"
    assert third.done == {0: {"index": 0, "ok": True}, 1: {"index": 1, "ok": False},
                          2: {"index": 2, "ok": True}, 3: {"index": 3, "ok": False}}


def test_a_torn_first_line_leaves_an_empty_journal_that_takes_the_new_config(tmp_path):
    path = tmp_path / "j"
    Journal(path, {"eps": 0.1}).append([{"index": 0}])
    tear_last_line(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data.split(b"\n")[0]) // 2])  # killed while writing the header
    fresh = Journal(path, {"eps": 0.2})
    assert fresh.done == {} and path.stat().st_size == 0
    fresh.append([{"index": 5}])
    assert Journal(path, {"eps": 0.2}).done == {5: {"index": 5}}


def test_a_last_line_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "j"
    Journal(path, {}).append([{"index": 0}])
    Journal(path, {}).append([{"index": 1}])
    path.write_bytes(path.read_bytes()[:-1])
    again = Journal(path, {})
    assert set(again.done) == {0, 1}
    again.append([{"index": 2}])
    assert set(Journal(path, {}).done) == {0, 1, 2}


def test_another_processs_torn_part_is_read_but_not_cut(tmp_path):
    """Under torchrun a part may be mid-write by its own process: only the owner cuts its file."""
    base = tmp_path / "j"
    Journal(base, {}, part="rank1").append([{"index": 1}])
    Journal(base, {}, part="rank1").append([{"index": 3}])
    other = base.with_name("j.rank1")
    tear_last_line(other)
    size = other.stat().st_size
    assert set(Journal(base, {}, part="rank0").done) == {1}
    assert other.stat().st_size == size


def test_evaluate_resumes_from_a_journal_torn_by_a_crash(checkpoints, tmp_path):
    full = tmp_path / "full.json"
    subprocess.run(evaluate_cmd(checkpoints["g"], full), check=True, env=env(), capture_output=True)
    out = tmp_path / "torn.json"
    journal = journal_path(out)
    proc = subprocess.Popen(evaluate_cmd(checkpoints["g"], out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: journal_lines(journal) >= 4, proc, "three batches were journaled")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = tear_last_line(journal) - 1  # lines of finished batches left whole
    resumed = subprocess.run(evaluate_cmd(checkpoints["g"], out), env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {10 * kept} of 120" in resumed.stdout
    assert "torn" in resumed.stderr and "Traceback" not in resumed.stderr
    assert outcomes(out) == outcomes(full)
    assert not journal.exists()


# ---------------------------------------------------------------------------- two writers


def test_an_output_lock_refuses_a_second_holder_and_is_removed_on_release(tmp_path):
    out = tmp_path / "r.json"
    with output_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=f"another process \\(pid {os.getpid()}\\)"):
            with output_lock(out):
                pass
    assert not lock.exists()
    with output_lock(out):  # free again
        pass
    deep = tmp_path / "new" / "folder" / "r.json"
    with output_lock(deep):
        assert deep.parent.is_dir()
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves no folder either


def test_a_second_evaluate_on_the_same_output_is_refused_and_the_first_finishes(checkpoints, tmp_path):
    full = tmp_path / "full.json"
    subprocess.run(evaluate_cmd(checkpoints["g"], full, n=200), check=True, env=env(), capture_output=True)
    out = tmp_path / "same.json"
    first = subprocess.Popen(evaluate_cmd(checkpoints["g"], out, n=200), env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: journal_lines(journal_path(out)) >= 2, first, "the first run journaled a batch")
    second = subprocess.run(evaluate_cmd(checkpoints["g"], out, n=200), env=env(), capture_output=True, text=True)
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "being written by another process" in lines[0] and str(out) in lines[0], lines
    assert f"pid {first.pid}" in lines[0]
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    result = json.loads(out.read_text())["results"]
    assert result["summary"]["complete"] is True
    assert result["examples"] == outcomes(full)
    assert not out.with_name(out.name + ".lock").exists() and not journal_path(out).exists()


def test_a_killed_holder_leaves_no_lock_behind(checkpoints, tmp_path):
    out = tmp_path / "killed.json"
    lock = out.with_name(out.name + ".lock")
    proc = subprocess.Popen(evaluate_cmd(checkpoints["g"], out), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: journal_lines(journal_path(out)) >= 2, proc, "it journaled a batch")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.is_file()  # the file stays; the kernel dropped the lock with the process
    again = subprocess.run(evaluate_cmd(checkpoints["g"], out), env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout and len(outcomes(out)) == 120
    assert not lock.exists()


# ---------------------------------------------------------------------------- diverging training


def test_train_base_with_a_huge_lr_is_one_line(tmp_path, capsys):
    rc = main(["train-base", "--epochs", "1", "--n-train", "512", "--batch-size", "32", "--lr", "1e6",
               "--eval-examples", "8", "--no-progress", "-o", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "training loss became nan" in lines[0] and "lower the lr" in lines[0], lines
    assert "--lr 1000000.0" in lines[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_a_journal_emptied_under_a_run_is_one_line_not_a_key_error(checkpoints, tmp_path, capsys, monkeypatch):
    """The end of evaluate reads the journal back; records gone meanwhile (before the lock: a second
    run that finished first and removed it) were a KeyError: 0."""
    monkeypatch.setattr(Journal, "_write_line", lambda self, payload: None)  # nothing reaches the file
    rc = main(["evaluate", "--model", checkpoints["g"], "--eps", "0.1", "--norm", "linf", "--attacks", "pgd",
               "--n-examples", "20", "--batch-size", "10", "--no-progress", "-o", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "lacks 20 of the 20 examples" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
