"""Peng et al.'s robust-architecture WideResNet (RaWRN-70-16, RobustBench's ``Peng2023Robust``): ``ra-wrn-70-16``.

DeepMind's WideResNet blocks (:mod:`.dm_wide_resnet`) with three changes found by the authors'
architecture search: a 96-channel stem, uneven groups (30, 31, 10 blocks of 216, 432, 864 channels)
and a squeeze-excitation after each block's second convolution (ratio 0.25, ReLU inside, sigmoid
gate), all with SiLU. Module names are those of RobustBench's ``robustarch_wide_resnet.py``
(``init_conv``, ``layer.1.block.4.se.fc1``, ``logits``, ...), so its file loads without renaming;
its normalisation constants are plain attributes there (not in the file), buffers here.

RobustBench builds the squeeze-excitation from torchvision (``torchvision.ops.misc.SqueezeExcitation``),
which does not import on every machine; :class:`SqueezeExcitation` is the same function with the same
parameter names (``fc1``, ``fc2``: 1x1 convolutions with bias).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from .base import StagedModel, register_model
from .dm_wide_resnet import _WideBlock, global_pool, same_pad

__all__ = ["SqueezeExcitation", "RaWideResNet", "RA_WRN_70_16", "ra_wrn_config_from_state_dict"]

# robustarch_wide_resnet.get_model("ra_wrn70_16")
RA_WRN_70_16 = {"stem_width": 96, "depths": (30, 31, 10), "stage_widths": (216, 432, 864), "se_ratio": 0.25}


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W of x)))): a per-channel gate computed from the whole map."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(gate)


class _RaBlock(_WideBlock):
    """DeepMind's block with the squeeze-excitation on the residual branch, before the addition."""

    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module], se_channels: int):
        super().__init__(cin, cout, stride, act)
        self.se = SqueezeExcitation(cout, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        skip = self.shortcut(act) if self.shortcut is not None else x
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(same_pad(act, self.stride)))))
        return skip + self.se(out)


class _Group(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, se_channels: int):
        super().__init__()
        self.block = nn.Sequential(*[_RaBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, nn.SiLU,
                                              se_channels) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@register_model("ra-wideresnet", pattern=r"ra-wrn-(?P<depth>70)-(?P<width>16)", shown_as="ra-wrn-70-16")
class RaWideResNet(StagedModel):
    """RaWRN: stem conv, three groups of SE blocks (strides 1, 2, 2), BN-SiLU, global pool, linear.

    ``ra-wrn-70-16`` is the released size; ``stem_width``, ``depths``, ``stage_widths`` and
    ``se_ratio`` override it (smaller ones for tests). SE widths are round(se_ratio * width).
    """

    stage_names = ("init_conv", "layer.0", "layer.1", "layer.2", "logits")

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 70, width: int = 16,
                 stem_width: int | None = None, depths: Sequence[int] | None = None,
                 stage_widths: Sequence[int] | None = None, se_ratio: float | None = None):
        super().__init__()
        if (depth, width) != (70, 16):
            raise ConfigError(f"the RaWRN family has one released size, 70-16; got {depth}-{width}")
        stem = int(stem_width or RA_WRN_70_16["stem_width"])
        depths = tuple(int(d) for d in (depths or RA_WRN_70_16["depths"]))
        widths = tuple(int(w) for w in (stage_widths or RA_WRN_70_16["stage_widths"]))
        ratio = float(se_ratio if se_ratio is not None else RA_WRN_70_16["se_ratio"])
        if len(depths) != 3 or len(widths) != 3 or min(depths) < 1 or min(widths) < 1 or stem < 1:
            raise ConfigError(f"RaWRN needs a positive stem width and three positive depths and widths, "
                              f"got {stem}, {depths}, {widths}")
        if not 0 < ratio <= 1:
            raise ConfigError(f"se_ratio must be in (0, 1], got {ratio}")
        self.init_conv = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        cins = (stem, *widths[:2])
        self.layer = nn.Sequential(*[_Group(depths[i], cins[i], widths[i], 1 if i == 0 else 2,
                                            max(1, int(round(ratio * widths[i])))) for i in range(3)])
        self.batchnorm = nn.BatchNorm2d(widths[2])
        self.relu = nn.SiLU()
        self.logits = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self.normalized(x)))
        return self.logits(global_pool(self.relu(self.batchnorm(out))))


_KEY = re.compile(r"layer\.(\d)\.block\.(\d+)\.")


def ra_wrn_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """``stem_width``, ``depths``, ``stage_widths``, ``se_ratio`` and ``num_classes`` of the RaWRN whose weights are ``state``."""
    try:
        stem = int(state["init_conv.weight"].shape[0])
        widths = tuple(int(state[f"layer.{i}.block.0.conv_0.weight"].shape[0]) for i in range(3))
        se = int(state["layer.0.block.0.se.fc1.weight"].shape[0])
        classes = int(state["logits.weight"].shape[0])
    except KeyError as err:
        raise CheckpointError(f"{source} is not a RaWRN state dict (no {err.args[0]})") from None
    depths = [0, 0, 0]
    for m in filter(None, map(_KEY.match, state)):
        depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
    return {"stem_width": stem, "depths": tuple(depths), "stage_widths": widths,
            "se_ratio": se / widths[0], "num_classes": classes}
