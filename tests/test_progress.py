"""Progress bars: tqdm on a terminal, periodic log lines elsewhere, made in one place."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

from adasmooth.core.progress import LoggedProgress, on_terminal, progress_bar

SRC = Path(__file__).resolve().parents[1] / "src" / "adasmooth"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_module_but_core_progress_makes_a_tqdm_bar():
    makers = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
              if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert makers == ["core/progress.py"]


def test_off_a_terminal_a_bar_logs_lines_and_writes_no_carriage_return(monkeypatch, caplog):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with caplog.at_level(logging.INFO, logger="adasmooth.progress"):
        bar = progress_bar(total=4, desc="alpha sweep", leave=False, log_every=0)
        assert isinstance(bar, LoggedProgress)
        for i in range(4):
            bar.update(1)
            bar.set_postfix(alpha=i)
        bar.close()
    assert stderr.getvalue() == ""  # nothing on the stream: no \r redraws
    lines = [r.getMessage() for r in caplog.records if r.name == "adasmooth.progress"]
    assert lines[0].startswith("alpha sweep:") and "0/4" in lines[0]
    assert "4/4" in lines[-1] and all("\r" not in line for line in lines)
    assert len(lines) == 5  # the start and one per update (interval 0); repeated redraws at one count log nothing


def test_lines_are_spaced_by_the_interval_and_the_last_state_is_always_logged(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="adasmooth.progress"):
        for _ in progress_bar(range(1000), desc="batches", log_every=3600):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "adasmooth.progress"]
    assert len(lines) == 2 and "0/1000" in lines[0] and "1000/1000" in lines[1]


def test_on_a_terminal_the_bar_is_tqdm_and_disable_shows_nothing(monkeypatch, caplog):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert on_terminal()
    bar = progress_bar(total=3, desc="x", file=tty)
    assert not isinstance(bar, LoggedProgress)
    bar.update(3)
    bar.close()
    assert "3/3" in tty.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="adasmooth.progress"):
        for _ in progress_bar(range(5), disable=True, log_every=0):
            pass
    assert not caplog.records


def test_a_command_piped_to_a_file_shows_progress_as_lines(tmp_path):
    """A real run: stderr and stdout are pipes; the training bar's redraws must not reach them."""
    code = ("import sys; from adasmooth.cli import main; "
            "sys.exit(main(['train-base', '--epochs', '1', '--n-train', '200', '--eval-examples', '20', "
            f"'--eval-pgd-steps', '1', '-o', {str(tmp_path / 'm')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stdout and "\r" not in run.stderr
    assert re.search(r"^standard epoch 1/1: +0% .*0/\d+", run.stdout, re.M), run.stdout
