"""DeepMind's WideResNet and pre-activation ResNet (Gowal et al. 2020, Rebuffi et al. 2021), as RobustBench
ships them: ``dm-wrn-<depth>-<width>`` and ``dm-preact-resnet18``.

The module names are RobustBench's (``init_conv``, ``layer.0.block.3.conv_0``, ``logits``, ...), so
its files load without renaming. The normalisation lives in adasmooth's ``normalize`` buffers, which
RobustBench's files do not hold (its ``mean``/``std`` buffers are not persistent). Strided
convolutions pad like TensorFlow's ``SAME`` (only right and bottom), not symmetrically: the
weights were trained that way, and symmetric padding changes every logit.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from .base import StagedModel, register_model
from .wideresnet import wide_resnet_layout

__all__ = ["DMWideResNet", "DMPreActResNet", "ACTIVATIONS", "same_pad", "global_pool"]

# Swish (Gowal 2020, Rebuffi 2021) and SiLU (Wang 2023) are the same function x * sigmoid(x);
# RobustBench's Swish only differs in hand-written backward code.
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU}


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow ``SAME`` padding for a 3x3 kernel: one pixel all round at stride 1, right/bottom only at 2."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ConfigError(f"stride {stride} is not supported by DeepMind's blocks (1 or 2)")


def global_pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        # A projection shortcut sees the activated input, the identity the raw one (as DeepMind's code).
        skip = self.shortcut(act) if self.shortcut is not None else x
        out = self.conv_0(same_pad(act, self.stride))
        return skip + self.conv_1(self.relu_1(self.batchnorm_1(out)))


class _BlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@register_model("dm-wideresnet", pattern=r"dm-wrn-(?P<depth>\d+)-(?P<width>\d+)", shown_as="dm-wrn-<depth>-<width>")
class DMWideResNet(StagedModel):
    """depth = 6n + 4, widths 16, 16w, 32w, 64w. ``activation``: swish / silu (the same) or relu."""

    stage_names = ("init_conv", "layer.0", "layer.1", "layer.2", "logits")

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 28, width: int = 10,
                 activation: str = "swish"):
        super().__init__()
        act = _activation(activation)
        n, widths = wide_resnet_layout(depth, width)
        self.init_conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(*[_BlockGroup(n, widths[i], widths[i + 1], 1 if i == 0 else 2, act)
                                     for i in range(3)])
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.relu = act()
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self.normalized(x)))
        return self.logits(global_pool(self.relu(self.batchnorm(out))))


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = act()
        self.conv_2d_1 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = act()
        self.conv_2d_2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        # DeepMind's projection is a 3x3 convolution of the raw (not activated) input.
        self.has_shortcut = stride != 1 or cin != cout
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        skip = self.shortcut(same_pad(x, self.stride)) if self.has_shortcut else x
        out = self.conv_2d_1(same_pad(out, self.stride))
        return self.conv_2d_2(self.relu_1(self.batchnorm_1(out))) + skip


@register_model("dm-preact-resnet", pattern=r"dm-preact-resnet(?P<depth>18|34)", shown_as="dm-preact-resnet<18|34>")
class DMPreActResNet(StagedModel):
    """Pre-activation ResNet-18/34 with 64-128-256-512 channels, as in Rebuffi et al. 2021."""

    stage_names = ("conv_2d", "layer_0", "layer_1", "layer_2", "layer_3", "logits")

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 18, activation: str = "swish"):
        super().__init__()
        blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
        if depth not in blocks:
            raise ConfigError(f"DMPreActResNet depth must be 18 or 34, got {depth}")
        act = _activation(activation)
        self.conv_2d = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        widths = (64, 64, 128, 256, 512)
        for i, n in enumerate(blocks[depth]):
            stride = 1 if i == 0 else 2
            layer = [_PreActBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1, act)
                     for j in range(n)]
            setattr(self, f"layer_{i}", nn.Sequential(*layer))
        self.batchnorm = nn.BatchNorm2d(512)
        self.relu = act()
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_2d(self.normalized(x))
        for i in range(4):
            out = getattr(self, f"layer_{i}")(out)
        return self.logits(global_pool(self.relu(self.batchnorm(out))))


_BLOCK_KEY = re.compile(r"layer\.0\.block\.(\d+)\.")


def dm_wrn_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """``depth``, ``width`` and ``num_classes`` of the DM WideResNet whose weights are ``state``."""
    try:
        first = state["layer.0.block.0.conv_0.weight"]
        logits = state["logits.weight"]
    except KeyError as err:
        raise CheckpointError(f"{source} is not a DeepMind WideResNet state dict (no {err.args[0]})") from None
    if first.shape[0] % 16:
        raise CheckpointError(f"{source}: layer.0 has {first.shape[0]} channels, not a multiple of 16")
    n = 1 + max(int(m.group(1)) for m in map(_BLOCK_KEY.match, state) if m)
    return {"depth": 6 * n + 4, "width": first.shape[0] // 16, "num_classes": logits.shape[0]}
