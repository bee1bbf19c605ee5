"""The authors' released MixedNUTS models (RobustBench's ``Bai2024MixedNUTS`` entries).

RobustBench stores each as two files beside ``<model_dir>/<dataset>/Linf/Bai2024MixedNUTS.pt``:
``...pt_m0.pt`` (standard model g: BiT-M-R152x2 of its ``bit_rn_v2.py``, which upsamples its input
to 128x128 itself) and ``...pt_m1.pt`` (robust model h). :func:`load_bai2024` reads them with
``torch.load(weights_only=True)`` (never downloads) and returns a
:class:`~adasmooth.mixing.fixed.MixedClassifier` with :func:`~adasmooth.mixing.nonlinear.nonlinear_rule`:
log((1 - alpha) * hardmax(g) + alpha * softmax(map(h))), which is what RobustBench's
``NonLinMixedClassifier`` returns (its ``HardMaxMap`` is the exact one-hot whenever no gradient is
taken, and the ``return_all`` surrogate for attacks is adasmooth's own nonlinear attack).

Facts carried over from RobustBench 1.1.1 (``comp_model.get_nonlin_mixed_classifier`` and
``optimal_spca.yaml``): the map is its GELU branch at the default beta, with k = 250 for the top-k
normalisation; alpha is that branch's alpha; ``alpha_diffable`` (the ``none`` branch's alpha at its
default beta) only weights their differentiable surrogate and is kept here as metadata.

``bit_rn_v2.py`` differs from ``bit_rn.py`` (our :class:`~adasmooth.models.bit_resnet.BitResNetV2`)
only outside the weights: its input normalisation is a pair of parameters ``mean``/``std`` (0.5)
that the released file may or may not hold (RobustBench loads it non-strictly for that reason), and
it resizes inside ``forward``. Both are honoured: a file's ``mean``/``std`` replace the 0.5s.

ImageNet's entry mixes RobustBench's ConvNeXt V2-L (``models/convnext_v2.py``; it sees raw pixels, its
file's unused ``mean``/``std`` are dropped) with Liu2023Comprehensive's Swin-L (the zoo entry, timm
from the ``[vision]`` extra, its file adapted by timm's Swin checkpoint filter as RobustBench does),
at 224x224 (RobustBench preprocesses with ``BicubicRes256Crop224``).

CIFAR-10's entry uses Peng2023Robust's RaWRN-70-16 as h (:mod:`adasmooth.models.ra_wide_resnet`,
``ra-wrn-70-16``: RobustBench's ``robustarch_wide_resnet.py`` with torchvision's squeeze-excitation
written out), CIFAR-100's Wang2023Better's WRN-70-16 with SiLU (``dm-wrn-70-16``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.errors import CheckpointError, ConfigError
from ..models import create_model
from ..models.convnext_v2 import convnext_v2_config_from_state_dict
from ..models.dm_wide_resnet import dm_wrn_config_from_state_dict
from ..models.robustbench import ZOO, build_entry, library_state, threat_record
from ..models.ra_wide_resnet import ra_wrn_config_from_state_dict
from .bai2023 import (_CIFAR_STATS, _load_strict, _read_pt, _tensors, base_configs, base_models, bit_std_model,
                      released_entry, released_files)
from .fixed import MixedClassifier
from .nonlinear import NonlinearParams, nonlinear_rule

__all__ = ["Bai2024Entry", "BAI2024_ENTRIES", "bai2024_files", "bai2024_info", "build_bai2024", "load_bai2024"]


@dataclass(frozen=True)
class Bai2024Entry:
    """One MixedNUTS entry: h's RobustBench name and optimal_spca.yaml's values for it."""

    rob_name: str
    rob_arch: str  # "dm-wrn-silu" (DeepMind WRN with SiLU), "ra-wrn-70-16", or "zoo" (h is the zoo entry rob_name)
    s: float
    c: float
    p: float
    alpha: float
    alpha_diffable: float
    top_k: int = 250  # LNClampPowerScaleMap(ln_k=250) in comp_model.py

    def params(self) -> NonlinearParams:
        return NonlinearParams(s=self.s, c=self.c, p=self.p, top_k=self.top_k, activation="gelu")


# optimal_spca.yaml: gelu branch at default_beta 98.5 (s, c, p, alpha); none branch at its default beta
BAI2024_ENTRIES: dict[tuple[str, str], Bai2024Entry] = {
    ("cifar100", "Bai2024MixedNUTS"): Bai2024Entry(
        "Wang2023Better_WRN-70-16", "dm-wrn-silu", s=0.6115753843212784, c=-2.142857142857143, p=3.571428571428571,
        alpha=0.9860300534207915, alpha_diffable=0.9706995384302841),
    ("cifar10", "Bai2024MixedNUTS"): Bai2024Entry(
        "Peng2023Robust", "ra-wrn-70-16", s=5.0, c=-1.1, p=4.0,
        alpha=0.9987500602493457, alpha_diffable=0.9570535356459247),
    # gelu branch at default_beta 99.0; none branch at its default beta 95.0
    ("imagenet", "Bai2024MixedNUTS"): Bai2024Entry(
        "Liu2023Comprehensive_Swin-L", "zoo", s=0.023535468936502525, c=-0.2857142857142858, p=2.7142857142857144,
        alpha=0.9971266414518896, alpha_diffable=0.90683792395046),
}

_IMAGENET_SHAPE = (3, 224, 224)

_BIT_NORM_KEYS = ("mean", "std")  # bit_rn_v2.ResNetV2's normalisation parameters


def bai2024_files(name: str, dataset: str, model_dir: str | Path, threat: str = "Linf") -> list[Path]:
    """The two files RobustBench stores for a MixedNUTS entry: ``<model_dir>/<dataset>/<threat>/<name>.pt_m{0,1}.pt``."""
    return released_files(name, dataset, model_dir, threat, 2)


def _entry(name: str, dataset: str) -> Bai2024Entry:
    return released_entry(BAI2024_ENTRIES, name, dataset, "MixedNUTS entry")


def build_bai2024(name: str, dataset: str, std_arch: Mapping[str, Any] | None = None,
                  rob_arch: Mapping[str, Any] | None = None) -> MixedClassifier:
    """The MixedNUTS model with fresh weights: BiT-M-R152x2 + WRN-70-16 (SiLU) unless the overrides say otherwise."""
    entry = _entry(name, dataset)
    if entry.rob_arch == "zoo":
        g = create_model("convnext-v2", 1000, input_shape=_IMAGENET_SHAPE, dataset=dataset, **(std_arch or {}))
        h = build_entry(ZOO[f"{dataset}/Linf/{entry.rob_name}"])
    elif entry.rob_arch == "ra-wrn-70-16":
        mean, std = _CIFAR_STATS[dataset]
        g = bit_std_model(dataset, std_arch)
        h = create_model("ra-wrn-70-16", 10 if dataset == "cifar10" else 100, mean=mean, std=std,
                         input_shape=(3, 32, 32), dataset=dataset, **(rob_arch or {}))
    else:
        g, h = base_models(dataset, std_arch, rob_arch, activation="silu")  # Wang2023Better: nn.SiLU
    model = MixedClassifier(g, h, entry.alpha, rule=nonlinear_rule(entry.params()))
    return model.eval()


def load_bai2024(name: str, dataset: str, model_dir: str | Path = "models",
                 device: str | torch.device = "cpu", threat: str = "Linf") -> MixedClassifier:
    """A ``Bai2024MixedNUTS`` model from RobustBench's two files, as a nonlinear-rule MixedClassifier.

    Sizes are read from the files; a file that does not fit is a CheckpointError naming it and the
    keys. Returned in eval mode.
    """
    entry_name = name[:-3] if name.endswith(".pt") else name
    entry = _entry(entry_name, dataset)
    if threat != "Linf":
        raise ConfigError(f"the MixedNUTS entries are Linf entries, not {threat}")
    files = bai2024_files(entry_name, dataset, model_dir, threat)
    if entry.rob_arch == "zoo":
        return _load_zoo_pair(entry_name, dataset, entry, files).to(device).eval()
    std_state = _tensors(_read_pt(files[0]), files[0], "standard-model")
    rob_state = _tensors(_read_pt(files[1]), files[1], "robust-model")
    norm = {k: std_state.pop(k) for k in _BIT_NORM_KEYS if k in std_state}
    reader = ra_wrn_config_from_state_dict if entry.rob_arch == "ra-wrn-70-16" else dm_wrn_config_from_state_dict
    bit, wrn = base_configs(std_state, rob_state, files, dataset, reader)
    model = build_bai2024(entry_name, dataset, bit, wrn)
    g, h = model.std_model, model.rob_model
    for key, value in norm.items():
        if value.numel() != 3:
            raise CheckpointError(f"{files[0]}: {key} has {value.numel()} values, expected 3 (one per channel)")
        getattr(g, key).copy_(value.reshape(1, 3, 1, 1))
    # our WideResNet keeps its normalisation as buffers; RobustBench's file has none (persistent=False there)
    rob_state.update({k: v for k, v in h.state_dict().items() if k.startswith("normalize.")})
    _load_strict(g, std_state, files[0])
    _load_strict(h, rob_state, files[1])
    return model.to(device).eval()


def _load_zoo_pair(name: str, dataset: str, entry: Bai2024Entry, files: list[Path]) -> MixedClassifier:
    """ImageNet's MixedNUTS: ConvNeXt V2 (sizes read from its file) and the zoo entry ``entry.rob_name``."""
    std_state = _tensors(_read_pt(files[0]), files[0], "standard-model")
    rob_state = _tensors(_read_pt(files[1]), files[1], "robust-model")
    for unused in _BIT_NORM_KEYS:  # ConvNeXtV2.mean/std: parameters its forward never reads
        std_state.pop(unused, None)
    sizes = convnext_v2_config_from_state_dict(std_state, str(files[0]))
    zoo_entry = ZOO[f"{dataset}/Linf/{entry.rob_name}"]
    if sizes.pop("num_classes") != zoo_entry.num_classes:
        raise CheckpointError(f"{files[0]} has {std_state['head.weight'].shape[0]} classes; "
                              f"{dataset} has {zoo_entry.num_classes}")
    model = build_bai2024(name, dataset, std_arch=sizes)
    g, h = model.std_model, model.rob_model
    rob_state = library_state(rob_state, h, zoo_entry, str(files[1]))
    for part, state in ((g, std_state), (h, rob_state)):
        state.update({k: v for k, v in part.state_dict().items() if k.startswith("normalize.")})
    _load_strict(g, std_state, files[0])
    _load_strict(h, rob_state, files[1])
    return model


def bai2024_info(name: str, dataset: str, threat: str = "Linf") -> dict[str, Any]:
    """What a MixedNUTS entry records: its input shape and RobustBench's threat model."""
    entry = _entry(name, dataset)
    shape = _IMAGENET_SHAPE if entry.rob_arch == "zoo" else (3, 32, 32)
    return {"input_shape": list(shape), "threat": threat_record(dataset, threat), "alpha_diffable": entry.alpha_diffable}
