"""Image files to tensors with Pillow, without torchvision.

Evaluation: resize so that the short side is ``resize`` (bilinear, Pillow's antialiasing), then a
centre crop of ``crop`` x ``crop``. Training: a random resized crop straight from the decoded file (see
:mod:`.augment`). Values are in [0, 1]; normalisation stays inside the model.

Sizes left unset (:meth:`ImageOptions.resolved`): when all images share one size, ``crop`` is their short
side and nothing is resized up (a folder of 32x32 images is used as it is); otherwise the usual ImageNet
protocol, resize 256 and crop 224 (RobustBench's "Res256Crop224"), with ``resize`` = crop * 8/7 for
another crop. Images resized up by 2x or more are worth a warning: the model sees mostly interpolation.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..core.checks import check_counts
from ..core.config import option
from ..core.errors import ConfigError, DataError, MissingDependencyError
from .augment import resized_crop_box

__all__ = ["ImageOptions", "image_options", "IMAGE_SUFFIXES", "open_rgb", "image_size", "common_image_size",
           "resize_short_side", "center_crop_box", "eval_image", "eval_transform", "train_image", "to_tensor",
           "UPSCALE_WARNING"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_CROP = 224
UPSCALE_WARNING = 2.0  # images resized up by this factor or more get a warning

logger = logging.getLogger(__name__)


@dataclass
class ImageOptions:
    """How image-folder data sets (``folder``, ``imagenet``) become tensors; ignored by the others."""

    crop: int | None = option(None, help="side of the square model input (image data sets): centre crop for "
                                         "evaluation, random resized crop for training (default: the "
                                         "checkpoint's input size, else the images' own when they all share "
                                         "one, else 224)")
    resize: int | None = option(None, help="short side images are resized to before the centre crop "
                                           "(default: crop * 8/7, i.e. 256 for 224, but no more than images "
                                           "of one shared size already have)")
    subset: str | None = option(None, help="file listing the images to use, one path per line relative to the "
                                           "split folder, in this order (e.g. RobustBench's 5000 ImageNet images)")
    labels: str | None = option(None, help="label file of a flat image folder: '<file> <class name or index>' "
                                           "per line (default: <data-dir>/<split folder>_labels.txt)")

    def validate(self) -> None:
        check_counts(self, "crop", "resize")
        if self.resize is not None and self.crop is not None and self.resize < self.crop:
            raise ConfigError(f"image resize {self.resize} is smaller than the crop {self.crop}")

    @property
    def size(self) -> int:
        return self.crop if self.crop is not None else DEFAULT_CROP

    @property
    def short_side(self) -> int:
        return self.resize if self.resize is not None else int(round(self.size * 256 / 224))

    def resolved(self, common: tuple[int, int] | None) -> "ImageOptions":
        """These options with ``crop`` and ``resize`` set: unset ones from ``common``, the (width, height)
        all images share (None when they differ), as the module docstring says."""
        short = min(common) if common else None
        crop = self.crop
        if crop is None:
            crop = (self.resize or short) if short else DEFAULT_CROP
        resize = self.resize
        if resize is None:
            protocol = int(round(crop * 256 / 224))
            resize = max(crop, min(protocol, short)) if short else protocol
        return dataclasses.replace(self, crop=crop, resize=resize)

    def fit(self, input_shapes: Iterable[Sequence[int] | None]) -> "ImageOptions":
        """These options with ``crop`` defaulting to the side of the first known shape of ``input_shapes``
        (the (C, H, W) the checkpoints were trained on): evaluation then needs no ``--image-crop``."""
        shape = next((s for s in input_shapes if s), None)
        if self.crop is not None or shape is None:
            return self
        return dataclasses.replace(self, crop=int(shape[-1]))


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow is a dependency
        raise MissingDependencyError("image folders need Pillow: pip install Pillow") from err
    return Image


def open_rgb(path: Path):
    """The decoded RGB image at ``path``; a DataError naming the file when it is not a readable image."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image at ``path``, from its header (nothing decoded)."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def common_image_size(paths: Iterable[Path]) -> tuple[int, int] | None:
    """The (width, height) all the images share, None when two differ (or there are none, or one cannot
    be read: decoding it names the file); reads headers only, up to the first that differs."""
    common = None
    for path in paths:
        try:
            size = image_size(path)
        except DataError:
            return None
        if common is not None and size != common:
            return None
        common = size
    return common


def warn_if_upscaled(where: str, size: tuple[int, int], options: ImageOptions) -> bool:
    """Log a warning when images of ``size`` (width, height) are resized up by UPSCALE_WARNING or more;
    whether it did."""
    factor = options.short_side / min(size)
    if factor < UPSCALE_WARNING:
        return False
    logger.warning("%s: images of %dx%d are resized up %.1fx (short side %d, crop %d): the model sees mostly "
                   "interpolated pixels; is this the input size it was trained for?", where, size[0], size[1],
                   factor, options.short_side, options.size)
    return True


def resize_short_side(img, size: int):
    """``img`` scaled so that its short side is ``size`` (the long side rounded down, as torchvision does)."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, _pil().BILINEAR)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``size`` square; offsets rounded to nearest."""
    if size > width or size > height:
        raise ConfigError(f"crop {size} is larger than the resized image {width}x{height}")
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def to_tensor(img) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from an RGB image."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def eval_transform(img, options: ImageOptions) -> torch.Tensor:
    """A decoded image resized (short side ``options.short_side``) and centre-cropped, as a tensor."""
    img = resize_short_side(img, options.short_side)
    return to_tensor(img.crop(center_crop_box(*img.size, options.size)))


def eval_image(path: Path, options: ImageOptions) -> torch.Tensor:
    return eval_transform(open_rgb(path), options)


def train_image(path: Path, options: ImageOptions, u: np.ndarray) -> torch.Tensor:
    """A random resized crop of the file to ``crop`` x ``crop``, flipped when ``u[-1] < 0.5``."""
    Image = _pil()
    img = open_rgb(path)
    w, h = img.size
    top, left, ch, cw = resized_crop_box(h, w, u)
    out = img.resize((options.size, options.size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if u[-1] < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def image_options() -> Any:
    """The one declaration of the image-file options (``--image-crop``, ``--image-resize``,
    ``--image-subset``, ``--image-labels``) of every command that reads data."""
    return option(help="image-file options (folder, imagenet; the other data sets ignore them)",
                  default_factory=ImageOptions)
