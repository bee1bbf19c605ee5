"""Data sets as float tensors in [0, 1], shape (N, C, H, W), with int64 labels, from a registry.

Normalisation never happens here: models normalise inside (``adasmooth.models.Normalize``), so
attacks and noise work in pixel space. Each data set lives in its own file and registers a loader
with the facts about it:

    @register_dataset("mnist", num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                      files={"train": ("train-images-idx3-ubyte.gz", ...), "test": (...)},
                      files_where="in <data-dir>/mnist/ or <data-dir>")
    def load_mnist(split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]: ...

``files`` declares what the loader reads under ``--data-dir`` for each source split ("train", "test"):
names or patterns (``<class>``, ``<image>``), none for a data set bundled with a library; ``files_where``
says where else they may be (a sub-folder, an archive). Missing-file errors (:func:`find_file`,
:func:`missing_files_error`) and the ``--data-dir`` help (:func:`files_help`) are made from it.

The loader gets ``split`` in {"train", "test"} and returns float32 images in [0, 1] of shape
(N, C, H, W) and int64 labels; :func:`load_dataset` adds the validation split and the checks.

Data sets too large for memory (image folders, ImageNet) register with :func:`register_image_files`
instead: their loader returns a :class:`Dataset` subclass that decodes files on demand. Every data
set streams through one interface, :meth:`Dataset.stream` (DataLoader workers, per-epoch order,
mid-epoch resume, per-example augmentation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from ..core.registry import Registry
from .augment import augment_batch
from .stream import stream_batches

__all__ = [
    "Dataset",
    "DataError",
    "DATASETS",
    "DATASET_STATS",
    "register_dataset",
    "register_image_files",
    "dataset_info",
    "load_dataset",
    "default_data_dir",
    "SPLITS",
    "declared_files",
    "describe_files",
    "files_help",
    "find_file",
    "missing_files_error",
]

SPLITS = ("train", "val", "test")

Loader = Callable[[str, Path], "tuple[np.ndarray, np.ndarray]"]


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

    def select(self, indices) -> "Dataset":
        """The examples at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name, self.split)

    def with_workers(self, workers: int) -> "Dataset":
        """This data set, read with ``workers`` data-loading worker processes where reading means
        decoding files (image-file data sets); tensors already in memory need none, so here it only
        checks the count."""
        if workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        return self

    def batches(self, batch_size: int):
        """``(x, y)`` in order, without augmentation (evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]

    def load(self, indices: torch.Tensor, augment: str = "none", seed: int = 0, epoch: int = 0):
        """``(x, y)`` of the examples at ``indices``; example ``i`` augmented as seeded by (seed, epoch, i)."""
        return augment_batch(self.x[indices], indices, augment, seed, epoch), self.y[indices]

    def stream(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, start_batch: int = 0,
               workers: int = 0, augment: str = "none", drop_last: bool = False, pin_memory: bool = False,
               shard: tuple[int, int] = (0, 1)):
        """``(x, y, idx)`` batches of epoch ``epoch`` from batch ``start_batch`` on (see :mod:`.stream`);
        with ``shard=(rank, world_size)`` this rank's rows of each batch."""
        return stream_batches(self, batch_size, seed=seed, epoch=epoch, shuffle=shuffle, start_batch=start_batch,
                              workers=workers, augment=augment, drop_last=drop_last, pin_memory=pin_memory,
                              shard=shard)


DATASETS: Registry[Loader] = Registry("data set")

SOURCE_SPLITS = ("train", "test")  # what loaders read; "val" is held out of "train"


def _checked_files(name: str, files: Mapping[str, Sequence[str]], where: str | None) -> dict[str, tuple[str, ...]]:
    if not isinstance(files, Mapping):
        raise ValueError(f"data set {name!r}: files must map each split to the files it reads, got {files!r}")
    declared = {split: tuple(files[split]) for split in files}
    if declared and set(declared) != set(SOURCE_SPLITS):
        raise ValueError(f"data set {name!r}: files must declare the splits {SOURCE_SPLITS}, got {sorted(declared)}")
    for split, names in declared.items():
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"data set {name!r}: files of split {split!r} must be non-empty names, got {names!r}")
    if not declared and not where:
        raise ValueError(f"data set {name!r} reads no files: say where its data come from (files_where=...)")
    return declared


def register_dataset(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    files: Mapping[str, Sequence[str]],
    files_where: str | None = None,
    **info: Any,
) -> Callable[[Loader], Loader]:
    """Decorator: register ``loader(split, data_dir) -> (images, labels)`` under ``name`` with its facts.

    ``mean``/``std`` are the per-channel statistics of the training set, used by the models'
    built-in normalisation; ``files``/``files_where`` what it reads (see the module docstring).
    """
    declared = _checked_files(name, files, files_where)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"data set {name!r}: input_shape must be (C, H, W), got {input_shape}")
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ValueError(f"data set {name!r}: {shape[0]} channels but {len(mean)} means and {len(std)} stds")
    if num_classes < 2:
        raise ValueError(f"data set {name!r}: num_classes must be >= 2, got {num_classes}")
    return DATASETS.register(
        name,
        num_classes=int(num_classes),
        input_shape=shape,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        files=declared,
        files_where=files_where,
        **info,
    )


def register_image_files(
    name: str,
    *,
    num_classes: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    files: Mapping[str, Sequence[str]],
    files_where: str | None = None,
    **info: Any,
) -> Callable[[Callable], Callable]:
    """Decorator: register a data set read from image files, ``loader(split, data_dir, image_options) -> Dataset``.

    ``num_classes`` is None when the files decide it (class folders); the input shape is set by the
    image options (3, crop, crop), so the registry records none. ``files``/``files_where``: as for
    :func:`register_dataset`.
    """
    declared = _checked_files(name, files, files_where)
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"data set {name!r}: num_classes must be >= 2, got {num_classes}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"data set {name!r}: RGB images need 3 means and 3 stds")
    return DATASETS.register(name, num_classes=num_classes, input_shape=None, image_files=True, files=declared,
                             files_where=files_where, mean=tuple(float(v) for v in mean),
                             std=tuple(float(v) for v in std), **info)


def dataset_info(name: str) -> dict[str, Any]:
    """The registered facts of a data set: num_classes, input_shape (C, H, W), mean, std."""
    return DATASETS.info(name)


class _StatsView(Mapping):
    """``name -> (mean, std)`` for every registered data set, read live from the registry."""

    def __getitem__(self, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if name not in DATASETS:
            raise KeyError(name)
        info = DATASETS.info(name)
        return info["mean"], info["std"]

    def __iter__(self) -> Iterator[str]:
        return iter(DATASETS.names())

    def __len__(self) -> int:
        return len(DATASETS)

    def __repr__(self) -> str:
        return f"DATASET_STATS({dict(self)})"


# Kept for callers that only need the normalisation statistics.
DATASET_STATS: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = _StatsView()


def default_data_dir() -> Path:
    """``$ADASMOOTH_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("ADASMOOTH_DATA", "data"))


def declared_files(dataset: str, split: str) -> tuple[str, ...]:
    """The files data set ``dataset`` declares for source split ``split`` ("train" or "test")."""
    return DATASETS.info(dataset)["files"].get(split, ())


def describe_files(dataset: str) -> str:
    """One line: what ``dataset`` reads under --data-dir, from its declaration."""
    info = DATASETS.info(dataset)
    files = info["files"]
    if not files:
        return info["files_where"]
    if files["train"] == files["test"]:
        text = ", ".join(files["train"])
    else:
        text = "; ".join(f"{split}: {', '.join(files[split])}" for split in SOURCE_SPLITS)
    return text + (f" ({info['files_where']})" if info.get("files_where") else "")


def files_help() -> str:
    """What every registered data set reads, for ``--data-dir``'s help."""
    return "files per data set: " + " | ".join(f"{name}: {describe_files(name)}" for name in DATASETS.names())


def missing_files_error(dataset: str, split: str, looked_in: Sequence[Path], wanted: str | None = None) -> DataError:
    """The error for a split whose files are not there: the file looked for (``wanted``, else the
    split's declared files), the declaration and where it looked."""
    declared = declared_files(dataset, split)
    where = ", ".join(str(c) for c in looked_in)
    alternative = DATASETS.info(dataset).get("files_where")
    extra = f" ({alternative})" if alternative else ""
    if wanted:
        what = f"file {wanted!r}{extra}, looked in: {where} ({dataset} {split} reads {', '.join(declared)})"
    else:
        what = f"{', '.join(declared)}{extra}, looked in: {where}"
    return DataError(f"{dataset} {split}: expected {what}; pass --data-dir pointing at the folder that holds them")


def find_file(name: str, candidates: Sequence[Path], dataset: str, split: str) -> Path:
    """The first ``folder / name`` that exists; a DataError naming the file and every place looked in
    otherwise. Only files ``dataset`` declares for ``split`` may be looked for (the declaration is the
    list users see)."""
    if name not in declared_files(dataset, split):
        raise ValueError(f"data set {dataset!r} reads {name!r} for split {split!r} but does not declare it "
                         f"(declared: {declared_files(dataset, split)})")
    for folder in candidates:
        if (folder / name).is_file():
            return folder / name
    raise missing_files_error(dataset, split, candidates, name)


def _validation_indices(n: int, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of the held-out part (``split == "val"``) or of the rest of the training set."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return np.sort(perm[:n_val] if split == "val" else perm[n_val:])


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    image: Any = None,
    workers: int = 0,
) -> Dataset:
    """Load ``split`` in {"train", "val", "test"} of a registered data set.

    With ``val_fraction > 0`` a deterministic (by ``seed``) part of the training set is held out:
    ``split="train"`` returns the rest and ``split="val"`` returns the held-out part. ``image``
    (:class:`~adasmooth.data.images.ImageOptions`) sets crop, resize, subset list and label file of
    image-file data sets; the others ignore it. ``workers`` processes decode image files
    (:meth:`Dataset.with_workers`).
    """
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0.0:
        raise ConfigError("split='val' needs val_fraction > 0")
    info = DATASETS.info(name)
    source_split = "test" if split == "test" else "train"
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if info.get("image_files"):
        data = loader(source_split, data_dir, image)
        if source_split == "train" and val_fraction > 0:
            data = data.select(_validation_indices(len(data), split, val_fraction, seed))
        data.split = split
        return data.with_workers(workers)
    x, y = loader(source_split, data_dir)
    if tuple(x.shape[1:]) != info["input_shape"]:
        raise DataError(f"{name} {source_split} in {data_dir}: images of shape {tuple(x.shape[1:])}, "
                        f"expected {info['input_shape']}")
    if source_split == "train" and val_fraction > 0:
        idx = _validation_indices(len(y), split, val_fraction, seed)
        x, y = x[idx], y[idx]
    num_classes = info["num_classes"]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes - 1}] in {data_dir}")
    # numpy leaves the stride of a size-1 axis arbitrary: single-channel images could arrive with the
    # strides of a channels-last tensor, on which torch's CPU convolution backward has crashed. Copy to
    # the standard layout.
    images = torch.from_numpy(np.ascontiguousarray(x)).clone(memory_format=torch.contiguous_format)
    return Dataset(images, torch.from_numpy(y), num_classes, name, split).with_workers(workers)
