"""The data set registry: a data set registered in a test is loaded by load_dataset with the checks and
the validation split; the facts of the built-in ones; unknown names list the known ones."""

from __future__ import annotations

import numpy as np
import pytest

from adasmooth.core.errors import ConfigError, DataError
from adasmooth.data import DATASET_STATS, DATASETS, dataset_info, load_dataset, register_dataset

BUILT_IN = {
    "digits": (10, (1, 8, 8)),
    "mnist": (10, (1, 28, 28)),
    "fashion-mnist": (10, (1, 28, 28)),
    "cifar10": (10, (3, 32, 32)),
    "cifar100": (100, (3, 32, 32)),
}
# Read from image files: the class count (None: the folders decide) is registered, the shape is the crop's.
IMAGE_FILES = {"folder": None, "imagenet": 1000}
MADE_HERE = {"files": {}, "files_where": "none: made in the test"}


def _toy_arrays(split: str, n: int = 10, top_label: int = 2, shape=(2, 3, 3)):
    rng = np.random.default_rng(0 if split == "train" else 1)
    x = rng.random((n, *shape), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % (top_label + 1)
    return x, y


@pytest.fixture
def toy_datasets():
    seen = []

    @register_dataset("toy", num_classes=3, input_shape=(2, 3, 3), mean=(0.5, 0.5), std=(0.25, 0.25), **MADE_HERE)
    def load_toy(split, data_dir):
        seen.append((split, data_dir))
        return _toy_arrays(split)

    register_dataset("toy-bad-labels", num_classes=3, input_shape=(2, 3, 3), mean=(0.5, 0.5), std=(0.2, 0.2),
                     **MADE_HERE)(lambda split, data_dir: _toy_arrays(split, top_label=3))
    register_dataset("toy-bad-shape", num_classes=3, input_shape=(2, 3, 3), mean=(0.5, 0.5), std=(0.2, 0.2),
                     **MADE_HERE)(lambda split, data_dir: _toy_arrays(split, shape=(2, 4, 4)))
    yield seen
    for name in ("toy", "toy-bad-labels", "toy-bad-shape"):
        DATASETS.remove(name)


def test_registered_data_set_is_loaded_with_its_facts(toy_datasets, tmp_path):
    test = load_dataset("toy", "test", tmp_path)
    assert toy_datasets == [("test", tmp_path)]
    assert test.x.shape == (10, 2, 3, 3) and test.num_classes == 3 and test.name == "toy" and test.split == "test"
    assert DATASET_STATS["toy"] == ((0.5, 0.5), (0.25, 0.25))
    assert dataset_info("toy") == {"num_classes": 3, "input_shape": (2, 3, 3), "mean": (0.5, 0.5),
                                   "std": (0.25, 0.25), **MADE_HERE}
    assert "toy" in DATASETS and "toy" in DATASET_STATS
    # The validation split is carved out of the loader's training split.
    train = load_dataset("toy", "train", tmp_path, val_fraction=0.3, seed=0)
    val = load_dataset("toy", "val", tmp_path, val_fraction=0.3, seed=0)
    assert len(train) == 7 and len(val) == 3 and [s for s, _ in toy_datasets[1:]] == ["train", "train"]


def test_loader_output_is_checked(toy_datasets):
    with pytest.raises(DataError, match=r"toy-bad-labels: labels outside \[0, 2\]"):
        load_dataset("toy-bad-labels", "test")
    with pytest.raises(DataError, match=r"shape \(2, 4, 4\), expected \(2, 3, 3\)"):
        load_dataset("toy-bad-shape", "test")


def test_registry_entries_are_gone_after_the_fixture():
    assert "toy" not in DATASETS and "toy" not in DATASET_STATS and set(DATASET_STATS) == set(DATASETS)


def test_built_in_facts():
    assert set(BUILT_IN) | set(IMAGE_FILES) <= set(DATASETS) == set(DATASET_STATS)  # the built-ins; others may join
    for name, (classes, shape) in BUILT_IN.items():
        info = dataset_info(name)
        assert (info["num_classes"], info["input_shape"]) == (classes, shape)
        mean, std = DATASET_STATS[name]
        assert len(mean) == len(std) == shape[0] and all(0 < s < 1 for s in std)
    for name, classes in IMAGE_FILES.items():
        info = dataset_info(name)
        assert (info["num_classes"], info["input_shape"], info["image_files"]) == (classes, None, True)
        assert DATASET_STATS[name] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert DATASET_STATS.get("no-such-set", "absent") == "absent"


def test_unknown_names_and_splits_are_config_errors():
    with pytest.raises(ConfigError) as err:
        load_dataset("no-such-set", "train")
    head, _, known = str(err.value).partition("; known: ")
    assert head == "unknown data set 'no-such-set'"
    assert set(known.split(", ")) == set(DATASETS) >= set(BUILT_IN) | set(IMAGE_FILES)
    with pytest.raises(ConfigError, match="no-such-set"):
        dataset_info("no-such-set")
    with pytest.raises(ConfigError, match="split must be 'train', 'val' or 'test', got 'dev'"):
        load_dataset("digits", "dev")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("digits", "val")


@pytest.mark.parametrize("facts,fragment", [
    ({"num_classes": 3, "input_shape": (2, 3), "mean": (0.5,), "std": (0.5,)}, "must be (C, H, W)"),
    ({"num_classes": 3, "input_shape": (2, 3, 3), "mean": (0.5,), "std": (0.5, 0.5)}, "2 channels but 1 means"),
    ({"num_classes": 1, "input_shape": (1, 3, 3), "mean": (0.5,), "std": (0.5,)}, "num_classes must be >= 2"),
])
def test_registering_inconsistent_facts_is_refused(facts, fragment):
    with pytest.raises(ValueError) as err:
        register_dataset("toy-inconsistent", **facts, **MADE_HERE)
    assert fragment in str(err.value) and "toy-inconsistent" not in DATASETS
