"""The convolutional stems of Singh et al. 2023 ("Revisiting Adversarial Training for ImageNet"),
RobustBench's ``Singh2023Revisiting_*-ConvStem`` entries: 3x3 convolutions, each followed by a
channels-first layer norm and GELU, optionally closed by a 1x1 projection.

The state-dict keys are those of RobustBench's ``convstem_models.py`` (``stem.0.weight``,
``stem.1.weight``, ...: the sequence sits under ``stem``), so its files load without renaming.
The four stems RobustBench builds, as (widths, strides, projection):

- ConvNeXt-T/S: (48, 96), (2, 2), none                     (its ``ConvBlock1(48)``)
- ConvNeXt-B:   (64, 96, 128), (2, 2, 1), none             (``ConvBlock3(64)``)
- ConvNeXt-L:   (96, 144, 192), (2, 2, 1), none            (``ConvBlock3(96)``)
- ViT-S:        (48, 96, 192, 384), (2, 2, 2, 2), 384       (``ConvBlock(48, end_siz=8)``)
- ViT-B:        (48, 96, 192, 384), (2, 2, 2, 2), 768       (``ConvBlock(48, end_siz=16, fin_dim=None)``)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

__all__ = ["ChannelsFirstLayerNorm", "ConvStem", "CONVSTEMS"]


class ChannelsFirstLayerNorm(nn.Module):
    """Layer norm over the channels of an (N, C, H, W) tensor (ConvNeXt's, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    def __init__(self, widths: Sequence[int], strides: Sequence[int], projection: int | None = None,
                 in_channels: int = 3):
        super().__init__()
        if not widths or len(widths) != len(strides):
            raise ConfigError(f"ConvStem needs one stride per width, got widths {list(widths)}, strides {list(strides)}")
        layers: list[nn.Module] = []
        cin = in_channels
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(cin, int(width), 3, int(stride), 1), ChannelsFirstLayerNorm(int(width)), nn.GELU()]
            cin = int(width)
        if projection:
            layers.append(nn.Conv2d(cin, int(projection), 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


_VIT_WIDTHS, _VIT_STRIDES = (48, 96, 192, 384), (2, 2, 2, 2)
# name -> ConvStem keyword arguments plus where it goes (see vision.VisionModel)
CONVSTEMS: dict[str, dict] = {
    "convnext-t/s": {"slot": "convnext", "widths": (48, 96), "strides": (2, 2)},
    "convnext-b": {"slot": "convnext", "widths": (64, 96, 128), "strides": (2, 2, 1)},
    "convnext-l": {"slot": "convnext", "widths": (96, 144, 192), "strides": (2, 2, 1)},
    "vit-s": {"slot": "vit", "widths": _VIT_WIDTHS, "strides": _VIT_STRIDES, "projection": 384},
    "vit-b": {"slot": "vit", "widths": _VIT_WIDTHS, "strides": _VIT_STRIDES, "projection": 768},
}
