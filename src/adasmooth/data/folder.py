"""Image folders and ImageNet, decoded from JPEG/PNG files on demand.

Layout under ``--data-dir`` (the same for ``folder`` and ``imagenet``)::

    train/<class>/<image>.jpg|.jpeg|.png     the training split, one sub-folder per class
    test/ (or val/)                          the test split: either one sub-folder per class, or the
                                             images directly plus a label file
    <split folder>_labels.txt                e.g. val_labels.txt: '<file name> <class name or index>' lines

Crop and resize left unset are chosen from the images (see :mod:`.images`: their own size when they all
share one) and written into the options given, so that a run's config records the sizes used and the
test split loaded with the same options gets the training split's sizes.

Class index = position of the class folder's name in the sorted names of ``train/`` (of the test
folder, or of the label file's names, when there is no ``train/``). Examples are ordered by class, then
file name (flat folders: by file name), unless a subset list (``--image-subset``) gives the files, one
path per line relative to the split folder, in its own order: RobustBench's 5000 ImageNet validation
images come as such a list of ``<wnid>/<file>`` lines, which also select from a flat ``val/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from .augment import augment_batch, example_uniforms, uniforms_needed
from .base import Dataset, declared_files, register_image_files
from .images import (IMAGE_SUFFIXES, ImageOptions, common_image_size, eval_transform, open_rgb, train_image,
                     warn_if_upscaled)

__all__ = ["ImageFolderDataset", "scan_image_folder", "load_image_folder"]

DECODE_BATCH = 32  # images per task of a decoding worker process
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderDataset(Dataset):
    """A split of image files: decoded (and augmented) batch by batch; ``x`` decodes them all, once."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | torch.Tensor, num_classes: int, name: str,
                 split: str, options: ImageOptions, classes: Sequence[str] | None = None):
        # Dataset's own fields hold tensors; here ``x`` and ``y`` are properties, so its __init__ is not run.
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        self.num_classes, self.name, self.split = int(num_classes), name, split
        self.options, self.classes = options, list(classes) if classes is not None else None
        self._x: torch.Tensor | None = None
        self._warned_upscale = False
        self.workers = 0  # processes that decode the files (see with_workers)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({self.name!r}, split={self.split!r}, {len(self)} images, "
                f"{self.num_classes} classes, input {self.input_shape})")

    def __getstate__(self):
        # Worker processes get the file list, not decoded images.
        return {**self.__dict__, "_x": None}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.options.size, self.options.size)

    @property
    def y(self) -> torch.Tensor:
        return self.labels

    @property
    def x(self) -> torch.Tensor:
        """All images, decoded for evaluation (cached): take a subset first on large sets."""
        if self._x is None:
            parallel = self.workers > 0 and len(self) > 0
            self._x = torch.cat([x for x, _ in self._decoded_batches(DECODE_BATCH)]) if parallel else \
                self.load(torch.arange(len(self)))[0]
        return self._x

    def with_workers(self, workers: int) -> "ImageFolderDataset":
        """This data set, its files decoded by ``workers`` worker processes (0: in this process) whenever
        it decodes more than one image: ``x`` and ``batches``; the images are the same for any count."""
        super().with_workers(workers)
        self.workers = int(workers)
        return self

    def _decoded_batches(self, batch_size: int):
        # in file order, each batch decoded by one of the worker processes
        for x, y, _ in self.stream(batch_size, shuffle=False, workers=self.workers):
            yield x, y

    def select(self, indices) -> "ImageFolderDataset":
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        part = ImageFolderDataset([self.files[i] for i in idx], self.labels[idx], self.num_classes, self.name,
                                  self.split, self.options, self.classes)
        part._warned_upscale, part.workers = self._warned_upscale, self.workers
        return part

    def subset(self, n: int | None) -> "ImageFolderDataset":
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"need at least one example, got n={n}")
        return self.select(range(n))

    def batches(self, batch_size: int):
        if self._x is None and self.workers > 0:
            yield from self._decoded_batches(batch_size)
            return
        for i in range(0, len(self), batch_size):
            if self._x is not None:
                yield self._x[i:i + batch_size], self.labels[i:i + batch_size]
            else:
                yield self.load(torch.arange(i, min(i + batch_size, len(self))))

    def load(self, indices: torch.Tensor, augment: str = "none", seed: int = 0, epoch: int = 0):
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if augment == "resized-crop-flip":
            # cropped from the decoded file, before any resizing: the whole image is the crop's range
            u = example_uniforms(seed, epoch, idx, uniforms_needed(augment))
            images = [train_image(self.files[i], self.options, u[j]) for j, i in enumerate(idx.tolist())]
        else:
            images = [self._eval_image(self.files[i]) for i in idx.tolist()]
        size = self.options.size
        x = torch.stack(images) if images else torch.zeros(0, 3, size, size)
        return augment_batch(x, idx, "none" if augment == "resized-crop-flip" else augment, seed, epoch), self.labels[idx]


    def _eval_image(self, path: Path) -> torch.Tensor:
        img = open_rgb(path)
        if not self._warned_upscale:  # images of several sizes: the first one resized up much says so
            self._warned_upscale = warn_if_upscaled(f"{self.name} {self.split} ({path})", img.size, self.options)
        return eval_transform(img, self.options)


# ---------------------------------------------------------------------------- scanning a folder


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


# What the image-folder data sets read, the registry's declaration: the loader's split folders are the
# first parts of these patterns, so the declaration, the errors and the loader cannot disagree.
FOLDER_FILES = {
    "train": ("train/<class>/<image>",),
    "test": ("test/<class>/<image>", "test/<image> + test_labels.txt", "val/<class>/<image>",
             "val/<image> + val_labels.txt"),
}
FOLDER_WHERE = f"<image>: {', '.join(IMAGE_SUFFIXES)}; another label file with --image-labels"


def _split_root(name: str, split: str, data_dir: Path) -> Path:
    declared = declared_files(name, split)
    candidates = [data_dir / d for d in dict.fromkeys(pattern.split("/")[0] for pattern in declared)]
    for folder in candidates:
        if folder.is_dir():
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise DataError(f"{name} {split}: expected the folder {where} ({name} {split} reads {', '.join(declared)}); "
                    f"pass --data-dir pointing at the folder that holds it")


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the {what} {path}: {err}") from err
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _check_classes(name: str, classes: list[str], where: Path, expected: int | None) -> None:
    if expected is not None and len(classes) != expected:
        raise DataError(f"{name}: {len(classes)} classes in {where}, expected {expected}")
    if len(classes) < 2:
        raise DataError(f"{name}: {where} has {len(classes)} class(es); need at least 2 class sub-folders")


def _label_of(token: str, class_to_idx: dict[str, int], num_classes: int, where: str) -> int:
    if token in class_to_idx:
        return class_to_idx[token]
    if token.lstrip("-").isdigit():
        value = int(token)
        if 0 <= value < num_classes:
            return value
        raise DataError(f"{where}: label {value} outside [0, {num_classes - 1}]")
    raise DataError(f"{where}: unknown class {token!r}")


def _read_subset(path: Path) -> list[tuple[str, Path]]:
    """(where, relative path) of each line of a subset list."""
    if not path.is_file():
        raise DataError(f"subset list {path} not found")
    return [(f"{path}:{n}", Path(line.split()[0])) for n, line in _read_lines(path, "subset list")]


def scan_image_folder(name: str, split: str, data_dir: Path, options: ImageOptions,
                      num_classes: int | None = None) -> tuple[list[Path], list[int], list[str] | None, int]:
    """(files, labels, class names or None, class count) of ``split``; a DataError naming the file
    or folder that is missing or wrong."""
    root = _split_root(name, split, data_dir)
    train_root = data_dir / "train"
    classes = _visible_dirs(train_root) if train_root.is_dir() else None
    own = _visible_dirs(root)
    subset = _read_subset(Path(options.subset)) if options.subset else None
    files: list[Path] = []
    labels: list[int] = []
    if own:  # one sub-folder per class
        if classes is None or root == train_root:
            classes = own
        _check_classes(name, classes, train_root if train_root.is_dir() else root, num_classes)
        class_to_idx = {c: i for i, c in enumerate(classes)}
        for c in own:
            if c not in class_to_idx:
                raise DataError(f"class folder {root / c} is not a class of {train_root}")
        if subset is None:
            for c in own:
                images = _images_in(root / c)
                if not images:
                    raise DataError(f"class folder {root / c} holds no {'/'.join(IMAGE_SUFFIXES)} image")
                files += images
                labels += [class_to_idx[c]] * len(images)
        else:
            for where, rel in subset:
                folder = root / rel.parts[0] if len(rel.parts) > 1 else None
                if folder is None or rel.parts[0] not in class_to_idx or not folder.is_dir():
                    raise DataError(f"{where}: missing class folder {folder or root / rel} for {rel}")
                if not (root / rel).is_file():
                    raise DataError(f"{where}: image {root / rel} not found")
                files.append(root / rel)
                labels.append(class_to_idx[rel.parts[0]])
        return files, labels, classes, len(classes)
    # images directly in the folder, labels from a file
    label_file = Path(options.labels) if options.labels else data_dir / f"{root.name}_labels.txt"
    if not label_file.is_file():
        raise DataError(f"{name} {split}: {root} has no class sub-folders, so it needs a label file; expected "
                        f"{label_file} ('<file> <class name or index>' per line), or pass --image-labels")
    entries = []
    for n, line in _read_lines(label_file, "label file"):
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"{label_file}:{n}: expected '<file> <label>', got {line!r}")
        entries.append((f"{label_file}:{n}", parts[0], parts[-1]))
    names = sorted({tok for _, _, tok in entries if not tok.lstrip("-").isdigit()})
    if classes is None and names:
        classes = names
    if classes is not None:
        _check_classes(name, classes, train_root if train_root.is_dir() else label_file, num_classes)
    count = len(classes) if classes is not None else num_classes
    if count is None:
        count = 1 + max((int(tok) for _, _, tok in entries), default=1)
    class_to_idx = {c: i for i, c in enumerate(classes or [])}
    by_file = {fname: _label_of(tok, class_to_idx, count, where) for where, fname, tok in entries}
    if subset is None:
        chosen = [(str(label_file), Path(f)) for f in sorted(by_file)]
    else:
        chosen = subset
    for where, rel in chosen:
        key = rel.as_posix() if rel.as_posix() in by_file else rel.name
        if key not in by_file:
            raise DataError(f"{where}: {rel} has no label in {label_file}")
        path = root / key
        if not path.is_file():
            raise DataError(f"{where}: image {path} not found")
        files.append(path)
        labels.append(by_file[key])
    if not files:
        raise DataError(f"{name} {split}: no images listed in {label_file}")
    return files, labels, classes, count


def load_image_folder(name: str, split: str, data_dir: Path, options: ImageOptions | None,
                      num_classes: int | None = None) -> ImageFolderDataset:
    options = options if options is not None else ImageOptions()
    if not isinstance(options, ImageOptions):
        raise ConfigError(f"image options must be an ImageOptions, got {type(options).__name__}")
    options.validate()
    files, labels, classes, count = scan_image_folder(name, split, Path(data_dir), options, num_classes)
    data = ImageFolderDataset(files, np.asarray(labels, dtype=np.int64), count, name, split, options, classes)
    if options.crop is None or options.resize is None:
        common = common_image_size(files)
        chosen = options.resolved(common)
        options.crop, options.resize = chosen.crop, chosen.resize  # in place: see the module docstring
        options.validate()
        if common is not None:
            data._warned_upscale = warn_if_upscaled(f"{name} {split}", common, options)
    return data


@register_image_files("folder", num_classes=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="resized-crop-flip",
                      files=FOLDER_FILES, files_where=FOLDER_WHERE)
def load_folder(split: str, data_dir: Path, options: ImageOptions | None = None) -> ImageFolderDataset:
    return load_image_folder("folder", split, data_dir, options)


@register_image_files("imagenet", num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      augment="resized-crop-flip", files=FOLDER_FILES, files_where=FOLDER_WHERE)
def load_imagenet(split: str, data_dir: Path, options: ImageOptions | None = None) -> ImageFolderDataset:
    return load_image_folder("imagenet", split, data_dir, options, num_classes=1000)
