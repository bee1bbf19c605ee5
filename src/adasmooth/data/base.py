"""Data sets as float tensors in [0, 1], shape (N, C, H, W), with int64 labels.

Normalisation never happens here: models normalise inside (``adasmooth.models.Normalize``), so
attacks and noise work in pixel space. Loaders read the original distribution files:

- ``digits``: scikit-learn's bundled 8x8 digits (offline); a fixed stratified 80/20 train/test split.
- ``mnist``, ``fashion-mnist``: the four original IDX ``.gz`` files in ``data_dir``
  (or in ``data_dir/mnist`` / ``data_dir/fashion-mnist``).
- ``cifar10``, ``cifar100``: the original python pickle batches, as the extracted folder
  (``cifar-10-batches-py`` / ``cifar-100-python``) or the ``.tar.gz`` archive, in ``data_dir``.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError

__all__ = ["Dataset", "DataError", "DATASETS", "DATASET_STATS", "load_dataset", "default_data_dir"]




@dataclass
class Dataset:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    num_classes: int
    name: str
    split: str

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, n: int | None) -> "Dataset":
        """The first n examples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"need at least one example, got n={n}")
        return Dataset(self.x[:n], self.y[:n], self.num_classes, self.name, self.split)

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


# Channel statistics of each training set, for the models' built-in normalisation.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3054,), (0.3816,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = tuple(DATASET_STATS)
_NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}


def default_data_dir() -> Path:
    """``$ADASMOOTH_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("ADASMOOTH_DATA", "data"))


# ------------------------------------------------------------------ digits


def _load_digits() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    return {"train": x_tr, "test": x_te}, {"train": y_tr, "test": y_te}


# ------------------------------------------------------------------ IDX (MNIST, Fashion-MNIST)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _find_file(name: str, candidates: list[Path], dataset: str) -> Path:
    for folder in candidates:
        if (folder / name).is_file():
            return folder / name
    where = ", ".join(str(c) for c in candidates)
    raise DataError(f"{dataset}: expected file {name!r}, looked in: {where}. Pass --data-dir pointing at it.")


def _read_idx(path: Path, expected_magic: int, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"corrupt IDX file {path}: {err}") from err
    header = 4 + 4 * expected_dims
    if len(raw) < header:
        raise DataError(f"corrupt IDX file {path}: only {len(raw)} bytes")
    magic = struct.unpack(">i", raw[:4])[0]
    if magic != expected_magic:
        raise DataError(f"corrupt IDX file {path}: magic number {magic}, expected {expected_magic}")
    dims = struct.unpack(f">{expected_dims}i", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"corrupt IDX file {path}: header promises {count} values, found {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(name: str, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    candidates = [data_dir / name, data_dir]
    img_name, lbl_name = _IDX_FILES[split]
    images = _read_idx(_find_file(img_name, candidates, name), 2051, 3)
    labels = _read_idx(_find_file(lbl_name, candidates, name), 2049, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{name} {split}: {images.shape[0]} images but {labels.shape[0]} labels in {data_dir}")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


# ------------------------------------------------------------------ CIFAR pickles


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (numpy arrays, lists, dicts) and refuses any other class."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # protocol-5 pickles (re-saved batches) rebuild arrays from a raw buffer
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a data file")


def _unpickle_batch(raw: bytes, where: str) -> dict:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # pickle raises many error types on corrupt input
        raise DataError(f"corrupt CIFAR batch {where}: {err}") from err
    if not isinstance(batch, dict):
        raise DataError(f"corrupt CIFAR batch {where}: not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "labels",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", "fine_labels",
                 {"train": ["train"], "test": ["test"]}),
}


def _load_cifar(name: str, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    folder_name, archive_name, label_key, files = _CIFAR_LAYOUT[name]
    folder = next((d for d in (data_dir / folder_name, data_dir) if (d / files[split][0]).is_file()), None)
    raws: list[tuple[bytes, str]] = []
    if folder is not None:
        for fname in files[split]:
            path = _find_file(fname, [folder], name)
            raws.append((path.read_bytes(), str(path)))
    elif (data_dir / archive_name).is_file():
        archive = data_dir / archive_name
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for fname in files[split]:
                    member = tar.extractfile(f"{folder_name}/{fname}")
                    if member is None:
                        raise KeyError(fname)
                    raws.append((member.read(), f"{archive}:{folder_name}/{fname}"))
        except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{name}: archive {archive} is corrupt or lacks {folder_name}/{files[split]}: {err}") from err
    else:
        raise DataError(
            f"{name}: expected {folder_name}/{files[split][0]} or {archive_name}, "
            f"looked in: {data_dir / folder_name}, {data_dir}. Pass --data-dir pointing at it."
        )
    xs, ys = [], []
    for raw, where in raws:
        batch = _unpickle_batch(raw, where)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"corrupt CIFAR batch {where}: keys {sorted(batch)}, need 'data' and {label_key!r}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"corrupt CIFAR batch {where}: data shape {data.shape}, expected (N, 3072)")
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if labels.shape[0] != data.shape[0]:
            raise DataError(f"corrupt CIFAR batch {where}: {data.shape[0]} images, {labels.shape[0]} labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


# ------------------------------------------------------------------ public entry


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Load ``split`` in {"train", "val", "test"} of a data set.

    With ``val_fraction > 0`` a deterministic (by ``seed``) part of the training set is held out:
    ``split="train"`` returns the rest and ``split="val"`` returns the held-out part.
    """
    if name not in _NUM_CLASSES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0.0:
        raise ValueError("split='val' needs val_fraction > 0")
    source_split = "test" if split == "test" else "train"
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "digits":
        xs, ys = _load_digits()
        x, y = xs[source_split], ys[source_split]
    elif name in ("mnist", "fashion-mnist"):
        x, y = _load_idx(name, source_split, data_dir)
    else:
        x, y = _load_cifar(name, source_split, data_dir)
    if source_split == "train" and val_fraction > 0:
        perm = np.random.default_rng(seed).permutation(len(y))
        n_val = max(1, int(round(val_fraction * len(y))))
        idx = perm[:n_val] if split == "val" else perm[n_val:]
        idx = np.sort(idx)
        x, y = x[idx], y[idx]
    num_classes = _NUM_CLASSES[name]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes - 1}] in {data_dir}")
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), num_classes, name, split)
