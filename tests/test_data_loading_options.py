"""``--workers`` (and the image options) on every command that reads data, declared once
(:class:`adasmooth.core.config.DataLoadingOptions`) and used where the data are decoded."""

from __future__ import annotations

import json

import pytest
import torch

import adasmooth.data.stream as stream_module
from adasmooth.cli import build_parser, command_module, main
from adasmooth.cli.options import config_from_args
from adasmooth.core.config import DataLoadingOptions
from adasmooth.core.errors import ConfigError
from adasmooth.data import ImageOptions, load_dataset
from adasmooth.evaluate.calibrate import CalibrateConfig, _calibration_data

from test_data_folder import write_class_folders

DATA_COMMANDS = ("evaluate", "certify", "analyze", "sweep", "calibrate")


@pytest.fixture
def loader_workers(monkeypatch):
    """The ``num_workers`` of every DataLoader the data streams build, in order."""
    seen: list[int] = []
    real = stream_module.DataLoader

    def spy(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_module, "DataLoader", spy)
    return seen


@pytest.fixture
def image_folder(tmp_path):
    write_class_folders(tmp_path / "train", per_class=(3, 3, 3), size=(10, 12))
    write_class_folders(tmp_path / "test", per_class=(2, 3, 2), size=(10, 12))
    return tmp_path


def _parsed(command: str, *argv: str):
    args = build_parser(command).parse_args([command, *argv])
    return config_from_args(command_module(command).CONFIG, args)


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_command_takes_workers_and_the_image_options_from_one_declaration(command):
    config = command_module(command).CONFIG
    assert issubclass(config, DataLoadingOptions)
    sub = build_parser(command)._subparsers._group_actions[0].choices[command]
    help_text = " ".join(sub.format_help().split())
    for flag in ("--workers", "--image-crop", "--image-resize", "--image-subset", "--image-labels"):
        assert flag in help_text, (command, flag)
    assert "data-loading worker processes" in help_text
    extra = {"calibrate": ["--rule", "nonlinear", "--std", "g", "--rob", "h"]}.get(command, [])
    extra += {"evaluate": ["--model", "m"], "certify": ["--model", "m"], "analyze": ["--rob", "h"],
              "sweep": ["--std", "g", "--rob", "h"]}.get(command, [])
    cfg = _parsed(command, *extra, "--workers", "3", "--image-crop", "16")
    assert cfg.workers == 3 and cfg.image.crop == 16
    assert _parsed(command, *extra).workers == 0


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_negative_workers_is_a_one_line_error(command, capsys, tmp_path):
    code = main([command, "--workers", "-1", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "workers must be >= 0, got -1" in err and "Traceback" not in err


def test_workers_decode_the_same_images_in_worker_processes(image_folder, loader_workers):
    options = ImageOptions(crop=8, resize=9)
    plain = load_dataset("folder", "test", image_folder, image=options)
    assert plain.workers == 0
    expected_x, expected_y = plain.x.clone(), plain.y.clone()
    assert loader_workers == []  # workers 0: decoded in this process, no DataLoader

    parallel = load_dataset("folder", "test", image_folder, image=ImageOptions(crop=8, resize=9), workers=2)
    part = parallel.select([6, 0, 3])
    assert part.workers == 2  # a selection (evaluate's share, certify's pending inputs) keeps them
    assert torch.equal(part.x, expected_x[[6, 0, 3]]) and loader_workers == [2]
    batches = list(parallel.subset(5).batches(2))  # sweep and calibrate read batches
    assert loader_workers == [2, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), expected_x[:5])
    assert torch.equal(torch.cat([y for _, y in batches]), expected_y[:5])
    assert torch.equal(parallel.x, expected_x) and loader_workers == [2, 2, 2]


def test_in_memory_data_sets_accept_workers_and_check_the_count():
    data = load_dataset("digits", "test", workers=2)
    assert data.with_workers(4) is data
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        load_dataset("digits", "test", workers=-2)


def test_calibrate_reads_its_slice_with_the_image_options_and_workers(image_folder, loader_workers):
    options = dict(crop=8, resize=8)
    cfg = CalibrateConfig(rule="nonlinear", std="g", rob="h", data_dir=str(image_folder), split="test",
                          calib_offset=2, calib_examples=4, image=ImageOptions(**options), workers=1)
    calib = _calibration_data(cfg, "folder")
    reference = load_dataset("folder", "test", image_folder, image=ImageOptions(**options))
    assert calib.input_shape == (3, 8, 8) and len(calib) == 4
    assert torch.equal(calib.x, reference.x[2:6]) and torch.equal(calib.y, reference.y[2:6])
    assert loader_workers == [1]


def test_evaluate_on_a_folder_with_workers_gives_the_same_outcomes(image_folder, loader_workers, tmp_path):
    run = tmp_path / "runs"
    assert main(["train-base", "--dataset", "folder", "--data-dir", str(image_folder), "--image-crop", "8",
                 "--arch", "small-cnn", "--epochs", "1", "--batch-size", "9", "--eval-examples", "3",
                 "--eval-pgd-steps", "1", "--eps", "0.03", "--no-progress", "--device", "cpu",
                 "-o", str(run / "m")]) == 0
    outcomes = []
    for workers in ("0", "2"):
        del loader_workers[:]
        out = run / f"eval{workers}.json"
        assert main(["evaluate", "--model", str(run / "m"), "--data-dir", str(image_folder), "--attacks", "apgd-ce",
                     "--workers", workers, "--no-progress", "--device", "cpu", "-o", str(out)]) == 0
        written = json.loads(out.read_text())
        assert written["config"]["workers"] == int(workers)
        assert loader_workers == ([] if workers == "0" else [2])
        outcomes.append(written["results"]["examples"])
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == 7
