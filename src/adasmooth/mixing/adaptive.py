"""The adaptively smoothed classifier (paper Sec. 4, App. D.1) and its checkpoint files.

- :class:`AdaptiveMixedClassifier`: Eq. 3.4 with a per-sample alpha(x) from a
  :class:`~adasmooth.mixing.network.MixingNetwork`; follows the mixed-model protocol of
  :mod:`adasmooth.mixing` (``forward(x) -> logits``, ``mix(x, detach_alpha) -> MixOutput``).
- :func:`build_adaptive_classifier`: a fresh mixing network sized for two base models' taps.
- :func:`save_adaptive_classifier` / :func:`load_adaptive_classifier`: safetensors + JSON sidecar;
  the sidecar records the base models by path relative to itself, so a results folder can move.

The base models are the caller's objects and are never modified: each forward pass runs them
inside :func:`frozen`, which puts them in eval mode with parameter gradients off and restores the
caller's flags exactly on exit. So no gradient reaches their weights, their batch-norm statistics
never move, and whatever mode or ``requires_grad`` flags the caller gave them are the ones they
keep, through construction, forward passes, ``.train()`` and ``.eval()``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from ..core.io import atomic_write, provenance, write_json
from ..models import default_taps
from ..models.checkpoint import checkpoint_paths
from .network import (
    RESNET18_WIDTHS,
    FeatureTaps,
    MixingNetConfig,
    MixingNetwork,
    as_feature_map,
    pair_features,
    tap_name,
)
from .bases import load_bases, mixture_input_shape
from .bases import relative_to as _relative_to
from .protocol import MixOutput
from .nonlinear import NonlinearParams, nonlinear_mix_log_probs
from .rules import mix_logits

__all__ = [
    "AdaptiveMixedClassifier",
    "frozen",
    "build_adaptive_classifier",
    "probe_tap_channels",
    "save_adaptive_classifier",
    "load_adaptive_classifier",
]

FORMAT_VERSION = 1
KIND = "adaptive-mixed-classifier"


@contextlib.contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Run ``models`` in eval mode with no parameter gradients; on exit every submodule's ``training``
    flag and every parameter's ``requires_grad`` are exactly what they were (also on an error)."""
    modules = {id(m): m for model in models for m in model.modules()}.values()
    params = {id(p): p for model in models for p in model.parameters()}.values()
    modes = [(m, m.training) for m in modules]
    flags = [(p, p.requires_grad) for p in params]
    try:
        for model in models:
            model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


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
        raise ConfigError(f"taps must be None, two module names, or two pairs of names; got {taps!r}")
    std_t = tuple(std_t) if std_t is not None else tuple(default_taps(std_model))
    rob_t = tuple(rob_t) if rob_t is not None else tuple(default_taps(rob_model))
    for t in (std_t, rob_t):
        if len(t) != 2 or not all(isinstance(n, str) for n in t):
            raise ConfigError(f"each model needs exactly two tap names, got {t!r}")
    # full module paths, so the records name exactly what was tapped
    return tuple(tap_name(std_model, n) for n in std_t), tuple(tap_name(rob_model, n) for n in rob_t)


def _class_count(model: nn.Module) -> int | None:
    spec = getattr(model, "spec", None)
    return getattr(spec, "num_classes", None)


class AdaptiveMixedClassifier(nn.Module):
    """h_alpha(x) = log((1 - alpha(x)) softmax(s_g g(x)) + alpha(x) softmax(s_h h(x))), alpha from a net.

    The base models run once per forward, frozen and in eval mode (see :func:`frozen`; their own
    flags are left as the caller set them); their tapped features feed the mixing network, the only
    part that trains. ``detach_features=True`` cuts the gradient path through alpha(x) altogether
    (gray-box); ``mix(x, detach_alpha=True)`` does so for one call (what attack setting A uses).
    ``features`` says whose taps the mixing network reads: ``both`` (the paper's), or only ``rob``'s
    (h's features move less under a small perturbation than g's) or ``std``'s.
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
        features: str = "both",
    ):
        super().__init__()
        if features not in FEATURE_SOURCES:
            raise InputError(f"features must be one of {FEATURE_SOURCES}, got {features!r}")
        n_std, n_rob = _class_count(std_model), _class_count(rob_model)
        if n_std is not None and n_rob is not None and n_std != n_rob:
            raise InputError(f"base models disagree on the class count: g has {n_std}, h has {n_rob}")
        if not (std_scale > 0 and rob_scale > 0):
            raise InputError(f"logit scales must be positive, got {std_scale} and {rob_scale}")
        self.std_model = std_model
        self.rob_model = rob_model
        self.mixing_net = mixing_net
        self.std_taps, self.rob_taps = _normalize_taps(std_model, rob_model, taps)
        self.std_scale = float(std_scale)
        self.rob_scale = float(rob_scale)
        self.detach_features = bool(detach_features)
        self.features = features
        # MixedNUTS map on h with a hardmax g (mixing.nonlinear) instead of Eq. 3.4's softmaxes, or None
        self.nonlinear: NonlinearParams | None = None
        # where the base models came from and the (C, H, W) it was built for, recorded by save_adaptive_classifier
        self.std_checkpoint: str | None = None
        self.rob_checkpoint: str | None = None
        self.input_shape: tuple[int, ...] | None = None

    def train(self, mode: bool = True) -> "AdaptiveMixedClassifier":
        # Only the mixing network has a training mode here; the base models always run in eval
        # mode inside frozen(), and their own flags belong to the caller.
        self.training = mode
        self.mixing_net.train(mode)
        return self

    def base_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g logits, h logits, first-tap features, second-tap features), one pass of each model."""
        if x.dim() != 4:
            raise InputError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        with frozen(self.std_model, self.rob_model):
            with FeatureTaps(self.std_model, self.std_taps) as t_std:
                g = self.std_model(x)
            with FeatureTaps(self.rob_model, self.rob_taps) as t_rob:
                h = self.rob_model(x)
        if g.dim() != 2 or g.shape != h.shape:
            raise InputError(f"base models must return (N, C) logits of equal shape, got {tuple(g.shape)} "
                             f"and {tuple(h.shape)}")
        (s1, s2), (r1, r2) = t_std.features(), t_rob.features()
        first, second = select_features(self.features, (s1, s2), (r1, r2))
        return g, h, first, second

    @torch.no_grad()
    def head_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g logits, h logits, normalised gamma): all that the eval head needs to give alpha and the mixture
        for any scale, shift and range, so calibrations compute them once and replay the head."""
        g, h, first, second = self.base_outputs(x)
        return g, h, self.mixing_net.normalized_gamma(self.mixing_net.gamma(first, second))

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
        return MixOutput(logits=self.mix_from_logits(g, h, alpha), alpha=alpha, alpha_logit=alpha_logit)

    def mix_from_logits(self, g: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The mixed logits from base-model logits and alpha (what calibration replays on cached outputs)."""
        if self.nonlinear is not None:
            return nonlinear_mix_log_probs(g, h, alpha, self.nonlinear)
        return mix_logits(g, h, alpha, self.std_scale, self.rob_scale)

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).logits

    def extra_repr(self) -> str:
        return (f"std_taps={self.std_taps}, rob_taps={self.rob_taps}, std_scale={self.std_scale}, "
                f"rob_scale={self.rob_scale}, detach_features={self.detach_features}, nonlinear={self.nonlinear}")


@torch.no_grad()
def probe_tap_channels(std_model: nn.Module, rob_model: nn.Module, input_shape: Sequence[int],
                       taps=None, features: str = "both") -> tuple[int, int]:
    """Channels of the first and second inputs of the mixing network (the taps ``features`` selects,
    concatenated), measured on a zero input."""
    std_t, rob_t = _normalize_taps(std_model, rob_model, taps)
    param = next(iter(std_model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(2, *input_shape, device=device)
    channels = []
    for model, names in ((std_model, std_t), (rob_model, rob_t)):
        with frozen(model), FeatureTaps(model, names) as t:
            model(x)
        channels.append(t.features())
    first, second = select_features(features, channels[0], channels[1])
    return first.shape[1], second.shape[1]


FEATURE_SOURCES = ("both", "rob", "std")


def select_features(features: str, std_feats, rob_feats) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixing network's (first, second) inputs from g's and h's two taps each."""
    if features == "rob":
        return as_feature_map(rob_feats[0]), as_feature_map(rob_feats[1])
    if features == "std":
        return as_feature_map(std_feats[0]), as_feature_map(std_feats[1])
    return pair_features(std_feats[0], rob_feats[0]), pair_features(std_feats[1], rob_feats[1])


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
    features: str = "both",
    **head: Any,
) -> AdaptiveMixedClassifier:
    """A fresh mixing network sized for the two base models' taps, wrapped with them.

    ``head`` may set ``bn_momentum``, ``train_scale``, ``train_shift``, ``train_clamp_std``.
    """
    first, second = probe_tap_channels(std_model, rob_model, input_shape, taps, features)
    cfg = MixingNetConfig(first, second, list(widths), list(blocks), list(strides), **head)
    param = next(iter(std_model.parameters()), None)
    net = MixingNetwork(cfg)
    if param is not None:
        net = net.to(param.device)
    model = AdaptiveMixedClassifier(std_model, rob_model, net, std_scale, rob_scale, taps, detach_features, features)
    model.input_shape = tuple(int(v) for v in input_shape)
    return model


# ---------------------------------------------------------------------------- save / load


def save_adaptive_classifier(model: AdaptiveMixedClassifier, path: str | Path,
                             metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` (mixing network, its buffers included) and ``path.json``.

    The sidecar records the network config, the taps, the logit scales, the detach switch, the input
    shape (``metadata["input_shape"]``, else :func:`~.bases.mixture_input_shape`) and the base models'
    checkpoint paths (``metadata["std_checkpoint"]``/``["rob_checkpoint"]``, else the
    classifier's ``std_checkpoint``/``rob_checkpoint`` attributes), relative to the sidecar's folder,
    so the folder holding both can move.
    """
    if not isinstance(model.mixing_net, MixingNetwork):
        # e.g. the authors' composites: they load from their own files (mixing.bai2023.load_bai2023)
        raise ConfigError(f"only adasmooth's MixingNetwork is saved in this format, not a "
                          f"{type(model.mixing_net).__name__}")
    metadata = dict(metadata or {})
    std_ckpt = metadata.pop("std_checkpoint", None) or model.std_checkpoint
    rob_ckpt = metadata.pop("rob_checkpoint", None) or model.rob_checkpoint
    input_shape = metadata.pop("input_shape", None) or mixture_input_shape(model)
    weights, sidecar = checkpoint_paths(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.mixing_net.state_dict().items()}
    info = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "mixing_net": asdict(model.mixing_net.config),
        "eval_head": model.mixing_net.eval_head(),
        "taps": {"std": list(model.std_taps), "rob": list(model.rob_taps)},
        "std_scale": model.std_scale,
        "rob_scale": model.rob_scale,
        "detach_features": model.detach_features,
        "features": model.features,
        "nonlinear": model.nonlinear.as_dict() if model.nonlinear is not None else None,
        "std_checkpoint": _relative_to(std_ckpt, sidecar.parent),
        "rob_checkpoint": _relative_to(rob_ckpt, sidecar.parent),
        "num_classes": _class_count(model.std_model),
        "input_shape": list(input_shape) if input_shape else None,
        **metadata,
        "provenance": provenance(),
    }
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    write_json(sidecar, info)
    return weights


def _read_sidecar(weights: Path, sidecar: Path) -> dict[str, Any]:
    for f in (weights, sidecar):
        if not f.is_file():
            raise CheckpointError(f"adaptive classifier checkpoint file {f} not found")
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sidecar} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("kind") != KIND:
        kind = info.get("kind") if isinstance(info, dict) else None
        raise CheckpointError(f"{sidecar} is not an adaptive mixed classifier checkpoint (kind {kind!r})")
    return info


def load_adaptive_classifier(path: str | Path, std_model: nn.Module | None = None,
                             rob_model: nn.Module | None = None,
                             device: str | torch.device = "cpu") -> tuple[AdaptiveMixedClassifier, dict]:
    """Rebuild the classifier in eval mode; base models from the recorded paths unless given.

    Returns (classifier, sidecar). The sidecar's ``std_checkpoint``/``rob_checkpoint`` come back
    as absolute paths to where the base models were found (or would be, for given models), ready to
    be passed on, e.g. to :func:`save_adaptive_classifier` in another folder.
    """
    weights, sidecar = checkpoint_paths(path)
    info = _read_sidecar(weights, sidecar)
    models, bases = load_bases(info, sidecar, {"std": std_model, "rob": rob_model}, device)
    net = MixingNetwork(MixingNetConfig(**info["mixing_net"]))
    net.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    taps = (tuple(info["taps"]["std"]), tuple(info["taps"]["rob"]))
    model = AdaptiveMixedClassifier(models["std"].to(device), models["rob"].to(device), net.to(device),
                                    info["std_scale"], info["rob_scale"], taps, info["detach_features"],
                                    info.get("features", "both"))
    model.std_checkpoint, model.rob_checkpoint = bases["std"], bases["rob"]
    model.input_shape = tuple(info["input_shape"]) if info.get("input_shape") else None
    model.nonlinear = NonlinearParams.from_dict(info["nonlinear"]) if info.get("nonlinear") else None
    info["std_checkpoint"], info["rob_checkpoint"] = bases["std"], bases["rob"]
    return model.eval(), info
