"""The library speaks through the ``adasmooth`` logger; the command line chooses what to show."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from adasmooth.cli import main
from adasmooth.models.checkpoint import recorded_dataset

SRC = Path(__file__).resolve().parents[1] / "src" / "adasmooth"


def test_no_library_module_prints():
    printers = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                if not p.relative_to(SRC).as_posix().startswith("cli/")
                and re.search(r"(?<![\w.])print\(", p.read_text())]
    assert printers == []


def test_a_library_message_is_a_log_record_a_program_can_silence(capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="adasmooth"):
        assert recorded_dataset("mnist", {"a": {"dataset": "digits"}}, force=True) == "mnist"
    assert capsys.readouterr() == ("", "")  # nothing printed
    [record] = caplog.records
    assert record.name == "adasmooth.models.checkpoint" and record.levelno == logging.WARNING
    assert "digits" in record.getMessage() and "mnist" in record.getMessage()
    caplog.clear()
    logging.getLogger("adasmooth").setLevel(logging.ERROR)
    try:
        recorded_dataset("mnist", {"a": {"dataset": "digits"}}, force=True)
    finally:
        logging.getLogger("adasmooth").setLevel(logging.NOTSET)
    assert not caplog.records


def _train(tmp_path: Path, *flags: str) -> list[str]:
    return ["train-base", "--epochs", "2", "--n-train", "128", "--eval-examples", "16", "--eval-pgd-steps", "1",
            "-o", str(tmp_path / "m"), *flags]


def test_the_command_shows_info_by_default_and_quiet_hides_it(tmp_path, capsys):
    assert main(_train(tmp_path, "--no-progress", "--no-resume")) == 0
    assert re.search(r"^\[standard\] epoch 2/2 loss", capsys.readouterr().out, re.M) is None  # gated on progress
    assert main(_train(tmp_path / "b")) == 0
    shown = capsys.readouterr()
    assert re.search(r"^\[standard\] epoch 2/2 loss \d", shown.out, re.M), shown.out
    assert main(_train(tmp_path / "c", "--quiet")) == 0
    quiet = capsys.readouterr()
    assert "epoch" not in quiet.out and "epoch" not in quiet.err
    # the handler is removed after the command: a later library call prints nothing
    recorded_dataset("mnist", {"a": {"dataset": "digits"}}, force=True)
    assert not logging.getLogger("adasmooth").handlers


def test_warnings_go_to_stderr_and_quiet_and_verbose_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(_train(tmp_path, "--quiet", "--verbose"))
    assert err.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    logger = logging.getLogger("adasmooth")
    from adasmooth.cli import _show_logs
    logger_, handler, previous = _show_logs(quiet=False, verbose=True)
    try:
        assert logger.getEffectiveLevel() == logging.DEBUG
        logging.getLogger("adasmooth.x").warning("careful")
        logging.getLogger("adasmooth.x").debug("detail")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    out, err_text = capsys.readouterr()
    assert err_text == "warning: careful\n" and out == "detail\n"
