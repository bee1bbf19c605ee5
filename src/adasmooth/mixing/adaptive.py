"""The mixing network alpha_theta(x) and the adaptively smoothed classifier (paper Sec. 4, App. D.1).

Pieces:

- :class:`FeatureTaps`: forward hooks on named modules of a frozen base model, installed only for the
  duration of one forward pass, so the base model is left exactly as it was.
- :class:`MixingNetwork`: concatenated first-tap features of g and h -> pre-activation residual
  blocks; concatenated second-tap features -> 1x1 convolution to the same width and spatial size;
  summed; more residual blocks; global average pool; Linear -> gamma(x). Then the alpha head:
  BatchNorm1d(1, affine=False) -> gamma * scale + shift -> sigmoid -> alpha, confined to
  (alpha_min, alpha_max) at evaluation. Scale, shift, range and the BN statistics are buffers, so
  they live in the checkpoint.
- :class:`AdaptiveMixedClassifier`: Eq. 3.4 with a per-sample alpha(x); follows the mixed-model
  protocol of :mod:`adasmooth.mixing` (``forward(x) -> logits``, ``mix(x, detach_alpha) -> MixOutput``).
- :func:`save_adaptive_classifier` / :func:`load_adaptive_classifier`: safetensors + JSON sidecar.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.checkpoint import checkpoint_paths, load_checkpoint
from . import MixOutput, mix_logits
from ..models import default_taps
from ..core.io import provenance

__all__ = [
    "FeatureTaps",
    "resolve_module",
    "as_feature_map",
    "match_spatial",
    "ranged_alpha",
    "MixingNetConfig",
    "MixingNetwork",
    "AdaptiveMixedClassifier",
    "build_adaptive_classifier",
    "probe_tap_channels",
    "save_adaptive_classifier",
    "load_adaptive_classifier",
    "SMALL_WIDTHS",
    "RESNET18_WIDTHS",
]

# Widths after the first group, after the merge group and at the end. The ResNet-18 pair of the
# reference code runs 128 -> 256 -> 512 -> 1024 (128 = the two layer1 outputs concatenated).
RESNET18_WIDTHS = (256, 512, 1024)
SMALL_WIDTHS = (32, 64, 128)

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- feature taps


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted names as in ``named_modules``), or a ValueError."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        stages = getattr(model, "stage_names", None)
        hint = f"; its stages are {list(stages)}" if stages else ""
        raise ValueError(f"tap {name!r} is not a module of {type(model).__name__}{hint}")
    return modules[name]


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
                raise ValueError(f"tap {name!r} returned {type(output).__name__}, not a tensor")
            self._outputs[name] = output

        return store

    def features(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise ValueError(f"taps {missing} did not run during the forward pass")
        return [self._outputs[n] for n in self.names]


def as_feature_map(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as is; (N, D) (an MLP's features) as (N, D, 1, 1); (N, C, L) as (N, C, L, 1)."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t[:, :, :, None]
    raise ValueError(f"cannot use a feature of shape {tuple(t.shape)} as a feature map")


def match_spatial(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map to ``size``: average-pool when shrinking, bilinear when growing."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _pair_features(f_std: torch.Tensor, f_rob: torch.Tensor) -> torch.Tensor:
    """Concatenate g's and h's features along channels, h resized to g's spatial size."""
    f_std, f_rob = as_feature_map(f_std), as_feature_map(f_rob)
    return torch.cat([f_std, match_spatial(f_rob, tuple(f_std.shape[-2:]))], dim=1)


# ---------------------------------------------------------------------------- the network


class _PreActResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


def _group(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[_PreActResBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])


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
            raise ValueError("tap channel counts must be >= 1")
        for name in ("widths", "blocks", "strides"):
            v = getattr(self, name)
            if len(v) != 3 or any(int(i) < 1 for i in v):
                raise ValueError(f"{name} must be three positive integers, got {v}")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.train_scale <= 0:
            raise ValueError(f"train_scale must be > 0, got {self.train_scale}")
        if self.train_clamp_std is not None and self.train_clamp_std <= 0:
            raise ValueError("train_clamp_std must be > 0 or None")


class MixingNetwork(nn.Module):
    """alpha_theta: (first-tap features, second-tap features) -> (alpha (N,), alpha_logit (N,)).

    Training mode: BN on the batch, the normalised gamma clamped to the batch mean +- ``train_clamp_std``
    standard deviations (no direct gradient
    beyond the bounds: a margin, so alpha is not pushed to 0 or 1),
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
                raise ValueError(f"scale must be > 0, got {scale}")
            self.eval_scale.fill_(float(scale))
        if shift is not None:
            if not math.isfinite(shift):
                raise ValueError(f"shift must be finite, got {shift}")
            self.eval_shift.fill_(float(shift))
        if alpha_range is not None:
            lo, hi = (float(v) for v in alpha_range)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"alpha range must satisfy 0 <= min < max <= 1, got ({lo}, {hi})")
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
        """BN of gamma: batch statistics in training, then clamped to the batch mean +- k std; running
        statistics in evaluation. Clamping after the BN keeps its statistics those of the unclamped
        gamma, so evaluation normalises exactly as training did."""
        if self.training and gamma.shape[0] == 1:
            raise ValueError("the mixing network needs batches of more than one example in training mode")
        z = self.alpha_bn(gamma[:, None]).squeeze(1)
        if self.training and self.config.train_clamp_std is not None:
            mean, std = z.detach().mean(), z.detach().std()
            k = self.config.train_clamp_std
            z = torch.clamp(z, mean - k * std, mean + k * std)
        return z

    def head(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, logit(alpha)) from the normalised gamma ``z``."""
        if self.training:
            logit = z * self.config.train_scale + self.config.train_shift
            return torch.sigmoid(logit), logit
        return ranged_alpha(z * self.eval_scale.to(z.dtype) + self.eval_shift.to(z.dtype),
                             float(self.alpha_min), float(self.alpha_max))

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.normalized_gamma(self.gamma(first, second)))


def ranged_alpha(u: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sigmoid(u) * (hi - lo) + lo and its logit, computed in log space for stability."""
    if lo == 0.0 and hi == 1.0:
        return torch.sigmoid(u), u
    width = hi - lo
    alpha = torch.sigmoid(u) * width + lo
    # log(alpha) - log(1 - alpha) with 1 - alpha = (1 - hi) + width * sigmoid(-u)
    log_a = torch.logaddexp(torch.full_like(u, math.log(lo) if lo > 0 else -math.inf),
                            math.log(width) + F.logsigmoid(u))
    log_1ma = torch.logaddexp(torch.full_like(u, math.log(1 - hi) if hi < 1 else -math.inf),
                              math.log(width) + F.logsigmoid(-u))
    return alpha, log_a - log_1ma


# ---------------------------------------------------------------------------- the classifier


def _normalize_taps(std_model: nn.Module, rob_model: nn.Module, taps) -> tuple[tuple[str, str], tuple[str, str]]:
    """taps: None (each model's default), a pair of names (both models), or a pair of pairs."""
    if taps is None:
        return tuple(default_taps(std_model)), tuple(default_taps(rob_model))
    if isinstance(taps, dict):
        std_t, rob_t = taps.get("std"), taps.get("rob")
    elif len(taps) == 2 and all(isinstance(t, str) for t in taps):
        std_t, rob_t = taps, taps
    elif len(taps) == 2:
        std_t, rob_t = taps
    else:
        raise ValueError(f"taps must be None, two module names, or two pairs of names; got {taps!r}")
    std_t = tuple(std_t) if std_t is not None else tuple(default_taps(std_model))
    rob_t = tuple(rob_t) if rob_t is not None else tuple(default_taps(rob_model))
    for t in (std_t, rob_t):
        if len(t) != 2 or not all(isinstance(n, str) for n in t):
            raise ValueError(f"each model needs exactly two tap names, got {t!r}")
    for model, t in ((std_model, std_t), (rob_model, rob_t)):
        for name in t:
            resolve_module(model, name)
    return std_t, rob_t


def _class_count(model: nn.Module) -> int | None:
    spec = getattr(model, "spec", None)
    return getattr(spec, "num_classes", None)


class AdaptiveMixedClassifier(nn.Module):
    """h_alpha(x) = log((1 - alpha(x)) softmax(s_g g(x)) + alpha(x) softmax(s_h h(x))), alpha from a net.

    The base models run once per forward; their tapped features feed the mixing network. They are
    frozen (``requires_grad=False``) and stay in eval mode even after ``.train()``: only the mixing
    network trains. ``detach_features=True`` cuts the gradient path through alpha(x) altogether
    (gray-box); ``mix(x, detach_alpha=True)`` does so for one call (what attack setting A uses).
    """

    def __init__(
        self,
        std_model: nn.Module,
        rob_model: nn.Module,
        mixing_net: MixingNetwork,
        std_scale: float = 1.0,
        rob_scale: float = 1.0,
        taps=None,
        detach_features: bool = False,
    ):
        super().__init__()
        n_std, n_rob = _class_count(std_model), _class_count(rob_model)
        if n_std is not None and n_rob is not None and n_std != n_rob:
            raise ValueError(f"base models disagree on the class count: g has {n_std}, h has {n_rob}")
        if not (std_scale > 0 and rob_scale > 0):
            raise ValueError("logit scales must be positive")
        self.std_model = std_model
        self.rob_model = rob_model
        self.mixing_net = mixing_net
        self.std_taps, self.rob_taps = _normalize_taps(std_model, rob_model, taps)
        self.std_scale = float(std_scale)
        self.rob_scale = float(rob_scale)
        self.detach_features = bool(detach_features)
        # where the base models came from, recorded by save_adaptive_classifier
        self.std_checkpoint: str | None = None
        self.rob_checkpoint: str | None = None
        for p in list(std_model.parameters()) + list(rob_model.parameters()):
            p.requires_grad_(False)
        std_model.eval()
        rob_model.eval()

    def train(self, mode: bool = True) -> "AdaptiveMixedClassifier":
        self.training = mode
        self.mixing_net.train(mode)
        self.std_model.eval()
        self.rob_model.eval()
        return self

    def base_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g logits, h logits, first-tap features, second-tap features), one pass of each model."""
        if x.dim() != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        with FeatureTaps(self.std_model, self.std_taps) as t_std:
            g = self.std_model(x)
        with FeatureTaps(self.rob_model, self.rob_taps) as t_rob:
            h = self.rob_model(x)
        if g.dim() != 2 or g.shape != h.shape:
            raise ValueError(f"base models must return (N, C) logits of equal shape, got {tuple(g.shape)} "
                             f"and {tuple(h.shape)}")
        (s1, s2), (r1, r2) = t_std.features(), t_rob.features()
        return g, h, _pair_features(s1, r1), _pair_features(s2, r2)

    def alpha_from_features(self, first: torch.Tensor, second: torch.Tensor,
                            detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if detach or self.detach_features:
            first, second = first.detach(), second.detach()
        alpha, alpha_logit = self.mixing_net(first, second)
        if detach:
            alpha, alpha_logit = alpha.detach(), alpha_logit.detach()
        return alpha, alpha_logit

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput:
        g, h, first, second = self.base_outputs(x)
        alpha, alpha_logit = self.alpha_from_features(first, second, detach=detach_alpha)
        logits = mix_logits(g, h, alpha, self.std_scale, self.rob_scale)
        return MixOutput(logits=logits, alpha=alpha, alpha_logit=alpha_logit)

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).logits

    def extra_repr(self) -> str:
        return (f"std_taps={self.std_taps}, rob_taps={self.rob_taps}, std_scale={self.std_scale}, "
                f"rob_scale={self.rob_scale}, detach_features={self.detach_features}")


@torch.no_grad()
def probe_tap_channels(std_model: nn.Module, rob_model: nn.Module, input_shape: Sequence[int],
                       taps=None) -> tuple[int, int]:
    """Channels of the concatenated first and second taps, measured on a zero input."""
    std_t, rob_t = _normalize_taps(std_model, rob_model, taps)
    param = next(iter(std_model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(2, *input_shape, device=device)
    channels = []
    for model, names in ((std_model, std_t), (rob_model, rob_t)):
        was_training = model.training
        model.eval()
        with FeatureTaps(model, names) as t:
            model(x)
        model.train(was_training)
        channels.append([as_feature_map(f).shape[1] for f in t.features()])
    return channels[0][0] + channels[1][0], channels[0][1] + channels[1][1]


def build_adaptive_classifier(
    std_model: nn.Module,
    rob_model: nn.Module,
    input_shape: Sequence[int],
    widths: Sequence[int] = RESNET18_WIDTHS,
    blocks: Sequence[int] = (2, 2, 2),
    strides: Sequence[int] = (2, 2, 2),
    taps=None,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
    detach_features: bool = False,
    **head: Any,
) -> AdaptiveMixedClassifier:
    """A fresh mixing network sized for the two base models' taps, wrapped with them.

    ``head`` may set ``bn_momentum``, ``train_scale``, ``train_shift``, ``train_clamp_std``.
    """
    first, second = probe_tap_channels(std_model, rob_model, input_shape, taps)
    cfg = MixingNetConfig(first, second, list(widths), list(blocks), list(strides), **head)
    param = next(iter(std_model.parameters()), None)
    net = MixingNetwork(cfg)
    if param is not None:
        net = net.to(param.device)
    return AdaptiveMixedClassifier(std_model, rob_model, net, std_scale, rob_scale, taps, detach_features)


# ---------------------------------------------------------------------------- save / load


def save_adaptive_classifier(model: AdaptiveMixedClassifier, path: str | Path,
                             metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` (mixing network, its buffers included) and ``path.json``.

    The sidecar records the network config, the taps, the logit scales, the detach switch and the
    base models' checkpoint paths (``metadata["std_checkpoint"]``/``["rob_checkpoint"]``, else the
    classifier's ``std_checkpoint``/``rob_checkpoint`` attributes), as absolute paths.
    """
    metadata = dict(metadata or {})
    std_ckpt = metadata.pop("std_checkpoint", None) or model.std_checkpoint
    rob_ckpt = metadata.pop("rob_checkpoint", None) or model.rob_checkpoint
    weights, sidecar = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.mixing_net.state_dict().items()}
    info = {
        "format_version": FORMAT_VERSION,
        "kind": "adaptive-mixed-classifier",
        "mixing_net": asdict(model.mixing_net.config),
        "eval_head": model.mixing_net.eval_head(),
        "taps": {"std": list(model.std_taps), "rob": list(model.rob_taps)},
        "std_scale": model.std_scale,
        "rob_scale": model.rob_scale,
        "detach_features": model.detach_features,
        "std_checkpoint": str(Path(std_ckpt).resolve()) if std_ckpt else None,
        "rob_checkpoint": str(Path(rob_ckpt).resolve()) if rob_ckpt else None,
        "num_classes": _class_count(model.std_model),
        **metadata,
        "provenance": provenance(),
    }
    tmp_w = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp_w))
    tmp_s = sidecar.with_name(sidecar.name + ".tmp")
    tmp_s.write_text(json.dumps(info, indent=2, default=str))
    tmp_w.replace(weights)
    tmp_s.replace(sidecar)
    return weights


def _find_base(recorded: str | None, sidecar: Path, role: str) -> str:
    if not recorded:
        raise ValueError(f"the checkpoint records no {role} base model path; pass {role}_model=")
    candidates = [Path(recorded), sidecar.parent / Path(recorded).name]
    for c in candidates:
        if checkpoint_paths(c)[0].is_file():
            return str(c)
    raise FileNotFoundError(f"{role} base model checkpoint {recorded} not found (also looked in {sidecar.parent})")


def load_adaptive_classifier(path: str | Path, std_model: nn.Module | None = None,
                             rob_model: nn.Module | None = None,
                             device: str | torch.device = "cpu") -> tuple[AdaptiveMixedClassifier, dict]:
    """Rebuild the classifier in eval mode; base models from the recorded paths unless given."""
    weights, sidecar = checkpoint_paths(path)
    if not weights.is_file() or not sidecar.is_file():
        raise FileNotFoundError(f"adaptive classifier checkpoint {weights} (+ .json) not found")
    info = json.loads(sidecar.read_text())
    if info.get("kind") != "adaptive-mixed-classifier":
        raise ValueError(f"{sidecar} is not an adaptive mixed classifier checkpoint")
    if std_model is None:
        std_model, _ = load_checkpoint(_find_base(info.get("std_checkpoint"), sidecar, "std"), device)
    if rob_model is None:
        rob_model, _ = load_checkpoint(_find_base(info.get("rob_checkpoint"), sidecar, "rob"), device)
    net = MixingNetwork(MixingNetConfig(**info["mixing_net"]))
    net.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    taps = (tuple(info["taps"]["std"]), tuple(info["taps"]["rob"]))
    model = AdaptiveMixedClassifier(std_model.to(device), rob_model.to(device), net.to(device),
                                    info["std_scale"], info["rob_scale"], taps, info["detach_features"])
    model.std_checkpoint, model.rob_checkpoint = info.get("std_checkpoint"), info.get("rob_checkpoint")
    return model.eval(), info
