"""WideResNet-depth-widen_factor (Zagoruyko & Komodakis) with pre-activation blocks: ``wrn-D-W``."""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError
from .base import StagedModel, register_model
from .resnet import GlobalPoolHead, PreActBlock, make_stage


def wide_resnet_layout(depth: int, width: int) -> tuple[int, list[int]]:
    """(blocks per group, [stem, group 1, group 2, group 3 widths]) of a WideResNet-depth-width."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ConfigError(f"WideResNet depth must be 6n+4 (e.g. 28, 34, 70), got {depth}")
    if width < 1:
        raise ConfigError(f"WideResNet widen_factor (width) must be >= 1, got {width}")
    return (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]


@register_model("wideresnet", pattern=r"wrn-(?P<depth>\d+)-(?P<widen_factor>\d+)", shown_as="wrn-<depth>-<width>")
class WideResNet(StagedModel):
    """depth = 6n + 4; stages: stem, block1, block2, block3, head (block1 of WRN-70-16 has 256 channels)."""

    stage_names = ("stem", "block1", "block2", "block3", "head")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 34,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        n, widths = wide_resnet_layout(depth, widen_factor)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = make_stage(PreActBlock, widths[0], widths[1], n, 1, dropout=dropout)
        self.block2 = make_stage(PreActBlock, widths[1], widths[2], n, 2, dropout=dropout)
        self.block3 = make_stage(PreActBlock, widths[2], widths[3], n, 2, dropout=dropout)
        self.head = GlobalPoolHead(widths[3], num_classes, pre_activation=True)
