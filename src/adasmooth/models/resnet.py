"""CIFAR ResNet-18 and pre-activation ResNet-18, and the blocks WideResNet shares with them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import StagedModel, register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActConvs(nn.Module):
    """The layers of every pre-activation residual block, bn1 -> conv1 -> bn2 -> conv2 (3x3, the first
    strided); subclasses add the shortcut under the name their reference code's state dicts use."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)


class PreActBlock(PreActConvs):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__(cin, cout, stride)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + skip


def make_stage(block, cin: int, cout: int, n: int, stride: int, **kw) -> nn.Sequential:
    """``n`` blocks; only the first changes the channel count and applies the stride."""
    layers = [block(cin, cout, stride, **kw)] + [block(cout, cout, 1, **kw) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class GlobalPoolHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, pre_activation: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if pre_activation else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ResNet18Layout(StagedModel):
    """Stem, four stages of two blocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global-pool head."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4", "head")

    def __init__(self, stem: nn.Module, block, width: int, num_classes: int, pre_activation: bool):
        super().__init__()
        w = width
        self.stem = stem
        self.layer1 = make_stage(block, w, w, 2, 1)
        self.layer2 = make_stage(block, w, 2 * w, 2, 2)
        self.layer3 = make_stage(block, 2 * w, 4 * w, 2, 2)
        self.layer4 = make_stage(block, 4 * w, 8 * w, 2, 2)
        self.head = GlobalPoolHead(8 * w, num_classes, pre_activation=pre_activation)


@register_model("resnet18")
class ResNet18(_ResNet18Layout):
    """CIFAR ResNet-18 (3x3 stem, no max-pool). Stages: stem, layer1..layer4, head."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        super().__init__(stem, BasicBlock, width, num_classes, pre_activation=False)


@register_model("preact-resnet18")
class PreActResNet18(_ResNet18Layout):
    """Pre-activation ResNet-18: a bare conv stem; batch norm and ReLU come first in each block."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        super().__init__(stem, PreActBlock, width, num_classes, pre_activation=True)
