"""The robust part of the authors' composites: DeepMind's WideResNet (Gowal et al. 2020) as RobustBench has it.

State-dict layout of RobustBench's ``dm_rn.py`` / ``dm_wide_resnet.py`` (``init_conv``,
``layer.<g>.block.<i>.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``, ``batchnorm``, ``logits``),
so a ``<name>.pt_m1.pt`` file loads with a strict key check. Its arithmetic follows theirs: TF-style
"SAME" padding done by hand before strided convolutions, the pre-activated input feeding both
branches of a block that changes width, and an 8x8 average pool (global on 32x32 inputs).

NOTE for the lead: this is a deliberately small local copy for the ``Bai2023Improving`` composites;
the general ``DMWideResNet`` family belongs to the RobustBench loader (``models/dm_wide_resnet.py``)
and this file can go once that one is merged (same keys, same stages ``layer.0`` / ``layer.1``).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from .base import ModelSpec

__all__ = ["DMWideResNetLite", "dm_wrn_config_from_state_dict"]


class _DMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"DM WideResNet blocks take stride 1 or 2, got {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None
        # "SAME" padding of TF: symmetric for stride 1, bottom/right only for stride 2
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv_0(F.pad(pre, self._pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return skip + out


class _DMGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(*[_DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNetLite(nn.Module):
    """WRN-depth-width with the DeepMind layout; ``activation`` "silu" (= Swish) or "relu"."""

    def __init__(self, num_classes: int = 10, depth: int = 70, width: int = 16, activation: str = "silu",
                 mean: Sequence[float] = (0.4914, 0.4822, 0.4465), std: Sequence[float] = (0.2471, 0.2435, 0.2616),
                 input_shape: Sequence[int] | None = (3, 32, 32), dataset: str | None = None):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ConfigError(f"WideResNet depth must be 6n+4 (e.g. 28, 70), got {depth}")
        acts = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU}
        if activation not in acts:
            raise ConfigError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        n = (depth - 4) // 6
        act = acts[activation]
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(_DMGroup(n, ch[0], ch[1], 1, act), _DMGroup(n, ch[1], ch[2], 2, act),
                                   _DMGroup(n, ch[2], ch[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = act()
        self.logits = nn.Linear(ch[3], num_classes)
        self.stage_names = ("init_conv", "layer.0", "layer.1", "layer.2", "logits")
        self.spec = ModelSpec(f"dm-wrn-{depth}-{width}", num_classes, 3, list(mean), list(std),
                              {"depth": depth, "width": width, "activation": activation},
                              tuple(input_shape) if input_shape is not None else None, dataset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"the WideResNet expects inputs of shape (N, 3, H, W), got {tuple(x.shape)}")
        out = self.layer(self.init_conv((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)))
        out = self.relu(self.batchnorm(out))
        return self.logits(F.avg_pool2d(out, 8).flatten(1))


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
