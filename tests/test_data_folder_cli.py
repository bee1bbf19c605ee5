"""``train-base``, ``evaluate`` and ``certify`` end to end on a tiny image folder written here."""

from __future__ import annotations

import json

import pytest

from adasmooth.cli import main

from test_data_folder import write_class_folders


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder-cli")
    write_class_folders(root / "data" / "train", per_class=(6, 6, 6), size=(12, 12), suffix=".jpg")
    write_class_folders(root / "data" / "test", per_class=(2, 2, 2), size=(12, 12), suffix=".png")
    return root


def _train(root, name, *extra):
    code = main(["train-base", "--dataset", "folder", "--data-dir", str(root / "data"), "--image-crop", "8",
                 "--arch", "small-cnn", "--epochs", "1", "--batch-size", "6", "--eval-examples", "6",
                 "--eval-pgd-steps", "1", "--eps", "0.03", "--no-progress", "--device", "cpu",
                 "-o", str(root / name), *extra])
    assert code == 0
    return json.loads((root / f"{name}.json").read_text())


def test_train_evaluate_and_certify_on_a_folder(folder_runs, capsys):
    root = folder_runs
    info = _train(root, "std", "--workers", "1")
    assert info["dataset"] == "folder" and info["num_classes"] == 3 and info["input_shape"] == [3, 8, 8]
    assert info["training"]["augment"] == "resized-crop-flip" and info["metrics"]["eval_examples"] == 6
    # evaluation takes the crop from the checkpoint: no --image-crop
    code = main(["evaluate", "--model", str(root / "std"), "--data-dir", str(root / "data"), "--attacks", "apgd-ce",
                 "--n-examples", "6", "--no-progress", "--device", "cpu", "-o", str(root / "eval.json")])
    assert code == 0
    written = json.loads((root / "eval.json").read_text())
    report = written["results"]
    assert report["summary"]["n"] == 6 and written["config"]["image"]["crop"] == 8
    assert [e["label"] for e in report["examples"]] == [0, 0, 1, 1, 2, 2]
    # another crop than the checkpoint's is refused, naming both shapes
    code = main(["evaluate", "--model", str(root / "std"), "--data-dir", str(root / "data"), "--image-crop", "10",
                 "--attacks", "apgd-ce", "--no-progress", "--device", "cpu", "-o", str(root / "eval2.json")])
    assert code == 2 and "(3, 8, 8)" in capsys.readouterr().err
    _train(root, "gauss", "--method", "gaussian", "--sigma", "0.25", "--augment", "none")
    code = main(["certify", "--model", str(root / "gauss"), "--data-dir", str(root / "data"), "--n0", "8",
                 "--n", "64", "--batch-size", "64", "--n-examples", "3", "--no-progress", "--device", "cpu",
                 "-o", str(root / "cert")])
    assert code == 0
    cert = json.loads((root / "cert.json").read_text())["results"]
    assert cert["dataset"] == "folder" and cert["models"][0]["examples"] == 3


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["train-base", "--dataset", "folder", "--data-dir", str(tmp_path), "--no-progress",
                 "-o", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and f"expected the folder {tmp_path / 'train'}" in err and len(err.strip().splitlines()) == 1
