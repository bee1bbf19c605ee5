"""ConvNeXt V2 (Woo et al. 2023) as RobustBench ships it in ``convnext_v2.py``: ``convnext-v2`` with
``size`` atto, femto, pico, nano, tiny, base, large (default) or huge; the standard model of the ImageNet MixedNUTS.

Module names are RobustBench's (``downsample_layers.0.0``, ``stages.2.5.grn.gamma``, ``head``, ...),
so its files load without renaming. RobustBench's network also holds ImageNet ``mean``/``std``
parameters that its ``forward`` never uses: it sees raw pixels, and so does this one (its
``normalize`` is the identity unless asked otherwise); the loader drops those two tensors.
Stochastic depth is left out: it only acts in training.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from .base import StagedModel, register_model
from .convstem import ChannelsFirstLayerNorm

__all__ = ["ConvNeXtV2", "CONVNEXT_V2_SIZES", "convnext_v2_config_from_state_dict"]

# size -> (depths, dims), from RobustBench's convnextv2_* constructors
CONVNEXT_V2_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


class _GlobalResponseNorm(nn.Module):
    """GRN on channels-last input: x + gamma * x * (||x||_HW / mean_C ||x||_HW) + beta."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        relative = spatial / (spatial.mean(dim=-1, keepdim=True) + 1e-6)
        return x + self.gamma * (x * relative) + self.beta


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = _GlobalResponseNorm(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(out)))))
        return x + out.permute(0, 3, 1, 2)


@register_model("convnext-v2")
class ConvNeXtV2(StagedModel):
    """Patchify stem (4x4, stride 4), four stages separated by 2x2 strided downsampling, global average
    pool, layer norm, linear head. ``depths``/``dims`` override the size (smaller ones for tests)."""

    stage_names = ("downsample_layers.0", "stages.0", "stages.1", "stages.2", "stages.3", "head")

    def __init__(self, num_classes: int, in_channels: int = 3, size: str = "large",
                 depths: Sequence[int] | None = None, dims: Sequence[int] | None = None):
        super().__init__()
        if size not in CONVNEXT_V2_SIZES:
            raise ConfigError(f"unknown ConvNeXt V2 size {size!r}; known: {', '.join(CONVNEXT_V2_SIZES)}")
        depths = tuple(int(d) for d in (depths or CONVNEXT_V2_SIZES[size][0]))
        dims = tuple(int(d) for d in (dims or CONVNEXT_V2_SIZES[size][1]))
        if len(depths) != 4 or len(dims) != 4 or min(depths) < 1 or min(dims) < 1:
            raise ConfigError(f"ConvNeXt V2 needs four positive depths and dims, got {depths}, {dims}")
        stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0]))
        self.downsample_layers = nn.ModuleList(
            [stem] + [nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2))
                      for i in range(3)])
        self.stages = nn.ModuleList([nn.Sequential(*[_Block(dims[i]) for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalized(x)
        for down, stage in zip(self.downsample_layers, self.stages):
            out = stage(down(out))
        return self.head(self.norm(out.mean(dim=(-2, -1))))


def convnext_v2_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict:
    """``depths``, ``dims`` and ``num_classes`` of the ConvNeXt V2 whose weights are ``state``."""
    try:
        dims = tuple(int(state[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0]) for i in range(4))
        classes = int(state["head.weight"].shape[0])
    except KeyError as err:
        raise CheckpointError(f"{source} is not a ConvNeXt V2 state dict (no {err.args[0]})") from None
    depths = tuple(1 + max((int(k.split(".")[2]) for k in state if k.startswith(f"stages.{i}.")), default=-1)
                   for i in range(4))
    return {"depths": depths, "dims": dims, "num_classes": classes}
