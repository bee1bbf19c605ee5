"""The mixing network alpha_theta(x) and the feature taps that feed it (paper Sec. 4, App. D.1).

- :class:`FeatureTaps`: forward hooks on named modules of a base model, installed only for the
  duration of one forward pass, so the base model carries no hooks outside it.
- :class:`MixingNetwork`: concatenated first-tap features of g and h -> pre-activation residual
  blocks; concatenated second-tap features -> 1x1 convolution to the same width and spatial size;
  summed; more residual blocks; global average pool; Linear -> gamma(x). Then the alpha head:
  BatchNorm1d(1, affine=False) -> gamma * scale + shift -> sigmoid -> alpha, confined to
  (alpha_min, alpha_max) at evaluation. Scale, shift, range and the BN statistics are buffers, so
  they live in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.distributed import batch_mean_std
from ..models.resnet import PreActBlock

__all__ = [
    "FeatureTaps",
    "tap_name",
    "resolve_module",
    "as_feature_map",
    "match_spatial",
    "pair_features",
    "ranged_alpha",
    "MixingNetConfig",
    "MixingNetwork",
    "SMALL_WIDTHS",
    "RESNET18_WIDTHS",
]

# Widths after the first group, after the merge group and at the end. The ResNet-18 pair of the
# reference code runs 128 -> 256 -> 512 -> 1024 (128 = the two layer1 outputs concatenated).
RESNET18_WIDTHS = (256, 512, 1024)
SMALL_WIDTHS = (32, 64, 128)


# ---------------------------------------------------------------------------- feature taps


# prefixes of wrapped models (``models.loader.PixelInput.model``, DataParallel's ``module``), which tap
# names may leave out as weight files do
WRAPPER_PREFIXES = ("model.", "module.")


def tap_name(model: nn.Module, name: str) -> str:
    """The module path ``name`` stands for in ``model``: itself, or with a wrapper prefix in front
    (``layer1`` for ``model.layer1``); a ConfigError listing the stages and modules if neither exists."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return name
    found = [p + name for p in WRAPPER_PREFIXES if name and p + name in modules]
    if found:
        return found[0]
    stages = getattr(model, "stage_names", None)
    hint = f"; its stages are {list(stages)}" if stages else ""
    children = [n for n, _ in model.named_children()]
    wrapped = [p[:-1] for p in WRAPPER_PREFIXES if p[:-1] in children]
    inner = [f"{wrapped[0]}.{n}" for n, _ in modules[wrapped[0]].named_children()] if wrapped else []
    raise ConfigError(f"tap {name!r} is not a module of {type(model).__name__}{hint}; its modules are "
                      f"{', '.join(children + inner) or 'none'} (and the dotted names below them, as in "
                      f"named_modules(){'; the prefix ' + wrapped[0] + '. may be left out' if wrapped else ''})")


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` stands for (see :func:`tap_name`), or a ConfigError."""
    return dict(model.named_modules())[tap_name(model, name)]


class FeatureTaps:
    """Collect the outputs of named modules during one forward pass.

    Use as a context manager: hooks are registered on entry and removed on exit, also when the
    forward pass raises, so the model carries no hooks outside the ``with`` block::

        with FeatureTaps(model, ("layer1", "layer2")) as taps:
            logits = model(x)
        first, second = taps.features()
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = tuple(names)
        self.modules = [resolve_module(model, n) for n in self.names]
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "FeatureTaps":
        self._outputs = {}
        for name, module in zip(self.names, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def store(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise InputError(f"tap {name!r} returned {type(output).__name__}, not a tensor")
            self._outputs[name] = output

        return store

    def features(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise InputError(f"taps {missing} did not run during the forward pass")
        return [self._outputs[n] for n in self.names]


def as_feature_map(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as is; (N, D) (an MLP's features) as (N, D, 1, 1); (N, C, L) as (N, C, L, 1)."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t[:, :, :, None]
    raise InputError(f"cannot use a feature of shape {tuple(t.shape)} as a feature map")


def match_spatial(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map to ``size``: average-pool when shrinking, bilinear when growing."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def pair_features(f_std: torch.Tensor, f_rob: torch.Tensor) -> torch.Tensor:
    """Concatenate g's and h's features along channels, h resized to g's spatial size."""
    f_std, f_rob = as_feature_map(f_std), as_feature_map(f_rob)
    return torch.cat([f_std, match_spatial(f_rob, tuple(f_std.shape[-2:]))], dim=1)


# ---------------------------------------------------------------------------- the network


def _group(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])


@dataclass
class MixingNetConfig:
    """Everything needed to rebuild a :class:`MixingNetwork` (stored in the checkpoint sidecar)."""

    first_channels: int  # channels of g's and h's first taps, concatenated
    second_channels: int  # channels of g's and h's second taps, concatenated
    widths: list[int] = field(default_factory=lambda: list(RESNET18_WIDTHS))
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    bn_momentum: float = 0.01
    train_scale: float = 2.0
    train_shift: float = 0.4
    train_clamp_std: float | None = 0.6

    def validate(self) -> None:
        if self.first_channels < 1 or self.second_channels < 1:
            raise ConfigError("tap channel counts must be >= 1")
        for name in ("widths", "blocks", "strides"):
            v = getattr(self, name)
            if len(v) != 3 or any(int(i) < 1 for i in v):
                raise ConfigError(f"{name} must be three positive integers, got {v}")
        if not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.train_scale <= 0:
            raise ConfigError(f"train_scale must be > 0, got {self.train_scale}")
        if self.train_clamp_std is not None and self.train_clamp_std <= 0:
            raise ConfigError("train_clamp_std must be > 0 or None")


class MixingNetwork(nn.Module):
    """alpha_theta: (first-tap features, second-tap features) -> (alpha (N,), alpha_logit (N,)).

    Training mode: the raw gamma clamped to the batch mean +- ``train_clamp_std`` standard deviations
    (no direct gradient beyond the bounds: a margin, so alpha is not pushed to 0 or 1), then BN on the batch,
    ``train_scale``/``train_shift``, full (0, 1) range. Evaluation mode: BN running statistics, the
    ``eval_scale``/``eval_shift`` buffers (set by calibration), and alpha confined to
    (``alpha_min``, ``alpha_max``).
    """

    def __init__(self, config: MixingNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        w, b, s = [int(v) for v in config.widths], [int(v) for v in config.blocks], [int(v) for v in config.strides]
        self.first = _group(config.first_channels, w[0], b[0], s[0])
        self.second_proj = nn.Conv2d(config.second_channels, w[0], 1, bias=False)
        self.middle = _group(w[0], w[1], b[1], s[1])
        self.last = _group(w[1], w[2], b[2], s[2])
        self.final_bn = nn.BatchNorm2d(w[2])
        self.fc = nn.Linear(w[2], 1, bias=False)
        self.alpha_bn = nn.BatchNorm1d(1, affine=False, momentum=config.bn_momentum)
        self.register_buffer("eval_scale", torch.tensor(float(config.train_scale)))
        self.register_buffer("eval_shift", torch.tensor(float(config.train_shift)))
        self.register_buffer("alpha_min", torch.tensor(0.0))
        self.register_buffer("alpha_max", torch.tensor(1.0))

    # -- settings that calibration changes; kept as buffers so they are saved with the weights
    def set_eval_head(self, scale: float | None = None, shift: float | None = None,
                      alpha_range: tuple[float, float] | None = None) -> None:
        if scale is not None:
            if not scale > 0:
                raise ConfigError(f"scale must be > 0, got {scale}")
            self.eval_scale.fill_(float(scale))
        if shift is not None:
            if not math.isfinite(shift):
                raise ConfigError(f"shift must be finite, got {shift}")
            self.eval_shift.fill_(float(shift))
        if alpha_range is not None:
            lo, hi = (float(v) for v in alpha_range)
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"alpha range must satisfy 0 <= min < max <= 1, got ({lo}, {hi})")
            self.alpha_min.fill_(lo)
            self.alpha_max.fill_(hi)

    def eval_head(self) -> dict[str, float]:
        return {"scale": float(self.eval_scale), "shift": float(self.eval_shift),
                "alpha_min": float(self.alpha_min), "alpha_max": float(self.alpha_max)}

    def gamma(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The raw scalar gamma(x), (N,), before the BN/sigmoid head."""
        a = self.first(first)
        b = match_spatial(self.second_proj(second), tuple(a.shape[-2:]))
        out = self.last(self.middle(a + b))
        out = F.relu(self.final_bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)).squeeze(1)

    def normalized_gamma(self, gamma: torch.Tensor) -> torch.Tensor:
        """In training, the raw gamma clamped to its batch mean +- k std, then BN with batch statistics;
        in evaluation, BN with the running statistics. Clamping *before* the BN (as the authors' code
        does) makes the running statistics those of the clamped gamma, the distribution the head was
        trained on; outliers beyond the bounds get no gradient, so alpha is not pushed to 0 or 1."""
        if self.training and gamma.shape[0] == 1:
            raise InputError("the mixing network needs batches of more than one example in training mode")
        if self.training and self.config.train_clamp_std is not None:
            mean, std = batch_mean_std(gamma)  # of the global batch when torchrun ranks share it
            k = self.config.train_clamp_std
            gamma = torch.clamp(gamma, mean - k * std, mean + k * std)
        return self.alpha_bn(gamma[:, None]).squeeze(1)

    def head(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, logit(alpha)) from the normalised gamma ``z``."""
        if self.training:
            logit = z * self.config.train_scale + self.config.train_shift
            return torch.sigmoid(logit), logit
        return ranged_alpha(z * self.eval_scale.to(z.dtype) + self.eval_shift.to(z.dtype), *self.alpha_range())

    def alpha_range(self) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
        """(alpha_min, alpha_max): floats, or the buffers themselves while ``torch.export`` traces
        (their values cannot be read then, and the exported program must keep them as tensors)."""
        if torch.compiler.is_exporting():
            return self.alpha_min, self.alpha_max
        return float(self.alpha_min), float(self.alpha_max)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.normalized_gamma(self.gamma(first, second)))


def ranged_alpha(u: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sigmoid(u) * (hi - lo) + lo and its logit, computed in log space for stability.

    ``lo`` and ``hi`` are floats, or 0-d tensors where their values cannot be read (while
    ``torch.export`` traces, buffers have no values)."""
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        lo, hi = (torch.as_tensor(v, device=u.device).to(u.dtype) for v in (lo, hi))
        log_lo, log_1m_hi, log_width = torch.log(lo), torch.log1p(-hi), torch.log(hi - lo)
    elif lo == 0.0 and hi == 1.0:
        return torch.sigmoid(u), u
    else:
        log_lo = math.log(lo) if lo > 0 else -math.inf
        log_1m_hi = math.log(1 - hi) if hi < 1 else -math.inf
        log_width = math.log(hi - lo)
    alpha = torch.sigmoid(u) * (hi - lo) + lo
    # log(alpha) - log(1 - alpha) with 1 - alpha = (1 - hi) + width * sigmoid(-u)
    log_a = torch.logaddexp(torch.zeros_like(u) + log_lo, log_width + F.logsigmoid(u))
    log_1ma = torch.logaddexp(torch.zeros_like(u) + log_1m_hi, log_width + F.logsigmoid(-u))
    return alpha, log_a - log_1ma
