"""Data sets declare the files they read: a data set registered here reads one declared file; its
missing-file error and the ``--data-dir`` help come from that declaration, and a loader cannot look
for a file it did not declare."""

from __future__ import annotations

import numpy as np
import pytest

from adasmooth.cli import build_parser
from adasmooth.core.errors import DataError
from adasmooth.data import DATASETS, describe_files, load_dataset, register_dataset
from adasmooth.data.base import find_file, missing_files_error

NAME = "test-npz"
FILES = {"train": ("toy-train.npz",), "test": ("toy-test.npz",)}


@pytest.fixture
def npz_set():
    @register_dataset(NAME, num_classes=2, input_shape=(1, 2, 2), mean=(0.5,), std=(0.25,), files=FILES,
                      files_where=f"in <data-dir>/{NAME}/ or <data-dir>")
    def load(split, data_dir):
        path = find_file(FILES[split][0], [data_dir / NAME, data_dir], NAME, split)
        arrays = np.load(path)
        return arrays["x"], arrays["y"]

    yield NAME
    DATASETS.remove(NAME)


def _help(command: str) -> str:
    sub = build_parser(command)._subparsers._group_actions[0].choices[command]
    return "".join(sub.format_help().split())


def test_missing_file_error_names_the_declared_file_and_where_it_looked(npz_set, tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(npz_set, "test", tmp_path)
    message = str(err.value)
    assert message.startswith(f"{NAME} test: expected file 'toy-test.npz' (in <data-dir>/{NAME}/ or <data-dir>), "
                              f"looked in: {tmp_path / NAME}, {tmp_path}")
    assert message.endswith("pass --data-dir pointing at the folder that holds them")
    np.savez(tmp_path / "toy-test.npz", x=np.full((3, 1, 2, 2), 0.5, np.float32), y=np.array([0, 1, 1]))
    assert load_dataset(npz_set, "test", tmp_path).y.tolist() == [0, 1, 1]


def test_the_declaration_is_the_listing_users_see(npz_set):
    assert describe_files(npz_set) == f"train: toy-train.npz; test: toy-test.npz (in <data-dir>/{NAME}/ or <data-dir>)"
    for command in ("train-base", "evaluate", "calibrate"):
        assert "".join(f"{NAME}: {describe_files(NAME)}".split()) in _help(command)


def test_a_loader_cannot_look_for_an_undeclared_file(npz_set, tmp_path):
    with pytest.raises(ValueError, match="reads 'other.npz' for split 'test' but does not declare it"):
        find_file("other.npz", [tmp_path], npz_set, "test")
    # the error for a whole split lists its declared files
    assert "expected toy-train.npz (in" in str(missing_files_error(npz_set, "train", [tmp_path]))


@pytest.mark.parametrize("files,where,fragment", [
    ({"train": ("a",)}, None, "must declare the splits"),
    ({"train": ("a",), "test": ()}, None, "must be non-empty names"),
    ({}, None, "reads no files: say where its data come from"),
    ("a.npz", None, "must map each split"),
])
def test_inconsistent_declarations_are_refused(files, where, fragment):
    with pytest.raises(ValueError, match=fragment):
        register_dataset("test-bad-files", num_classes=2, input_shape=(1, 2, 2), mean=(0.5,), std=(0.25,),
                         files=files, files_where=where)
    assert "test-bad-files" not in DATASETS
