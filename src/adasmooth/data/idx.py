"""MNIST and Fashion-MNIST from the four original IDX ``.gz`` files (declared in the registry).

They are looked for in ``data_dir/<name>`` and in ``data_dir`` itself.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .base import declared_files, find_file, register_dataset

_IDX_FILES = {  # images, then labels; the registry's declaration, which the loader reads back
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def read_idx(path: Path, expected_magic: int, expected_dims: int) -> np.ndarray:
    """The uint8 array of a gzipped IDX file; DataError naming the file when it is not one."""
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


def load_idx(name: str, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    candidates = [data_dir / name, data_dir]
    img_name, lbl_name = declared_files(name, split)
    images = read_idx(find_file(img_name, candidates, name, split), _IMAGES_MAGIC, 3)
    labels = read_idx(find_file(lbl_name, candidates, name, split), _LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{name} {split}: {images.shape[0]} images but {labels.shape[0]} labels in {data_dir}")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


@register_dataset("mnist", num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                  files=_IDX_FILES, files_where="in <data-dir>/mnist/ or <data-dir>")
def load_mnist(split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_idx("mnist", split, data_dir)


@register_dataset("fashion-mnist", num_classes=10, input_shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,),
                  files=_IDX_FILES, files_where="in <data-dir>/fashion-mnist/ or <data-dir>")
def load_fashion_mnist(split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_idx("fashion-mnist", split, data_dir)
