"""Data loaders: digits, the real MNIST / Fashion-MNIST files, CIFAR pickles written here, bad files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from adasmooth.core.errors import ConfigError
from adasmooth.data.base import DATASET_STATS, DataError, load_dataset

# ------------------------------------------------------------------ digits


def _multiset(ds) -> Counter:
    return Counter((x.numpy().tobytes(), int(y)) for x, y in zip(ds.x, ds.y))


def test_digits_shapes_range_and_types(digits_train, digits_test):
    for ds, n in ((digits_train, 1437), (digits_test, 360)):
        assert ds.x.shape == (n, 1, 8, 8)
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
        assert ds.num_classes == 10
        assert set(ds.y.tolist()) == set(range(10))
    assert digits_train.split == "train" and digits_test.split == "test"


def test_digits_train_and_test_partition_the_bundled_set(digits_train, digits_test):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = Counter(
        ((img / 16.0).astype(np.float32)[None].tobytes(), int(t)) for img, t in zip(bunch.images, bunch.target)
    )
    assert _multiset(digits_train) + _multiset(digits_test) == full


def test_validation_split_is_deterministic_disjoint_and_covers_train(digits_train):
    train_a = load_dataset("digits", "train", val_fraction=0.2, seed=1)
    val_a = load_dataset("digits", "val", val_fraction=0.2, seed=1)
    train_b = load_dataset("digits", "train", val_fraction=0.2, seed=1)
    val_b = load_dataset("digits", "val", val_fraction=0.2, seed=1)
    assert torch.equal(train_a.x, train_b.x) and torch.equal(val_a.y, val_b.y)
    assert len(val_a) == round(0.2 * len(digits_train))
    assert len(train_a) + len(val_a) == len(digits_train)
    # Together they are exactly the training set (as a multiset: digits holds a few duplicate images).
    assert _multiset(train_a) + _multiset(val_a) == _multiset(digits_train)
    val_other_seed = load_dataset("digits", "val", val_fraction=0.2, seed=2)
    assert not torch.equal(val_a.x, val_other_seed.x)
    assert val_a.split == "val"


def test_dataset_bad_arguments():
    with pytest.raises(ConfigError, match="unknown data set"):
        load_dataset("no-such-set", "train")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", "dev")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("digits", "val")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("digits", "train", val_fraction=1.0)


def test_subset_and_batches(digits_test):
    sub = digits_test.subset(50)
    assert len(sub) == 50 and torch.equal(sub.x, digits_test.x[:50])
    sizes = [len(y) for _, y in sub.batches(16)]
    assert sizes == [16, 16, 16, 2]
    with pytest.raises(ValueError):
        digits_test.subset(0)


# ------------------------------------------------------------------ real MNIST / Fashion-MNIST

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mnist_real_files(data_dir):
    test = load_dataset("mnist", "test", data_dir)
    assert test.x.shape == (10000, 1, 28, 28) and test.x.dtype == torch.float32
    assert test.y.dtype == torch.int64 and test.num_classes == 10
    assert torch.bincount(test.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert float(test.x.min()) == 0.0 and float(test.x.max()) == 1.0
    # Background is 0 and ink is 255: most pixels of a digit are background.
    assert float((test.x == 0).float().mean()) > 0.7
    train = load_dataset("mnist", "train", data_dir)
    assert train.x.shape == (60000, 1, 28, 28)
    assert torch.bincount(train.y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    # The stored channel statistics are those of this training set.
    mean, std = DATASET_STATS["mnist"]
    assert abs(float(train.x.mean()) - mean[0]) < 1e-3 and abs(float(train.x.std()) - std[0]) < 1e-3


def test_mnist_folder_itself_and_env_variable(data_dir, monkeypatch):
    direct = load_dataset("mnist", "test", data_dir / "mnist")
    assert len(direct) == 10000
    monkeypatch.setenv("ADASMOOTH_DATA", str(data_dir))
    via_env = load_dataset("mnist", "test")
    assert torch.equal(via_env.y, direct.y)


def test_fashion_mnist_real_files(data_dir):
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset("fashion-mnist", split, data_dir)
        assert ds.x.shape == (n, 1, 28, 28)
        assert torch.bincount(ds.y, minlength=10).tolist() == [n // 10] * 10
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    mean, std = DATASET_STATS["fashion-mnist"]
    assert abs(float(ds.x.mean()) - mean[0]) < 0.01  # test-set mean close to the training mean


# ------------------------------------------------------------------ IDX files written here


def _idx_bytes(magic: int, dims: tuple[int, ...], values: np.ndarray) -> bytes:
    return struct.pack(f">i{len(dims)}i", magic, *dims) + values.astype(np.uint8).tobytes()


def _write_idx_split(folder, images: np.ndarray, labels: np.ndarray, split: str = "t10k") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(2051, images.shape, images)))
    (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(2049, labels.shape, labels)))


def test_idx_layout_row_major(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    images[1, 2, 5] = 255  # image 1, row 2, column 5
    images[2, 27, 0] = 51
    labels = np.array([7, 0, 3], np.uint8)
    _write_idx_split(tmp_path / "mnist", images, labels)
    ds = load_dataset("mnist", "test", tmp_path)
    assert ds.y.tolist() == [7, 0, 3]
    assert float(ds.x[1, 0, 2, 5]) == 1.0 and float(ds.x[1].sum()) == 1.0
    assert float(ds.x[2, 0, 27, 0]) == pytest.approx(0.2)


def test_idx_missing_file_names_file_and_places(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", "test", tmp_path)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
    assert isinstance(err.value, FileNotFoundError)  # the CLI reports it as a clean error


def test_idx_missing_labels_file(tmp_path):
    _write_idx_split(tmp_path, np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", "test", tmp_path)


@pytest.mark.parametrize("fault", ["not_gzip", "corrupt_deflate", "cut_gzip", "wrong_magic", "truncated_body",
                                   "count_mismatch"])
def test_idx_corrupt_files_raise_data_error(tmp_path, fault):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3, 4], np.uint8)
    _write_idx_split(tmp_path, images, labels)
    img_path = tmp_path / "t10k-images-idx3-ubyte.gz"
    good = img_path.read_bytes()
    if fault == "not_gzip":
        img_path.write_bytes(b"this is not a gzip file at all")
    elif fault == "corrupt_deflate":
        bad = bytearray(good)
        bad[10] = 0x07  # first deflate block header: BTYPE 11 is reserved (zlib: invalid block type)
        img_path.write_bytes(bytes(bad))
    elif fault == "cut_gzip":
        img_path.write_bytes(good[: len(good) // 2])
    elif fault == "wrong_magic":
        img_path.write_bytes(gzip.compress(_idx_bytes(2049, images.shape, images)))
    elif fault == "truncated_body":
        img_path.write_bytes(gzip.compress(_idx_bytes(2051, images.shape, images)[:-100]))
    else:  # three labels for four images
        (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(2049, (3,), labels[:3])))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", tmp_path)
    assert str(tmp_path) in str(err.value)


# ------------------------------------------------------------------ CIFAR pickles written here


def _cifar_batch(n: int, labels, label_key: bytes, rng, extra: dict | None = None) -> bytes:
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        label_key: list(labels),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        **(extra or {}),
    }
    return pickle.dumps(batch, protocol=2)


def _write_cifar10(root, rng, n_per_batch=3, marked=None):
    """The cifar-10-batches-py folder; returns the data and labels written (train, test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        labels = [(i + j) % 10 for j in range(n_per_batch)]
        raw = _cifar_batch(n_per_batch, labels, b"labels", rng)
        (folder / f"data_batch_{i}").write_bytes(raw)
        batch = pickle.loads(raw)
        train_x.append(batch[b"data"])
        train_y += labels
    test_data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    if marked is not None:
        for plane, (row, col, value) in enumerate(marked):
            test_data[0, plane * 1024 + row * 32 + col] = value
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": [9, 0, 1, 2], b"data": test_data,
            b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return (np.concatenate(train_x), train_y), (test_data, [9, 0, 1, 2])


def _write_cifar100(root, rng):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", 6), ("test", 3)):
        labels = [99 - k for k in range(n)]
        raw = _cifar_batch(n, labels, b"fine_labels", rng, {b"coarse_labels": [k % 20 for k in range(n)]})
        (folder / split).write_bytes(raw)
        out[split] = (pickle.loads(raw)[b"data"], labels)
    return out


def _tar_gz(root, folder_name: str, archive_name: str):
    archive = root / archive_name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / folder_name, arcname=folder_name)
    return archive


def _expected_images(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0


def test_cifar10_folder_channel_order_and_batches(tmp_path):
    rng = np.random.default_rng(0)
    # Distinct values in R, G and B at different places of image 0 of the test batch.
    marked = [(3, 17, 255), (30, 1, 128), (0, 31, 7)]
    (train_x, train_y), (test_x, test_y) = _write_cifar10(tmp_path, rng, marked=marked)
    test = load_dataset("cifar10", "test", tmp_path)
    assert test.x.shape == (4, 3, 32, 32) and test.x.dtype == torch.float32
    assert test.y.tolist() == test_y and test.y.dtype == torch.int64 and test.num_classes == 10
    for channel, (row, col, value) in enumerate(marked):
        assert float(test.x[0, channel, row, col]) == pytest.approx(value / 255.0)
    # Red plane pixel (3, 17) is the 3*32+17-th byte of the row: nowhere else in the image.
    assert float(test.x[0, 0, 3, 17]) == 1.0
    train = load_dataset("cifar10", "train", tmp_path)
    assert len(train) == 15 and train.y.tolist() == train_y  # batches 1..5 in order
    np.testing.assert_array_equal(train.x.numpy(), _expected_images(train_x))
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0


def test_cifar10_from_archive_equals_folder(tmp_path):
    rng = np.random.default_rng(1)
    (train_x, train_y), _ = _write_cifar10(tmp_path / "src", rng)
    _tar_gz(tmp_path / "src", "cifar-10-batches-py", "cifar-10-python.tar.gz")
    only_archive = tmp_path / "only-archive"
    only_archive.mkdir()
    (tmp_path / "src" / "cifar-10-python.tar.gz").rename(only_archive / "cifar-10-python.tar.gz")
    from_archive = load_dataset("cifar10", "train", only_archive)
    from_folder = load_dataset("cifar10", "train", tmp_path / "src")
    assert torch.equal(from_archive.x, from_folder.x) and torch.equal(from_archive.y, from_folder.y)
    assert from_archive.y.tolist() == train_y
    # The folder itself (not its parent) also works.
    direct = load_dataset("cifar10", "train", tmp_path / "src" / "cifar-10-batches-py")
    assert torch.equal(direct.x, from_folder.x)


def test_cifar10_validation_split(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(2), n_per_batch=4)
    full = load_dataset("cifar10", "train", tmp_path)
    train = load_dataset("cifar10", "train", tmp_path, val_fraction=0.25, seed=3)
    val = load_dataset("cifar10", "val", tmp_path, val_fraction=0.25, seed=3)
    assert len(train) == 15 and len(val) == 5
    assert _multiset(train) + _multiset(val) == _multiset(full)


def test_cifar100_folder_and_archive(tmp_path):
    written = _write_cifar100(tmp_path / "src", np.random.default_rng(3))
    for split, (data, labels) in written.items():
        ds = load_dataset("cifar100", split, tmp_path / "src")
        assert ds.num_classes == 100 and ds.y.tolist() == labels  # fine labels, not coarse
        np.testing.assert_array_equal(ds.x.numpy(), _expected_images(data))
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    _tar_gz(tmp_path / "src", "cifar-100-python", "cifar-100-python.tar.gz").rename(
        archive_dir / "cifar-100-python.tar.gz")
    ds = load_dataset("cifar100", "test", archive_dir)
    assert ds.y.tolist() == written["test"][1]
    np.testing.assert_array_equal(ds.x.numpy(), _expected_images(written["test"][0]))


def test_cifar_pickle_protocol_5_also_loads(tmp_path):
    # Re-saved batches (Python 3, highest protocol) reference numpy's buffer constructor.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.random.default_rng(4).integers(0, 256, (2, 3072), dtype=np.uint8)
    folder.joinpath("test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [5, 6]}, protocol=5))
    ds = load_dataset("cifar100", "test", tmp_path)
    np.testing.assert_array_equal(ds.x.numpy(), _expected_images(data))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil(marker)}
    folder.joinpath("test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


def test_cifar_missing_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg
    _write_cifar10(tmp_path, np.random.default_rng(5))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", "train", tmp_path)
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", "test", tmp_path)


@pytest.mark.parametrize("fault", ["truncated_pickle", "not_a_dict", "missing_labels", "bad_shape",
                                   "label_out_of_range"])
def test_cifar_corrupt_batches(tmp_path, fault):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.zeros((2, 3072), np.uint8)
    good = {b"data": data, b"labels": [0, 1]}
    if fault == "truncated_pickle":
        raw = pickle.dumps(good, protocol=2)[:-40]
    elif fault == "not_a_dict":
        raw = pickle.dumps([data, [0, 1]], protocol=2)
    elif fault == "missing_labels":
        raw = pickle.dumps({b"data": data, b"fine_labels": [0, 1]}, protocol=2)
    elif fault == "bad_shape":
        raw = pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, protocol=2)
    else:
        raw = pickle.dumps({b"data": data, b"labels": [0, 10]}, protocol=2)
    folder.joinpath("test_batch").write_bytes(raw)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("fault", ["garbage", "cut", "missing_member"])
def test_cifar_corrupt_archive(tmp_path, fault):
    src = tmp_path / "src"
    _write_cifar10(src, np.random.default_rng(6))
    if fault == "missing_member":
        (src / "cifar-10-batches-py" / "test_batch").unlink()
    archive = _tar_gz(src, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    target = tmp_path / "dl"
    target.mkdir()
    raw = archive.read_bytes()
    if fault == "garbage":
        raw = b"\x1f\x8b" + bytes(range(256)) * 4
    elif fault == "cut":
        raw = raw[: len(raw) // 2]
    (target / archive.name).write_bytes(raw)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", target)
    assert "cifar-10-python.tar.gz" in str(err.value)
