"""Every example in README.md runs as written: each `adasmooth ...` command in order (with options appended
that only shrink sizes: epochs, examples, draws), then the Python blocks, in one temporary folder.

The commands form one pipeline (train-base writes what sweep, evaluate, ... read), so one test runs them
all in order and reports the first that fails.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from adasmooth.cli import COMMANDS, main

README = Path(__file__).resolve().parents[1] / "README.md"

# Options appended to each command: they only make the run small (later options win in argparse).
SHRINK = {
    "demo": ["--epochs", "1", "--n-train", "256", "--n-examples", "16", "--alphas", "0,0.5,1", "--steps", "2"],
    "train-base": ["--epochs", "1", "--n-train", "256", "--eval-examples", "16", "--eval-pgd-steps", "2",
                   "--attack-steps", "2", "--batch-size", "64", "--catrs-m", "2", "--catrs-steps", "1"],
    "catrs-targets": ["--samples", "8", "--n-train", "256", "--batch-size", "256"],
    "sweep": ["--n-examples", "16", "--alphas", "0,0.5,1", "--steps", "2"],
    "evaluate": ["--n-examples", "6", "--batch-size", "6"],
    "train-mixnet": ["--epochs", "1", "--n-train", "64", "--batch-size", "32", "--eval-examples", "8",
                     "--eval-pgd-steps", "1", "--attack-steps", "1", "--n-targets", "1", "--extra-clean", "1",
                     "--monitor-examples", "16"],
    "calibrate": ["--calib-examples", "100", "--attack-examples", "6", "--calib-apgd-steps", "2",
                  "--range-widths", "0.1,1", "--eval-examples", "6", "--batch-size", "100"],
    "certify": ["--n", "64", "--n0", "8", "--n-examples", "2", "--batch-size", "64"],
    "analyze": ["--n-examples", "6", "--aa-steps", "3", "--lipschitz-steps", "2"],
    "export": [],
}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[list[str]]:
    """Each `adasmooth ...` line of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("adasmooth "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_every_command_of_the_cli_has_a_readme_example():
    shown = {argv[0] for argv in readme_commands()}
    assert {name for name, _, _ in COMMANDS} <= shown
    assert set(SHRINK) >= shown, f"no shrink options for {shown - set(SHRINK)}"


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADASMOOTH_DATA", str(data_dir))
    threads = torch.get_num_threads()
    try:
        for argv in readme_commands():
            shown = "adasmooth " + " ".join(argv)
            try:
                rc = main(argv + SHRINK[argv[0]] + ["--no-progress"])
            except SystemExit as stop:  # argparse rejected an option
                rc = stop.code
            err = capsys.readouterr().err
            assert rc == 0, f"README example failed: {shown}\n{err[-2000:]}"
        namespace: dict = {}
        for block in readme_blocks("python"):
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "runs" / "eval.json").is_file() and (tmp_path / "runs" / "certify.json").is_file()
