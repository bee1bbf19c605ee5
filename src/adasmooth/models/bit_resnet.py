"""BiT ResNet-v2 (Kolesnikov et al., "Big Transfer"): the standard model of the authors' composites.

A pre-activation bottleneck ResNet with GroupNorm(32) and weight-standardised convolutions, with the
state-dict layout of RobustBench's ``bit_rn.py`` (``root.conv``, ``body.block1.unit01.conv1``, ...,
``head.gn``, ``head.conv``), so the ``<name>.pt_m0.pt`` files of the ``Bai2023Improving`` entries load
with a strict key check. Differences that do not touch the weights: the normalisation constants are
non-persistent buffers (they follow the model's device, and RobustBench's files do not hold them),
``forward`` returns logits only, and an optional ``input_size`` resizes inputs inside the model (the
composites feed their BiT 128x128 bilinear upsamplings of CIFAR images).

``stage_names`` list ``body.block1`` and ``body.block2`` first after the root, so the mixing network's
default taps are the two stages the authors tap.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from .base import ModelSpec

__all__ = ["StdConv2d", "BitResNetV2", "BIT_VARIANTS", "bit_config_from_state_dict"]

# name -> (units per block, width factor); the R152x2 is the composites' standard model
BIT_VARIANTS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "BiT-M-R50x1": ((3, 4, 6, 3), 1),
    "BiT-M-R50x3": ((3, 4, 6, 3), 3),
    "BiT-M-R101x1": ((3, 4, 23, 3), 1),
    "BiT-M-R101x3": ((3, 4, 23, 3), 3),
    "BiT-M-R152x2": ((3, 8, 36, 3), 2),
    "BiT-M-R152x4": ((3, 8, 36, 3), 4),
}

# BiT normalises with mean = std = 0.5; the 1e-8 is part of the reference arithmetic
_BIT_MEAN, _BIT_STD, _BIT_STD_EPS = 0.5, 0.5, 1e-8


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (population variance, eps 1e-10) on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _Bottleneck(nn.Module):
    """Pre-activation bottleneck; the stride sits on the 3x3 convolution, the projection is pre-activated."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cin)
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride, bias=False)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.gn1(x))
        skip = self.downsample(pre) if self.downsample is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + skip


def _block(units: int, cin: int, cout: int, cmid: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        (f"unit{i:02d}", _Bottleneck(cin if i == 1 else cout, cout, cmid, stride if i == 1 else 1))
        for i in range(1, units + 1)))


class _Head(nn.Sequential):
    def __init__(self, channels: int, num_classes: int):
        # named children give the reference keys head.gn.* and head.conv.*
        super().__init__(OrderedDict([("gn", nn.GroupNorm(32, channels)), ("relu", nn.ReLU()),
                                      ("avg", nn.AdaptiveAvgPool2d(1)),
                                      ("conv", nn.Conv2d(channels, num_classes, 1, bias=True))]))


class BitResNetV2(nn.Module):
    """BiT ResNet-v2: root (7x7/2 conv, pad 1, 3x3/2 max-pool), four bottleneck blocks, GN-ReLU-pool-1x1 head.

    ``units`` per block and ``width_factor`` pick the variant (:data:`BIT_VARIANTS`); block k has
    ``256 * 2**(k-1) * width_factor`` output channels. ``input_size`` (pixels), when given, resizes
    every input bilinearly to that square size first.
    """

    def __init__(self, units: Sequence[int] = (3, 8, 36, 3), width_factor: int = 2, num_classes: int = 10,
                 input_size: int | None = None, input_shape: Sequence[int] | None = (3, 32, 32),
                 dataset: str | None = None):
        super().__init__()
        units = tuple(int(u) for u in units)
        if len(units) != 4 or min(units) < 1:
            raise ConfigError(f"BiT needs four positive unit counts, got {units}")
        if width_factor < 1 or num_classes < 2:
            raise ConfigError(f"BiT needs width_factor >= 1 and num_classes >= 2, got {width_factor}, {num_classes}")
        if input_size is not None and input_size < 32:
            raise ConfigError(f"input_size must be >= 32 pixels, got {input_size}")
        wf = int(width_factor)
        self.units, self.width_factor, self.input_size = units, wf, input_size
        self.register_buffer("mean", torch.full((1, 3, 1, 1), _BIT_MEAN), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), _BIT_STD), persistent=False)
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, 64 * wf, 7, 2, 3, bias=False)),
            ("pad", nn.ConstantPad2d(1, 0.0)),
            ("pool", nn.MaxPool2d(3, 2, 0)),
        ]))
        self.body = nn.Sequential(OrderedDict([
            ("block1", _block(units[0], 64 * wf, 256 * wf, 64 * wf, 1)),
            ("block2", _block(units[1], 256 * wf, 512 * wf, 128 * wf, 2)),
            ("block3", _block(units[2], 512 * wf, 1024 * wf, 256 * wf, 2)),
            ("block4", _block(units[3], 1024 * wf, 2048 * wf, 512 * wf, 2)),
        ]))
        self.head = _Head(2048 * wf, num_classes)
        self.stage_names = ("root", "body.block1", "body.block2", "body.block3", "body.block4", "head")
        self.spec = ModelSpec("bit-resnet-v2", num_classes, 3, [_BIT_MEAN] * 3, [_BIT_STD] * 3,
                              {"units": list(units), "width_factor": wf, "input_size": input_size},
                              tuple(input_shape) if input_shape is not None else None, dataset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"BiT expects inputs of shape (N, 3, H, W), got {tuple(x.shape)}")
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / (self.std.to(x.dtype) + _BIT_STD_EPS)
        out = self.head(self.body(self.root(x)))
        return out.flatten(1)


_UNIT_KEY = re.compile(r"body\.block([1-4])\.unit(\d+)\.")


def bit_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """``units``, ``width_factor`` and ``num_classes`` of the BiT whose weights are ``state``."""
    try:
        root = state["root.conv.weight"]
        head = state["head.conv.weight"]
    except KeyError as err:
        raise CheckpointError(f"{source} is not a BiT ResNet-v2 state dict (no {err.args[0]})") from None
    if root.shape[0] % 64:
        raise CheckpointError(f"{source}: root.conv has {root.shape[0]} channels, not a multiple of 64")
    units = [0, 0, 0, 0]
    for key in state:
        m = _UNIT_KEY.match(key)
        if m:
            units[int(m.group(1)) - 1] = max(units[int(m.group(1)) - 1], int(m.group(2)))
    return {"units": tuple(units), "width_factor": root.shape[0] // 64, "num_classes": head.shape[0]}
