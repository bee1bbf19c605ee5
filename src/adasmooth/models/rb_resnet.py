"""RobustBench's own WideResNet (the TRADES one: Carmon 2019, Zhang 2019, ...), PreActResNet-18, ResNet-18 and
the CIFAR ResNet-50 (Engstrom 2019, Augustin 2020): ``rb-wrn-<depth>-<width>``, ``rb-preact-resnet18``,
``rb-resnet18``, ``rb-resnet50``.

The module names are RobustBench's (``block1.layer.0.convShortcut``, ``layer2.1.shortcut.0``,
``linear``, ...), so its files load without renaming; adasmooth's own ``wrn-D-W`` and ``resnet18``
name their modules differently. These models take pixels in [0, 1] like every adasmooth model; an
entry's normalisation (most of these have none) sits in the ``normalize`` buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import StagedModel, register_model
from .dm_wide_resnet import global_pool
from .resnet import BasicBlock, PreActConvs, make_stage
from .wideresnet import wide_resnet_layout

__all__ = ["RBWideResNet", "RBPreActResNet18", "RBResNet18", "RBResNet50"]


class _WideBasicBlock(PreActConvs):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        # The projection sees the activated input, the identity the raw one (as the TRADES code).
        skip = self.convShortcut(act) if self.convShortcut is not None else x
        return skip + self.conv2(F.relu(self.bn2(self.conv1(act))))


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@register_model("rb-wideresnet", pattern=r"rb-wrn-(?P<depth>\d+)-(?P<widen_factor>\d+)",
                shown_as="rb-wrn-<depth>-<width>")
class RBWideResNet(StagedModel):
    """depth = 6n + 4. ``sub_block1`` adds the unused second first-group that several RobustBench files
    carry (Carmon 2019 and others): it holds weights but never runs."""

    stage_names = ("conv1", "block1", "block2", "block3", "fc")

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 34, widen_factor: int = 10,
                 sub_block1: bool = False, bias_last: bool = True):
        super().__init__()
        n, w = wide_resnet_layout(depth, widen_factor)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, w[0], w[1], 1)
        if sub_block1:
            self.sub_block1 = _NetworkBlock(n, w[0], w[1], 1)
        self.block2 = _NetworkBlock(n, w[1], w[2], 2)
        self.block3 = _NetworkBlock(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes, bias=bias_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalized(x)))))
        return self.fc(global_pool(F.relu(self.bn1(out))))


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, out_shortcut: bool = False):
        super().__init__()
        self.out_shortcut = out_shortcut
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            skip = self.shortcut(out if self.out_shortcut else x)
        else:
            skip = x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


@register_model("rb-preact-resnet18")
class RBPreActResNet18(StagedModel):
    """``out_shortcut``: projections see the activated input (RobustBench's PreActBlockV2 and
    ``out_shortcut=True``); ``bn_before_fc``: a final batch norm and ReLU before pooling."""

    stage_names = ("conv1", "layer1", "layer2", "layer3", "layer4", "linear")

    def __init__(self, num_classes: int, in_channels: int = 3, out_shortcut: bool = False,
                 bn_before_fc: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1 = make_stage(_PreActBlock, 64, 64, 2, 1, out_shortcut=out_shortcut)
        self.layer2 = make_stage(_PreActBlock, 64, 128, 2, 2, out_shortcut=out_shortcut)
        self.layer3 = make_stage(_PreActBlock, 128, 256, 2, 2, out_shortcut=out_shortcut)
        self.layer4 = make_stage(_PreActBlock, 256, 512, 2, 2, out_shortcut=out_shortcut)
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalized(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if hasattr(self, "bn"):
            out = F.relu(self.bn(out))
        return self.linear(global_pool(out))


@register_model("rb-resnet18")
class RBResNet18(StagedModel):
    """The CIFAR ResNet-18 of RobustBench (3x3 stem with batch norm, no max-pool)."""

    stage_names = ("conv1", "layer1", "layer2", "layer3", "layer4", "linear")

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = make_stage(BasicBlock, 64, 64, 2, 1)
        self.layer2 = make_stage(BasicBlock, 64, 128, 2, 2)
        self.layer3 = make_stage(BasicBlock, 128, 256, 2, 2)
        self.layer4 = make_stage(BasicBlock, 256, 512, 2, 2)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalized(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(global_pool(out))


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 to four times the width, batch norm after each; projection shortcut."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _bottleneck_stage(cin: int, width: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[_Bottleneck(cin if i == 0 else 4 * width, width, stride if i == 0 else 1) for i in range(n)])


@register_model("rb-resnet50")
class RBResNet50(StagedModel):
    """The CIFAR ResNet-50 of RobustBench's ``resnet.py`` (3x3 stem, no max-pool, bottlenecks 3-4-6-3)."""

    stage_names = ("conv1", "layer1", "layer2", "layer3", "layer4", "linear")

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _bottleneck_stage(64, 64, 3, 1)
        self.layer2 = _bottleneck_stage(256, 128, 4, 2)
        self.layer3 = _bottleneck_stage(512, 256, 6, 2)
        self.layer4 = _bottleneck_stage(1024, 512, 3, 2)
        self.linear = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalized(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(global_pool(out))
