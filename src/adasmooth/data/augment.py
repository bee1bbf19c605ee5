"""Training augmentation, seeded per example.

Every random choice for example ``i`` of epoch ``e`` comes from :func:`example_uniforms` ``(seed, e, i)``,
a counter-based hash (splitmix64): the same example gets the same crop and flip whatever the batch size,
the order, the number of worker processes or the point a run was resumed from.

Augmentations (``AUGMENTATIONS``):

- ``none``;
- ``crop``: random crop of the input size from the image zero-padded by 4 pixels on each side;
- ``crop-flip``: ``crop``, then a horizontal flip with probability 1/2 (the CIFAR recipe);
- ``resized-crop-flip``: a random part of the image (8-100 % of its area, aspect ratio 3/4-4/3,
  10 tries, else the largest centred part of allowed ratio) resized to the input size, then a flip
  with probability 1/2 (the ImageNet recipe). Image folders apply it to the decoded file.

The functions on tensors work on any device and dtype; the uniforms are float64 numpy arrays.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ConfigError

__all__ = [
    "AUGMENTATIONS",
    "CROP_PADDING",
    "check_augmentation",
    "derived_seed",
    "example_uniforms",
    "uniforms_needed",
    "crop_flip",
    "resized_crop_box",
    "resized_crop_flip",
    "augment_batch",
]

AUGMENTATIONS = ("none", "crop", "crop-flip", "resized-crop-flip")
CROP_PADDING = 4
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
RESIZED_CROP_TRIES = 10

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def check_augmentation(name: str) -> str:
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
    return name


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic is the point)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(seed: int, epoch: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        k = _mix64(np.array([(int(seed) + _GOLDEN) & _MASK], dtype=np.uint64))
        return _mix64(k ^ np.uint64((int(epoch) * _GOLDEN + 1) & _MASK))


def derived_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for torch generators, from (seed, epoch): one stream per epoch."""
    return int(_key(seed, epoch)[0] >> np.uint64(1))


def example_uniforms(seed: int, epoch: int, indices: Sequence[int] | np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """``(len(indices), k)`` float64 uniforms in [0, 1), a pure function of (seed, epoch, index, column)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    cols = np.arange(1, k + 1, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        per_example = _mix64(_key(seed, epoch) + idx * np.uint64(_GOLDEN))
        bits = _mix64(per_example + cols * np.uint64(_GOLDEN))
    # The top 53 bits are exactly representable in float64.
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def uniforms_needed(name: str) -> int:
    """How many uniforms one example of augmentation ``name`` draws."""
    return {"none": 0, "crop": 2, "crop-flip": 3, "resized-crop-flip": 4 * RESIZED_CROP_TRIES + 1}[
        check_augmentation(name)]


def crop_flip(x: torch.Tensor, u: np.ndarray, padding: int = CROP_PADDING, flip: bool = True) -> torch.Tensor:
    """Random crop of (H, W) from ``x`` (N, C, H, W) zero-padded by ``padding``, then (if ``flip``) a
    horizontal flip; ``u[:, 0:2]`` choose the offsets, ``u[:, 2] < 0.5`` the flip."""
    n, c, h, w = x.shape
    span = 2 * padding + 1
    u_t = torch.as_tensor(u, device=x.device)
    top = (u_t[:, 0] * span).long().clamp_(max=span - 1)
    left = (u_t[:, 1] * span).long().clamp_(max=span - 1)
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    if flip:
        cols = torch.where((u_t[:, 2] < 0.5)[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def resized_crop_box(height: int, width: int, u: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random resized crop, from ``4 * RESIZED_CROP_TRIES``
    uniforms (scale, log-ratio, top, left per try)."""
    area = height * width
    lo, hi = (math.log(r) for r in RESIZED_CROP_RATIO)
    for t in range(RESIZED_CROP_TRIES):
        us, ur, ut, ul = (float(v) for v in u[4 * t: 4 * t + 4])
        target = area * (RESIZED_CROP_SCALE[0] + us * (RESIZED_CROP_SCALE[1] - RESIZED_CROP_SCALE[0]))
        ratio = math.exp(lo + ur * (hi - lo))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(ut * (height - ch + 1)), int(ul * (width - cw + 1)), ch, cw
    # No try fitted (very elongated image): the largest centred part whose ratio is allowed.
    ratio = width / height
    if ratio < RESIZED_CROP_RATIO[0]:
        cw, ch = width, int(round(width / RESIZED_CROP_RATIO[0]))
    elif ratio > RESIZED_CROP_RATIO[1]:
        ch, cw = height, int(round(height * RESIZED_CROP_RATIO[1]))
    else:
        ch, cw = height, width
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def resized_crop_flip(x: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """Random resized crop of each image of ``x`` (N, C, H, W) back to (H, W), then a flip when the
    last uniform is < 0.5."""
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        top, left, ch, cw = resized_crop_box(h, w, u[i])
        part = x[i: i + 1, :, top: top + ch, left: left + cw]
        part = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out.append(part.flip(-1) if u[i, -1] < 0.5 else part)
    return torch.cat(out).clamp_(0.0, 1.0) if out else x


def augment_batch(x: torch.Tensor, indices, name: str, seed: int, epoch: int) -> torch.Tensor:
    """``x`` (N, C, H, W) augmented by ``name``, example ``indices[j]`` seeded by (seed, epoch, indices[j])."""
    if check_augmentation(name) == "none" or x.shape[0] == 0:
        return x
    u = example_uniforms(seed, epoch, indices, uniforms_needed(name))
    if name == "resized-crop-flip":
        return resized_crop_flip(x, u)
    return crop_flip(x, u, flip=name == "crop-flip")
