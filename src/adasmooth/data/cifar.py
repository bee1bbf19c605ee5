"""CIFAR-10 and CIFAR-100 from the original python pickle batches.

Either the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``, or its contents
directly in ``data_dir``) or the ``.tar.gz`` archive in ``data_dir``. The batches are pickles, so
they are read with an unpickler that builds numpy arrays and refuses every other class.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .base import missing_files_error, register_dataset


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


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its batches and which key holds the labels."""

    name: str
    folder: str
    archive: str
    label_key: str
    files: dict[str, list[str]]

    def declared(self) -> dict[str, tuple[str, ...]]:
        """The batch files of each split as the registry declares them (inside the folder)."""
        return {split: tuple(f"{self.folder}/{f}" for f in names) for split, names in self.files.items()}

    def where(self) -> str:
        return f"or the archive {self.archive} in <data-dir>; or the folder's contents in <data-dir>"


_CIFAR10 = _Layout("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "labels",
                   {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]})
_CIFAR100 = _Layout("cifar100", "cifar-100-python", "cifar-100-python.tar.gz", "fine_labels",
                    {"train": ["train"], "test": ["test"]})


def _read_raw_batches(layout: _Layout, split: str, data_dir: Path) -> list[tuple[bytes, str]]:
    """(bytes, where) of each batch file of ``split``, from the folder if present, else the archive."""
    files = layout.files[split]
    folder = next((d for d in (data_dir / layout.folder, data_dir) if (d / files[0]).is_file()), None)
    if folder is not None:
        paths = [folder / fname for fname in files]
        for fname, path in zip(files, paths):
            if not path.is_file():
                raise missing_files_error(layout.name, split, [folder], f"{layout.folder}/{fname}")
        return [(path.read_bytes(), str(path)) for path in paths]
    archive = data_dir / layout.archive
    if not archive.is_file():
        raise missing_files_error(layout.name, split, [data_dir / layout.folder, data_dir, archive])
    raws = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for fname in files:
                member = tar.extractfile(f"{layout.folder}/{fname}")
                if member is None:
                    raise KeyError(fname)
                raws.append((member.read(), f"{archive}:{layout.folder}/{fname}"))
    except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{layout.name}: archive {archive} is corrupt or lacks {layout.folder}/{files}: {err}"
        ) from err
    return raws


def load_cifar(layout: _Layout, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for raw, where in _read_raw_batches(layout, split, data_dir):
        batch = _unpickle_batch(raw, where)
        if "data" not in batch or layout.label_key not in batch:
            raise DataError(
                f"corrupt CIFAR batch {where}: keys {sorted(batch)}, need 'data' and {layout.label_key!r}"
            )
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"corrupt CIFAR batch {where}: data shape {data.shape}, expected (N, 3072)")
        labels = np.asarray(batch[layout.label_key], dtype=np.int64)
        if labels.shape[0] != data.shape[0]:
            raise DataError(f"corrupt CIFAR batch {where}: {data.shape[0]} images, {labels.shape[0]} labels")
        # Each row holds the red, then green, then blue 32x32 plane, row-major.
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


@register_dataset("cifar10", num_classes=10, input_shape=(3, 32, 32),
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), augment="crop-flip",
                  files=_CIFAR10.declared(), files_where=_CIFAR10.where())
def load_cifar10(split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_cifar(_CIFAR10, split, data_dir)


@register_dataset("cifar100", num_classes=100, input_shape=(3, 32, 32),
                  mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop-flip",
                  files=_CIFAR100.declared(), files_where=_CIFAR100.where())
def load_cifar100(split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_cifar(_CIFAR100, split, data_dir)
