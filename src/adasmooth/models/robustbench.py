"""RobustBench model-zoo files, read offline: ``robustbench:<dataset>/<threat>/<name>``.

RobustBench stores an entry's weights at ``<model_dir>/<dataset>/<threat>/<name>.pt``. adasmooth
reads that file with ``torch.load(weights_only=True)`` (no pickled code runs) and never downloads
it. :data:`ZOO` says, for every supported entry, which adasmooth architecture (``models/
dm_wide_resnet.py``, ``models/rb_resnet.py``) rebuilds it and with which normalisation; the facts
come from RobustBench 1.1.1's ``model_zoo/cifar10.py`` and ``cifar100.py``. Adding an entry whose
architecture exists is one line in ``_CIFAR10_LINF`` / ``_CIFAR100_LINF``.

Like RobustBench's loader, the state dict may sit under ``state_dict`` (or, for Andriushchenko
2020, under ``last``) with ``module.``/``model.`` prefixes; normalisation buffers ``mu``/``sigma``
in the file win over the table's (several files lack them; RobustBench then keeps its defaults).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from .base import create_model
from .checkpoint import load_foreign_state_dict, load_state_checked

__all__ = ["ZooEntry", "ZOO", "THREATS", "resolve_model_dir", "parse_robustbench_spec", "robustbench_entry",
           "robustbench_file", "robustbench_info", "load_robustbench", "list_robustbench"]

PREFIX = "robustbench:"
MODEL_DIR_ENV = "ADASMOOTH_MODEL_DIR"

# RobustBench's threat-model folders and the radius its leaderboard evaluates (pixels in [0, 1]).
THREATS = {"Linf": ("linf", 8 / 255), "L2": ("l2", 0.5)}
_INPUT_SHAPE = (3, 32, 32)
_CLASSES = {"cifar10": 10, "cifar100": 100}

# Normalisations, as the entries' own code gives them (RobustBench uses several roundings).
_C10_DM = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
_C100_DM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_C100_LONG = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
              (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))
_C100_CHEN = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
# 2x - 1 (Hendrycks 2019) is (x - 0.5) / 0.5.
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class ZooEntry:
    """One RobustBench entry: where its file lies and how adasmooth rebuilds it."""

    dataset: str
    threat: str
    name: str
    architecture: str
    kwargs: dict = field(default_factory=dict)
    normalization: tuple | None = None  # (mean, std); None: the model sees raw pixels
    container: str | None = None  # a key the state dict sits under besides "state_dict"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.threat}/{self.name}"

    @property
    def num_classes(self) -> int:
        return _CLASSES[self.dataset]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return _INPUT_SHAPE


def _dm(depth: int, width: int, act: str = "swish") -> tuple[str, dict]:
    return f"dm-wrn-{depth}-{width}", {"activation": act}


def _wrn(depth: int, width: int, sub_block1: bool = False) -> tuple[str, dict]:
    return f"rb-wrn-{depth}-{width}", {"sub_block1": True} if sub_block1 else {}


_DM_R18 = ("dm-preact-resnet18", {"activation": "swish"})
_R18 = ("rb-resnet18", {})
_PRN18 = ("rb-preact-resnet18", {})

# name: ((architecture, kwargs), normalisation or None[, container])
_CIFAR10_LINF: dict[str, tuple] = {
    "Andriushchenko2020Understanding": (_PRN18, None, "last"),
    "Carmon2019Unlabeled": (_wrn(28, 10, True), None),
    "Sehwag2020Hydra": (_wrn(28, 10, True), None),
    "Wang2020Improving": (_wrn(28, 10, True), None),
    "Hendrycks2019Using": (_wrn(28, 10), _HALF),
    "Rice2020Overfitting": (_wrn(34, 20), _C10_DM),
    "Zhang2019Theoretically": (_wrn(34, 10, True), None),
    "Huang2020Self": (_wrn(34, 10, True), None),
    "Wong2020Fast": (_PRN18, _C10_DM),
    "Zhang2019You": (_wrn(34, 10, True), None),
    "Zhang2020Attacks": (_wrn(34, 10, True), None),
    "Wu2020Adversarial_extra": (_wrn(28, 10, True), None),
    "Wu2020Adversarial": (_wrn(34, 10), None),
    "Gowal2020Uncovering_70_16": (_dm(70, 16), _C10_DM),
    "Gowal2020Uncovering_70_16_extra": (_dm(70, 16), _C10_DM),
    "Gowal2020Uncovering_34_20": (_dm(34, 20), _C10_DM),
    "Gowal2020Uncovering_28_10_extra": (_dm(28, 10), _C10_DM),
    "Sehwag2021Proxy": (_wrn(34, 10), None),
    "Sehwag2021Proxy_R18": (_R18, None),
    "Sitawarin2020Improving": (_wrn(34, 10, True), None),
    "Chen2020Efficient": (_wrn(34, 10, True), _C10_DM),
    "Cui2020Learnable_34_20": (_wrn(34, 20, True), None),
    "Cui2020Learnable_34_10": (_wrn(34, 10, True), None),
    "Zhang2020Geometry": (_wrn(28, 10, True), None),
    "Rebuffi2021Fixing_28_10_cutmix_ddpm": (_dm(28, 10), _C10_DM),
    "Rebuffi2021Fixing_106_16_cutmix_ddpm": (_dm(106, 16), _C10_DM),
    "Rebuffi2021Fixing_70_16_cutmix_ddpm": (_dm(70, 16), _C10_DM),
    "Rebuffi2021Fixing_70_16_cutmix_extra": (_dm(70, 16), _C10_DM),
    "Sridhar2021Robust": (_wrn(28, 10, True), None),
    "Sridhar2021Robust_34_15": (_wrn(34, 15, True), None),
    "Rebuffi2021Fixing_R18_ddpm": (_DM_R18, _C10_DM),
    "Rade2021Helper_R18_extra": (_DM_R18, _C10_DM),
    "Rade2021Helper_R18_ddpm": (_DM_R18, _C10_DM),
    "Rade2021Helper_extra": (_dm(34, 10), _C10_DM),
    "Rade2021Helper_ddpm": (_dm(28, 10), _C10_DM),
    "Addepalli2021Towards_RN18": (_R18, None),
    "Addepalli2021Towards_WRN34": (_wrn(34, 10, True), None),
    "Gowal2021Improving_70_16_ddpm_100m": (_dm(70, 16), _C10_DM),
    "Gowal2021Improving_28_10_ddpm_100m": (_dm(28, 10), _C10_DM),
    "Gowal2021Improving_R18_ddpm_100m": (_DM_R18, _C10_DM),
    "Chen2021LTD_WRN34_10": (_wrn(34, 10), None),
    "Chen2021LTD_WRN34_20": (_wrn(34, 20), None),
    "Standard": (_wrn(28, 10), None),
    "Jia2022LAS-AT_34_10": (_wrn(34, 10), None),
    "Jia2022LAS-AT_70_16": (_wrn(70, 16), None),
    "Pang2022Robustness_WRN28_10": (_dm(28, 10), _C10_DM),
    "Pang2022Robustness_WRN70_16": (_dm(70, 16), _C10_DM),
    "Addepalli2022Efficient_RN18": (_R18, None),
    "Addepalli2022Efficient_WRN_34_10": (_wrn(34, 10), None),
    "Wang2023Better_WRN-28-10": (_dm(28, 10, "silu"), _C10_DM),
    "Wang2023Better_WRN-70-16": (_dm(70, 16, "silu"), _C10_DM),
    "Xu2023Exploring_WRN-28-10": (_dm(28, 10, "silu"), _C10_DM),
    "Cui2023Decoupled_WRN-28-10": (_dm(28, 10, "silu"), _C10_DM),
    "Cui2023Decoupled_WRN-34-10": (_wrn(34, 10), None),
    "Chen2024Data_WRN_34_10": (_wrn(34, 10), None),
    "Chen2024Data_WRN_34_20": (_wrn(34, 20), None),
    "Bartoldson2024Adversarial_WRN-94-16": (_dm(94, 16, "silu"), _C10_DM),
    "Bartoldson2024Adversarial_WRN-82-8": (_dm(82, 8, "silu"), _C10_DM),
}

_CIFAR100_LINF: dict[str, tuple] = {
    "Gowal2020Uncovering": (_dm(70, 16), _C100_DM),
    "Gowal2020Uncovering_extra": (_dm(70, 16), _C100_DM),
    "Cui2020Learnable_34_20_LBGAT6": (_wrn(34, 20, True), None),
    "Cui2020Learnable_34_10_LBGAT0": (_wrn(34, 10, True), None),
    "Cui2020Learnable_34_10_LBGAT6": (_wrn(34, 10, True), None),
    "Chen2020Efficient": (_wrn(34, 10, True), _C100_CHEN),
    "Wu2020Adversarial": (_wrn(34, 10), _C100_LONG),
    "Sehwag2021Proxy": (_wrn(34, 10), None),
    "Sitawarin2020Improving": (_wrn(34, 10, True), None),
    "Hendrycks2019Using": (_wrn(28, 10), _HALF),
    "Rice2020Overfitting": (("rb-preact-resnet18", {"out_shortcut": True, "bn_before_fc": True}), _C100_LONG),
    "Rebuffi2021Fixing_70_16_cutmix_ddpm": (_dm(70, 16), _C100_DM),
    "Rebuffi2021Fixing_28_10_cutmix_ddpm": (_dm(28, 10), _C100_DM),
    "Rebuffi2021Fixing_R18_ddpm": (_DM_R18, _C100_DM),
    "Rade2021Helper_R18_ddpm": (_DM_R18, _C100_DM),
    "Addepalli2021Towards_PARN18": (("rb-preact-resnet18", {"out_shortcut": True, "bn_before_fc": True}), None),
    "Addepalli2021Towards_WRN34": (_wrn(34, 10, True), None),
    "Chen2021LTD_WRN34_10": (_wrn(34, 10, True), None),
    "Pang2022Robustness_WRN28_10": (_dm(28, 10), _C100_DM),
    "Pang2022Robustness_WRN70_16": (_dm(70, 16), _C100_DM),
    "Jia2022LAS-AT_34_10": (_wrn(34, 10, True), None),
    "Jia2022LAS-AT_34_20": (_wrn(34, 20), None),
    "Addepalli2022Efficient_RN18": (_R18, None),
    "Addepalli2022Efficient_WRN_34_10": (_wrn(34, 10), None),
    "Cui2020Learnable_34_10_LBGAT9_eps_8_255": (_wrn(34, 10), None),
    "Wang2023Better_WRN-28-10": (_dm(28, 10, "silu"), _C100_DM),
    "Wang2023Better_WRN-70-16": (_dm(70, 16, "silu"), _C100_DM),
    "Cui2023Decoupled_WRN-28-10": (_dm(28, 10, "silu"), _C100_DM),
    "Cui2023Decoupled_WRN-34-10": (_wrn(34, 10), None),
    "Cui2023Decoupled_WRN-34-10_autoaug": (_wrn(34, 10), None),
    "Chen2024Data_WRN_34_10": (_wrn(34, 10), None),
}


def _build_zoo() -> dict[str, ZooEntry]:
    zoo = {}
    for dataset, table in (("cifar10", _CIFAR10_LINF), ("cifar100", _CIFAR100_LINF)):
        for name, row in table.items():
            (arch, kwargs), norm, *container = row
            entry = ZooEntry(dataset, "Linf", name, arch, dict(kwargs), norm, container[0] if container else None)
            zoo[entry.key] = entry
    return zoo


ZOO: dict[str, ZooEntry] = _build_zoo()


def list_robustbench(dataset: str | None = None, threat: str | None = None) -> list[str]:
    """The supported entries, as ``dataset/threat/name`` (optionally of one data set and threat)."""
    return [k for k, e in ZOO.items() if dataset in (None, e.dataset) and threat in (None, e.threat)]


def resolve_model_dir(model_dir: str | Path | None = None) -> Path:
    """The RobustBench model folder: the argument, else ``$ADASMOOTH_MODEL_DIR``, else ``./models``."""
    if model_dir:
        return Path(model_dir)
    return Path(os.environ.get(MODEL_DIR_ENV) or "models")


def parse_robustbench_spec(spec: str) -> tuple[str, str, str]:
    """``robustbench:cifar10/Linf/Carmon2019Unlabeled`` -> (``cifar10``, ``Linf``, ``Carmon2019Unlabeled``)."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    parts = body.split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"model spec {spec!r}: expected robustbench:<dataset>/<threat>/<name>, "
                          f"e.g. robustbench:cifar10/Linf/Carmon2019Unlabeled")
    dataset, threat, name = parts
    # RobustBench's folders are spelt Linf / L2; accept the lower-case spellings adasmooth uses elsewhere.
    threat = {t.lower(): t for t in THREATS}.get(threat.lower(), threat)
    return dataset.lower(), threat, name


def robustbench_entry(spec: str) -> ZooEntry:
    """The table row for a ``robustbench:`` spec; ConfigError listing the supported entries otherwise."""
    dataset, threat, name = parse_robustbench_spec(spec)
    key = f"{dataset}/{threat}/{name}"
    if key not in ZOO:
        near = list_robustbench(dataset, threat) or list_robustbench()
        shown = ", ".join(k.rsplit("/", 1)[-1] if dataset in k and threat in k else k for k in near)
        raise ConfigError(f"RobustBench entry {key} is not supported (an architecture adasmooth lacks, or not "
                          f"in its table); supported for {dataset}/{threat}: {shown}")
    return ZOO[key]


def robustbench_file(entry: ZooEntry, model_dir: str | Path | None = None) -> Path:
    return resolve_model_dir(model_dir) / entry.dataset / entry.threat / f"{entry.name}.pt"


def robustbench_info(spec: str, model_dir: str | Path | None = None) -> dict[str, Any]:
    """What the entry is, in the shape of a checkpoint sidecar (commands default to it): architecture,
    classes, input shape, data set, normalisation and the leaderboard's threat model."""
    entry = robustbench_entry(spec)
    mean, std = entry.normalization or ((0.0,) * 3, (1.0,) * 3)
    norm, eps = THREATS[entry.threat]
    return {
        "architecture": entry.architecture,
        "num_classes": entry.num_classes,
        "in_channels": entry.input_shape[0],
        "input_shape": list(entry.input_shape),
        "normalization": {"mean": list(mean), "std": list(std)},
        "model_kwargs": dict(entry.kwargs),
        "dataset": entry.dataset,
        "threat": {"norm": norm, "eps": eps},
        "source": f"{PREFIX}{entry.key}",
        "file": str(robustbench_file(entry, model_dir)),
    }


def _normalization_from_file(state: dict[str, torch.Tensor], path: Path) -> tuple[list, list] | None:
    """``mu``/``sigma`` buffers saved by entries that normalise in their own module, removed from ``state``."""
    found = [k for k in ("mu", "sigma") if k in state]
    if not found:
        return None
    if len(found) == 1:
        raise CheckpointError(f"{path} holds {found[0]!r} but not its partner; not a RobustBench file")
    return state.pop("mu").flatten().tolist(), state.pop("sigma").flatten().tolist()


def load_robustbench(spec: str, device: str | torch.device = "cpu",
                     model_dir: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a RobustBench entry from its local file; (model in eval mode, info). Never downloads."""
    entry = robustbench_entry(spec)
    info = robustbench_info(spec, model_dir)
    path = Path(info["file"])
    if not path.is_file():
        raise CheckpointError(f"{spec}: file {path} not found; adasmooth never downloads (fetch it with RobustBench, "
                              f"or point --model-dir / ${MODEL_DIR_ENV} at the folder holding {entry.dataset}/)")
    containers = ((entry.container,) if entry.container else ()) + ("state_dict", "model_state_dict")
    state = load_foreign_state_dict(path, containers=containers)
    from_file = _normalization_from_file(state, path)
    if from_file is not None:
        info["normalization"] = {"mean": from_file[0], "std": from_file[1]}
    model = create_model(entry.architecture, entry.num_classes, in_channels=entry.input_shape[0],
                         mean=info["normalization"]["mean"], std=info["normalization"]["std"],
                         input_shape=entry.input_shape, dataset=entry.dataset, **entry.kwargs)
    # The normalisation is not in RobustBench's files: it comes from the table (or mu/sigma above).
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    load_state_checked(model, state, path)
    return model.to(device).eval(), info
