"""Model zoo: a registry with ``create_model`` and architectures whose stages are named.

Every model takes inputs in [0, 1] and normalises them itself (``Normalize``), so attacks and
noise always live in pixel space. Every model lists its stages in ``stage_names``; each name is
an attribute holding an ``nn.Module`` whose output can be tapped with a forward hook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Normalize",
    "ModelSpec",
    "register_model",
    "create_model",
    "list_models",
    "SmallCNN",
    "MLP",
    "ResNet18",
    "PreActResNet18",
    "WideResNet",
]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with buffers, so it follows the model's device and dtype."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected {self.mean.shape[1]} input channels, got {x.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: what a checkpoint sidecar stores."""

    name: str
    num_classes: int
    in_channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    kwargs: dict = field(default_factory=dict)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY) + ["wrn-<depth>-<width>"]


def _expand_channels(values: Sequence[float] | None, in_channels: int, default: float) -> list[float]:
    if values is None:
        return [default] * in_channels
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * in_channels
    if len(values) != in_channels:
        raise ValueError(f"normalisation has {len(values)} values for {in_channels} channels")
    return values


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model. ``wrn-D-W`` (e.g. ``wrn-34-10``, ``wrn-70-16``) builds a WideResNet."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    mean_l = _expand_channels(mean, in_channels, 0.0)
    std_l = _expand_channels(std, in_channels, 1.0)
    wrn = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if wrn:
        factory = _REGISTRY["wideresnet"]
        kwargs = {"depth": int(wrn.group(1)), "widen_factor": int(wrn.group(2)), **kwargs}
    elif name in _REGISTRY:
        factory = _REGISTRY[name]
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.normalize = Normalize(mean_l, std_l)
    model.spec = ModelSpec(name, num_classes, in_channels, mean_l, std_l, dict(kwargs))
    return model


class _StagedModel(nn.Module):
    """Base: ``forward`` = normalise, then run ``stage_names`` in order, then the head."""

    stage_names: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.normalize: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        out = self.normalize(x)
        for name in self.stage_names:
            out = getattr(self, name)(out)
        return out


# ---------------------------------------------------------------- small models (digits, MNIST)


@register_model("small-cnn")
class SmallCNN(_StagedModel):
    """Two conv stages and an MLP head; works for 8x8 and 28x28 inputs (adaptive pooling)."""

    stage_names = ("stem", "stage1", "stage2", "head")

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, hidden: int = 128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )


@register_model("mlp")
class MLP(_StagedModel):
    stage_names = ("stem", "stage1", "stage2", "head")

    def __init__(self, num_classes: int, in_channels: int = 1, input_size: int = 28, hidden: int = 256):
        super().__init__()
        self.stem = nn.Flatten()
        self.stage1 = nn.Sequential(nn.Linear(in_channels * input_size * input_size, hidden), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)


# ---------------------------------------------------------------- CIFAR ResNets


class _BasicBlock(nn.Module):
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


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
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


def _stage(block, cin: int, cout: int, n: int, stride: int, **kw) -> nn.Sequential:
    layers = [block(cin, cout, stride, **kw)] + [block(cout, cout, 1, **kw) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class _GlobalPoolHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, pre_activation: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if pre_activation else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet18")
class ResNet18(_StagedModel):
    """CIFAR ResNet-18 (3x3 stem, no max-pool). Stages: stem, layer1..layer4, head."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4", "head")

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = _stage(_BasicBlock, w, w, 2, 1)
        self.layer2 = _stage(_BasicBlock, w, 2 * w, 2, 2)
        self.layer3 = _stage(_BasicBlock, 2 * w, 4 * w, 2, 2)
        self.layer4 = _stage(_BasicBlock, 4 * w, 8 * w, 2, 2)
        self.head = _GlobalPoolHead(8 * w, num_classes, pre_activation=False)


@register_model("preact-resnet18")
class PreActResNet18(_StagedModel):
    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4", "head")

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.layer1 = _stage(_PreActBlock, w, w, 2, 1)
        self.layer2 = _stage(_PreActBlock, w, 2 * w, 2, 2)
        self.layer3 = _stage(_PreActBlock, 2 * w, 4 * w, 2, 2)
        self.layer4 = _stage(_PreActBlock, 4 * w, 8 * w, 2, 2)
        self.head = _GlobalPoolHead(8 * w, num_classes, pre_activation=True)


@register_model("wideresnet")
class WideResNet(_StagedModel):
    """WideResNet-depth-widen_factor (Zagoruyko & Komodakis), pre-activation blocks.

    depth = 6n + 4; stages: stem, block1, block2, block3, head (block1 of WRN-70-16 has 256 channels).
    """

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
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28, 34, 70), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _stage(_PreActBlock, widths[0], widths[1], n, 1, dropout=dropout)
        self.block2 = _stage(_PreActBlock, widths[1], widths[2], n, 2, dropout=dropout)
        self.block3 = _stage(_PreActBlock, widths[2], widths[3], n, 2, dropout=dropout)
        self.head = _GlobalPoolHead(widths[3], num_classes, pre_activation=True)


def default_taps(model: nn.Module) -> tuple[str, str]:
    """The two stages the mixing network taps by default: the first two after the stem."""
    names = getattr(model, "stage_names", None)
    if not names or len(names) < 3:
        raise ValueError("model has no stage_names; give the tap names explicitly")
    return names[1], names[2]


def count_classes(model: nn.Module) -> int | None:
    spec = getattr(model, "spec", None)
    return spec.num_classes if spec is not None else None
