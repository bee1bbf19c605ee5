"""The authors' own released adaptive-smoothing models (RobustBench's ``Bai2023Improving_*`` entries).

RobustBench ships each as three files beside ``<model_dir>/<dataset>/Linf/<name>.pt``:
``<name>.pt_m0.pt`` (standard model: BiT ResNet-152x2, fed 128x128 bilinear upsamplings),
``<name>.pt_m1.pt`` (robust model: DeepMind WRN-70-16 with SiLU/Swish) and ``<name>.pt_m2.pt``
(``{"model": mixing network, "bn": BatchNorm1d of gamma}``). :func:`load_bai2023` reads them with
``torch.load(weights_only=True)`` (never downloads) and returns an
:class:`~adasmooth.mixing.adaptive.AdaptiveMixedClassifier` whose mixing network is
:class:`Bai2023MixingNet`, a re-implementation of their ``MixingNetV4`` with its state-dict keys, so
every attack, evaluation and calibration of adasmooth runs on the paper's own models.

How theirs differs from :class:`~adasmooth.mixing.network.MixingNetwork` (why it is a class of its
own rather than a layout of ours): its residual blocks add the *pre-activated* input on identity
shortcuts, there is no BatchNorm/ReLU before the pooling, the training-time clamp of gamma comes
before the BatchNorm (ours after), and the gamma scale and shift are the same in training and
evaluation. Its eval head (BatchNorm1d -> * scale + shift -> sigmoid -> into (alpha_min, alpha_max))
is ours, so calibration works on it unchanged.

The constants (logit scales, gamma scale/shift, alpha ranges) are those of RobustBench's
``comp_model.py`` (``get_composite_model``); the architecture sizes are read from the files.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from ..models import create_model
from ..models.resnet import PreActConvs
from ..models.dm_wide_resnet import dm_wrn_config_from_state_dict
from ..models.bit_resnet import BitResNetV2, bit_config_from_state_dict
from .adaptive import AdaptiveMixedClassifier
from .network import MixingNetwork, ranged_alpha

__all__ = [
    "base_models",
    "released_files",
    "released_entry",
    "bit_std_model",
    "base_configs",
    "Bai2023MixingNetConfig",
    "Bai2023MixingNet",
    "BAI2023_ENTRIES",
    "Bai2023Entry",
    "bai2023_files",
    "build_bai2023",
    "load_bai2023",
    "bai2023_state_dicts",
]

# CIFAR statistics the composites' robust models normalise with (RobustBench's dm_rn.py)
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
STD_INPUT_SIZE = 128  # the composites upsample CIFAR images to 128x128 for the BiT


@dataclass(frozen=True)
class Bai2023Entry:
    """One composite's constants, from comp_model.get_composite_model."""

    std_scale: float
    rob_scale: float
    gamma_scale: float
    gamma_shift: float
    alpha_min: float
    alpha_width: float
    rob_activation: str = "silu"  # 'edm' uses nn.SiLU, 'trades' their Swish: the same function


# (dataset, entry name) -> constants. The CIFAR-10 entry's fixed gamma (3.0) is never used: the
# mixing network is active in every released composite.
BAI2023_ENTRIES: dict[tuple[str, str], Bai2023Entry] = {
    ("cifar10", "Bai2023Improving_edm"): Bai2023Entry(1.2, 0.3, 2.0, 1.05, 0.96, 0.04),
    ("cifar100", "Bai2023Improving_edm"): Bai2023Entry(2.0, 1.0, 2.0, 1.3, 0.84, 0.15),
    ("cifar100", "Bai2023Improving_trades"): Bai2023Entry(2.0, 1.0, 2.0, 1.0, 0.815, 0.1),
}


# ---------------------------------------------------------------------------- their mixing network


class _TheirPreActBlock(PreActConvs):
    """Pre-activation block whose shortcut (identity or 1x1 conv) takes the activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        # a Sequential either way: the reference keys are shortcut.0.weight
        self.shortcut = nn.Sequential(*([nn.Conv2d(cin, cout, 1, stride, bias=False)]
                                        if stride != 1 or cin != cout else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + self.shortcut(pre)


@dataclass
class Bai2023MixingNetConfig:
    """Sizes and head constants of :class:`Bai2023MixingNet` (the composites: 768, 1536, (512, 768, 1024))."""

    first_channels: int
    second_channels: int
    widths: list[int] = field(default_factory=lambda: [512, 768, 1024])
    blocks: int = 2
    bn_momentum: float = 0.01
    gamma_scale: float = 2.0
    gamma_shift: float = 0.0
    alpha_range: tuple[float, float] = (0.0, 1.0)
    train_clamp_std: float = 0.6

    def validate(self) -> None:
        if self.first_channels < 1 or self.second_channels < 1 or self.blocks < 1:
            raise ConfigError("channel and block counts must be >= 1")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ConfigError(f"widths must be three positive integers, got {self.widths}")


class Bai2023MixingNet(nn.Module):
    """The authors' MixingNetV4 with its BatchNorm and alpha head; ``forward(first, second) -> (alpha, logit)``.

    ``first``/``second``: g's and h's first- and second-tap features concatenated along channels
    (what :class:`~adasmooth.mixing.adaptive.AdaptiveMixedClassifier` passes). gamma(x) =
    Linear(pool(blocks(blocks(first) + conv1x1(second)))). Offers the interface calibration uses
    (``gamma``, ``normalized_gamma``, ``eval_scale``, ``eval_shift``, ``alpha_min``, ``alpha_max``,
    ``set_eval_head``, ``eval_head``).
    """

    def __init__(self, config: Bai2023MixingNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        w = [int(v) for v in config.widths]
        cins = [config.first_channels, w[0], w[1]]
        self.layers = nn.ModuleList(
            nn.Sequential(*[_TheirPreActBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1)
                            for i in range(config.blocks)])
            for cin, cout in zip(cins, w))
        self.conv1x1 = nn.Conv2d(config.second_channels, w[0], 1, bias=False)
        self.linear = nn.Linear(w[2], 1, bias=False)
        self.bn = nn.BatchNorm1d(1, affine=False, momentum=config.bn_momentum)
        self.register_buffer("eval_scale", torch.tensor(float(config.gamma_scale)))
        self.register_buffer("eval_shift", torch.tensor(float(config.gamma_shift)))
        self.register_buffer("alpha_min", torch.tensor(float(config.alpha_range[0])))
        self.register_buffer("alpha_max", torch.tensor(float(config.alpha_range[1])))

    # the eval head is ours (same buffers), so its setters are ours too
    set_eval_head = MixingNetwork.set_eval_head
    eval_head = MixingNetwork.eval_head
    alpha_range = MixingNetwork.alpha_range

    def gamma(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        out = self.layers[0](first) + self.conv1x1(second)
        out = self.layers[2](self.layers[1](out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1)).squeeze(1)

    def normalized_gamma(self, gamma: torch.Tensor) -> torch.Tensor:
        if self.training:
            if gamma.shape[0] == 1:
                raise InputError("the mixing network needs batches of more than one example in training mode")
            # theirs: clamp to the batch mean +- k std (bounds as constants) before the BatchNorm
            k, mean, std = self.config.train_clamp_std, gamma.detach().mean(), gamma.detach().std()
            gamma = torch.clamp(gamma, mean - k * std, mean + k * std)
        return self.bn(gamma[:, None]).squeeze(1)

    def head(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = z * self.eval_scale.to(z.dtype) + self.eval_shift.to(z.dtype)
        if self.training:  # the alpha range applies at evaluation only
            return torch.sigmoid(u), u
        return ranged_alpha(u, *self.alpha_range())

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.normalized_gamma(self.gamma(first, second)))


_HEAD_BUFFERS = ("eval_scale", "eval_shift", "alpha_min", "alpha_max")
_LAYER_KEY = re.compile(r"layers\.(\d)\.(\d+)\.")


def _mixnet_config_from_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    try:
        widths = [int(state[f"layers.{i}.0.conv1.weight"].shape[0]) for i in range(3)]
        first = int(state["layers.0.0.conv1.weight"].shape[1])
        second = int(state["conv1x1.weight"].shape[1])
    except KeyError as err:
        raise CheckpointError(f"{source} is not a Bai2023 mixing network (no {err.args[0]})") from None
    blocks = 1 + max(int(m.group(2)) for m in map(_LAYER_KEY.match, state) if m and m.group(1) == "0")
    return {"first_channels": first, "second_channels": second, "widths": widths, "blocks": blocks}


# ---------------------------------------------------------------------------- files and loading


def released_files(name: str, dataset: str, model_dir: str | Path, threat: str, parts: int) -> list[Path]:
    """RobustBench's files of a multi-part entry: ``<model_dir>/<dataset>/<threat>/<name>.pt_m{0..parts-1}.pt``."""
    base = Path(model_dir) / dataset / threat / f"{name}.pt"
    return [base.with_name(f"{base.name}_m{i}.pt") for i in range(parts)]


def bai2023_files(name: str, dataset: str, model_dir: str | Path, threat: str = "Linf") -> list[Path]:
    """The three files RobustBench stores for a composite: ``<model_dir>/<dataset>/<threat>/<name>.pt_m{0,1,2}.pt``."""
    return released_files(name, dataset, model_dir, threat, 3)


def released_entry(table: Mapping[tuple[str, str], Any], name: str, dataset: str, what: str) -> Any:
    """``table[(dataset, name)]``, or a ConfigError listing the table's entries."""
    entry = table.get((dataset, name))
    if entry is None:
        known = ", ".join(f"{d}/Linf/{n}" for d, n in table)
        raise ConfigError(f"no {what} {dataset}/{name}; known: {known}")
    return entry


def _entry(name: str, dataset: str) -> Bai2023Entry:
    return released_entry(BAI2023_ENTRIES, name, dataset, "Bai2023 composite")


def _read_pt(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"composite part {path} not found (adasmooth never downloads; "
                              f"put RobustBench's file there)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds pickled code or is not a state dict; it was not loaded") from None
    except Exception as err:  # truncated or foreign files raise many types
        raise CheckpointError(f"{path} cannot be read as a torch state dict ({type(err).__name__})") from None


def _tensors(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no {what} state dict")
    # RobustBench strips DataParallel's prefix from these files too
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def bai2023_state_dicts(files: list[Path]) -> tuple[dict, dict, dict]:
    """(standard model, robust model, mixing network + its ``bn.*``) state dicts from the three files."""
    std = _tensors(_read_pt(files[0]), files[0], "standard-model")
    rob = _tensors(_read_pt(files[1]), files[1], "robust-model")
    raw = _read_pt(files[2])
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or not isinstance(raw.get("bn"), dict):
        raise CheckpointError(f"{files[2]} is not a Bai2023 mixing-network file (expected keys 'model' and 'bn')")
    net = _tensors(raw["model"], files[2], "mixing-network")
    net.update({f"bn.{k}": v for k, v in _tensors(raw["bn"], files[2], "gamma BatchNorm").items()})
    return std, rob, net


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{source} does not fit: {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                              f"expected {tuple(expected[bad[0]].shape)}")
    module.load_state_dict(state, strict=True)


def bit_std_model(dataset: str, std_arch: Mapping[str, Any] | None = None) -> BitResNetV2:
    """The authors' standard model: a BiT-M-R152x2 (unless ``std_arch`` says otherwise) fed 128x128 upsamplings."""
    std_kw = {"units": (3, 8, 36, 3), "width_factor": 2, **(std_arch or {})}
    return BitResNetV2(num_classes=10 if dataset == "cifar10" else 100, input_size=STD_INPUT_SIZE,
                       dataset=dataset, **std_kw)


def base_models(dataset: str, std_arch: Mapping[str, Any] | None, rob_arch: Mapping[str, Any] | None,
                activation: str) -> tuple[BitResNetV2, nn.Module]:
    """The authors' g (BiT, R152x2 unless ``std_arch`` says otherwise, fed 128x128) and h (DM WRN-70-16
    unless ``rob_arch`` says otherwise), fresh; shared with the MixedNUTS entries (bai2024.py)."""
    num_classes = 10 if dataset == "cifar10" else 100
    mean, std = _CIFAR_STATS[dataset]
    rob_kw = {"depth": 70, "width": 16, **(rob_arch or {})}
    g = bit_std_model(dataset, std_arch)
    h = create_model(f"dm-wrn-{rob_kw['depth']}-{rob_kw['width']}", num_classes, mean=mean, std=std,
                     input_shape=(3, 32, 32), dataset=dataset, activation=activation)
    return g, h


def base_configs(std_state: Mapping[str, torch.Tensor], rob_state: Mapping[str, torch.Tensor],
                 files: list[Path], dataset: str,
                 rob_reader: Callable[[Mapping[str, torch.Tensor], str], dict] = dm_wrn_config_from_state_dict,
                 ) -> tuple[dict, dict]:
    """(BiT sizes, h's sizes by ``rob_reader``) read from the two base models' files, their class
    counts checked against ``dataset``."""
    bit = bit_config_from_state_dict(std_state, str(files[0]))
    wrn = rob_reader(rob_state, str(files[1]))
    expected_classes = 10 if dataset == "cifar10" else 100
    for f, n in ((files[0], bit.pop("num_classes")), (files[1], wrn.pop("num_classes"))):
        if n != expected_classes:
            raise CheckpointError(f"{f} has {n} classes; {dataset} has {expected_classes}")
    return bit, wrn


def build_bai2023(name: str, dataset: str, std_arch: Mapping[str, Any] | None = None,
                  rob_arch: Mapping[str, Any] | None = None,
                  mixnet_arch: Mapping[str, Any] | None = None) -> AdaptiveMixedClassifier:
    """The composite with fresh weights: full size unless the ``*_arch`` overrides say otherwise.

    Full size is a BiT-M-R152x2 (``units=(3, 8, 36, 3), width_factor=2``), a WRN-70-16 and a mixing
    network on 768 + 1536 tap channels.
    """
    entry = _entry(name, dataset)
    g, h = base_models(dataset, std_arch, rob_arch, entry.rob_activation)
    wf, width = g.width_factor, int((rob_arch or {}).get("width", 16))
    first = 256 * wf + 16 * width  # BiT block1 + WRN layer.0 channels
    net_kw = {"first_channels": first, "second_channels": 2 * first, **(mixnet_arch or {})}
    cfg = Bai2023MixingNetConfig(**net_kw, gamma_scale=entry.gamma_scale, gamma_shift=entry.gamma_shift,
                                 alpha_range=(entry.alpha_min, min(1.0, entry.alpha_min + entry.alpha_width)))
    model = AdaptiveMixedClassifier(g, h, Bai2023MixingNet(cfg), entry.std_scale, entry.rob_scale,
                                    taps=(("body.block1", "body.block2"), ("layer.0", "layer.1")))
    return model.eval()


def load_bai2023(name: str, dataset: str, model_dir: str | Path = "models",
                 device: str | torch.device = "cpu", threat: str = "Linf") -> AdaptiveMixedClassifier:
    """A ``Bai2023Improving_*`` composite from RobustBench's three files, as an adaptive mixed classifier.

    ``robustbench:<dataset>/Linf/<name>`` specs for these names come here. The sizes of the three
    parts are read from the files (the released ones are R152x2, WRN-70-16 and the 768/1536-channel
    network); a file that does not fit is a CheckpointError listing the keys. Returned in eval mode.
    """
    entry_name = name[:-3] if name.endswith(".pt") else name
    _entry(entry_name, dataset)
    if threat != "Linf":
        raise ConfigError(f"the Bai2023 composites are Linf entries, not {threat}")
    files = bai2023_files(entry_name, dataset, model_dir, threat)
    std_state, rob_state, net_state = bai2023_state_dicts(files)
    bit, wrn = base_configs(std_state, rob_state, files, dataset)
    model = build_bai2023(entry_name, dataset, bit, wrn, _mixnet_config_from_state(net_state, str(files[2])))
    # the eval-head buffers are ours (their constants live in comp_model.py, not in the file)
    net_state.update({k: v for k, v in model.mixing_net.state_dict().items() if k in _HEAD_BUFFERS})
    # our WideResNet keeps its normalisation as buffers; RobustBench's file has none (the table's values)
    rob_state.update({k: v for k, v in model.rob_model.state_dict().items() if k.startswith("normalize.")})
    for module, state, f in ((model.std_model, std_state, files[0]), (model.rob_model, rob_state, files[1]),
                             (model.mixing_net, net_state, files[2])):
        _load_strict(module, state, f)
    return model.to(device).eval()
