"""RobustBench model-zoo files, read offline: ``robustbench:<dataset>/<threat>/<name>``.

RobustBench stores an entry's weights at ``<model_dir>/<dataset>/<threat>/<name>.pt``. adasmooth
reads that file with ``torch.load(weights_only=True)`` (no pickled code runs) and never downloads
it. :data:`ZOO` says, for every supported entry, which adasmooth architecture rebuilds it
(``models/dm_wide_resnet.py``, ``rb_resnet.py``, ``ra_wide_resnet.py``; for ImageNet
``vision.py``: timm or torchvision from the ``[vision]`` extra, with ``convstem.py``'s stems), with
which normalisation and, for ImageNet, with which of RobustBench's preprocessings (resize, crop,
interpolation); the facts come from RobustBench 1.1.1's ``model_zoo/cifar10.py``, ``cifar100.py``
and ``imagenet.py``. Adding an entry whose architecture exists is one line in its table.
:data:`REFUSED` names every other entry of RobustBench 1.1.1 with the one reason it does not load.

Threat models are recorded as RobustBench evaluates them: Linf at 8/255 (CIFAR) or 4/255
(ImageNet), L2 at 0.5, corruptions as ``{"model": "corruptions"}`` with no norm and no eps.

Like RobustBench's loader, the state dict may sit under ``state_dict`` (or, for Andriushchenko
2020 and Kireev 2021, under ``last``) with ``module.``/``model.`` prefixes; normalisation buffers
``mu``/``sigma`` (or a wrapper's ``normalize.mean``/``normalize.std``) in the file win over the
table's (several files lack them; RobustBench then keeps its defaults).
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
from .convstem import CONVSTEMS
from .vision import adapt_library_state

__all__ = ["ZooEntry", "ZOO", "REFUSED", "THREATS", "PREPROCESSINGS", "resolve_model_dir", "parse_robustbench_spec", "build_entry", "library_state",
           "robustbench_entry", "robustbench_file", "robustbench_info", "load_robustbench", "list_robustbench",
           "threat_record"]

PREFIX = "robustbench:"
MODEL_DIR_ENV = "ADASMOOTH_MODEL_DIR"

# RobustBench's threat-model folders -> the norm its leaderboard attacks in (None: not an attack)
THREATS = {"Linf": "linf", "L2": "l2", "corruptions": None}
# ... and the radius, in pixels in [0, 1]
_EPS = {("Linf", "cifar10"): 8 / 255, ("Linf", "cifar100"): 8 / 255, ("Linf", "imagenet"): 4 / 255,
        ("L2", "cifar10"): 0.5}
_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
_CIFAR_SHAPE = (3, 32, 32)

# RobustBench's data.PREPROCESSINGS for ImageNet: short-side resize (or a fixed size), centre crop, interpolation.
PREPROCESSINGS = {
    "Res256Crop224": {"resize": 256, "crop": 224, "interpolation": "bilinear"},
    "BicubicRes256Crop224": {"resize": 256, "crop": 224, "interpolation": "bicubic"},
    "Crop288": {"resize": None, "crop": 288, "interpolation": None},
    "Res224": {"resize": [224, 224], "crop": None, "interpolation": "bilinear"},  # both sides, aspect not kept
}

# Normalisations, as the entries' own code gives them (RobustBench uses several roundings).
_C10_DM = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
_C10_ENGSTROM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_C10_LONG = ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),
             (0.24703225141799082, 0.24348516474564, 0.26158783926049628))
_C10_RONY = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))
_C100_DM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_C100_LONG = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
              (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))
_C100_CHEN = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
# 2x - 1 (Hendrycks 2019) is (x - 0.5) / 0.5.
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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
    preprocessing: str | None = None  # a PREPROCESSINGS name (ImageNet); CIFAR images are used as they are
    adapter: str | None = None  # how RobustBench adapts old files to the library (vision.adapt_library_state)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.threat}/{self.name}"

    @property
    def num_classes(self) -> int:
        return _CLASSES[self.dataset]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.preprocessing is None:
            return _CIFAR_SHAPE
        steps = PREPROCESSINGS[self.preprocessing]
        side = steps["crop"] or steps["resize"][0]
        return (3, side, side)

    @property
    def library(self) -> str | None:
        """``timm`` / ``torchvision`` when the architecture comes from the ``[vision]`` extra."""
        return self.kwargs.get("library") if self.architecture == "vision" else None


def _dm(depth: int, width: int, act: str = "swish") -> tuple[str, dict]:
    return f"dm-wrn-{depth}-{width}", {"activation": act}


def _wrn(depth: int, width: int, sub_block1: bool = False) -> tuple[str, dict]:
    return f"rb-wrn-{depth}-{width}", {"sub_block1": True} if sub_block1 else {}


_DM_R18 = ("dm-preact-resnet18", {"activation": "swish"})
_R18 = ("rb-resnet18", {})
_R50 = ("rb-resnet50", {})
_PRN18 = ("rb-preact-resnet18", {})
_PRN18_V2 = ("rb-preact-resnet18", {"out_shortcut": True, "bn_before_fc": True})  # PreActBlockV2, bn_before_fc

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
    "Engstrom2019Robustness": (_R50, _C10_ENGSTROM),
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
    "Peng2023Robust": (("ra-wrn-70-16", {}), _C10_DM),
}

_CIFAR10_L2: dict[str, tuple] = {
    "Augustin2020Adversarial": (_R50, _C10_LONG),
    "Engstrom2019Robustness": (_R50, _C10_ENGSTROM),
    "Rice2020Overfitting": (_PRN18_V2, _C10_DM),
    "Rony2019Decoupling": (_wrn(28, 10), _C10_RONY),
    "Standard": (_wrn(28, 10), None),
    "Wu2020Adversarial": (_wrn(34, 10), None),
    "Gowal2020Uncovering": (_dm(70, 16), _C10_DM),
    "Gowal2020Uncovering_extra": (_dm(70, 16), _C10_DM),
    "Sehwag2021Proxy": (_wrn(34, 10), None),
    "Sehwag2021Proxy_R18": (_R18, None),
    "Rebuffi2021Fixing_70_16_cutmix_ddpm": (_dm(70, 16), _C10_DM),
    "Rebuffi2021Fixing_28_10_cutmix_ddpm": (_dm(28, 10), _C10_DM),
    "Rebuffi2021Fixing_70_16_cutmix_extra": (_dm(70, 16), _C10_DM),
    "Augustin2020Adversarial_34_10": (_wrn(34, 10), _C10_LONG),
    "Augustin2020Adversarial_34_10_extra": (_wrn(34, 10), _C10_LONG),
    "Rebuffi2021Fixing_R18_cutmix_ddpm": (_DM_R18, _C10_DM),
    "Rade2021Helper_R18_ddpm": (_DM_R18, _C10_DM),
    "Wang2023Better_WRN-28-10": (_dm(28, 10, "silu"), _C10_DM),
    "Wang2023Better_WRN-70-16": (_dm(70, 16, "silu"), _C10_DM),
}

_CIFAR10_CORRUPTIONS: dict[str, tuple] = {
    "Rebuffi2021Fixing_70_16_cutmix_extra_Linf": (_dm(70, 16), _C10_DM),
    "Rebuffi2021Fixing_70_16_cutmix_extra_L2": (_dm(70, 16), _C10_DM),
    "Hendrycks2020AugMix_WRN": (_wrn(40, 2), _HALF),
    "Kireev2021Effectiveness_Gauss50percent": (_PRN18_V2, _C10_DM, "last"),
    "Kireev2021Effectiveness_AugMixNoJSD": (_PRN18_V2, _C10_DM, "last"),
    "Kireev2021Effectiveness_RLAT": (_PRN18_V2, _C10_DM, "last"),
    "Kireev2021Effectiveness_RLATAugMixNoJSD": (_PRN18_V2, _C10_DM, "last"),
    "Kireev2021Effectiveness_RLATAugMix": (_PRN18_V2, _C10_DM, "last"),
    "Standard": (_wrn(28, 10), None),
    "Addepalli2021Towards_WRN34": (_wrn(34, 10, True), None),
    "Modas2021PRIMEResNet18": (_R18, _HALF),  # its file's mu/sigma replace the 0.5s
    "Addepalli2022Efficient_WRN_34_10": (_wrn(34, 10), None),
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

_CIFAR100_CORRUPTIONS: dict[str, tuple] = {
    "Gowal2020Uncovering_Linf": (_dm(70, 16), _C100_DM),
    "Gowal2020Uncovering_extra_Linf": (_dm(70, 16), _C100_DM),
    "Hendrycks2020AugMix_WRN": (_wrn(40, 2), _HALF),
    "Addepalli2021Towards_PARN18": (_PRN18_V2, None),
    "Addepalli2021Towards_WRN34": (_wrn(34, 10, True), None),
    "Modas2021PRIMEResNet18": (_R18, _HALF),
    "Addepalli2022Efficient_WRN_34_10": (_wrn(34, 10), None),
}


# ImageNet: name -> ((architecture, kwargs), normalisation or None, preprocessing[, adapter])
def _tv(name: str, **options) -> tuple[str, dict]:
    return "vision", {"library": "torchvision", "network": name, **({"options": options} if options else {})}


def _timm(name: str, stem: str | None = None) -> tuple[str, dict]:
    return "vision", {"library": "timm", "network": name, **({"stem": dict(CONVSTEMS[stem])} if stem else {})}


_SWIN = "timm-swin"  # RobustBench passes these files through timm's Swin checkpoint filter
_R256, _BR256 = "Res256Crop224", "BicubicRes256Crop224"

_IMAGENET_LINF: dict[str, tuple] = {
    "Wong2020Fast": (_tv("resnet50"), _IMAGENET, "Crop288"),
    "Engstrom2019Robustness": (_tv("resnet50"), _IMAGENET, _R256),
    "Salman2020Do_R50": (_tv("resnet50"), _IMAGENET, _R256),
    "Salman2020Do_R18": (_tv("resnet18"), _IMAGENET, _R256),
    "Salman2020Do_50_2": (_tv("wide_resnet50_2"), _IMAGENET, _R256),
    "Singh2023Revisiting_ViT-S-ConvStem": (_timm("deit_small_patch16_224", "vit-s"), _IMAGENET, _BR256),
    "Singh2023Revisiting_ViT-B-ConvStem": (_timm("vit_base_patch16_224", "vit-b"), None, _BR256),
    "Singh2023Revisiting_ConvNeXt-T-ConvStem": (_timm("convnext_tiny", "convnext-t/s"), None, _BR256),
    "Singh2023Revisiting_ConvNeXt-S-ConvStem": (_timm("convnext_small", "convnext-t/s"), None, _BR256),
    "Singh2023Revisiting_ConvNeXt-B-ConvStem": (_timm("convnext_base", "convnext-b"), None, _BR256),
    "Singh2023Revisiting_ConvNeXt-L-ConvStem": (_timm("convnext_large", "convnext-l"), None, _BR256),
    "Liu2023Comprehensive_ConvNeXt-B": (_timm("convnext_base"), _IMAGENET, _BR256),
    "Liu2023Comprehensive_ConvNeXt-L": (_timm("convnext_large"), _IMAGENET, _BR256),
    "Liu2023Comprehensive_Swin-B": (_timm("swin_base_patch4_window7_224"), _IMAGENET, _BR256, _SWIN),
    "Liu2023Comprehensive_Swin-L": (_timm("swin_large_patch4_window7_224"), _IMAGENET, _BR256, _SWIN),
    "Chen2024Data_WRN_50_2": (_tv("resnet50", width_per_group=128), None, _R256),
    "Mo2022When_Swin-B": (_timm("swin_base_patch4_window7_224"), _IMAGENET, "Res224", _SWIN),
    "Mo2022When_ViT-B": (_timm("vit_base_patch16_224"), _IMAGENET, "Res224"),
    "RodriguezMunoz2024Characterizing_Swin-B": (_timm("swin_base_patch4_window7_224"), _IMAGENET, _BR256, _SWIN),
    "RodriguezMunoz2024Characterizing_Swin-L": (_timm("swin_large_patch4_window7_224"), _IMAGENET, _BR256, _SWIN),
}

_IMAGENET_CORRUPTIONS: dict[str, tuple] = {
    **{name: (_tv("resnet50"), _IMAGENET, _R256) for name in (
        "Erichson2022NoisyMix", "Erichson2022NoisyMix_new", "Geirhos2018_SIN", "Geirhos2018_SIN_IN",
        "Geirhos2018_SIN_IN_IN", "Hendrycks2020Many", "Hendrycks2020AugMix")},
    "Salman2020Do_50_2_Linf": (_tv("wide_resnet50_2"), _IMAGENET, _R256),
}

_TABLES = {("cifar10", "Linf"): _CIFAR10_LINF, ("cifar10", "L2"): _CIFAR10_L2,
           ("cifar10", "corruptions"): _CIFAR10_CORRUPTIONS, ("cifar100", "Linf"): _CIFAR100_LINF,
           ("cifar100", "corruptions"): _CIFAR100_CORRUPTIONS, ("imagenet", "Linf"): _IMAGENET_LINF,
           ("imagenet", "corruptions"): _IMAGENET_CORRUPTIONS}


# Every other entry of RobustBench 1.1.1, with the one reason it does not load as a single model.
_MIXTURE = "a mixture, not one model: load it with --mixnet robustbench:{key} (adasmooth's mixing.load_mixture)"
_HUB = "RobustBench loads it from timm's hub (pretrained=True), with no file in the model folder; adasmooth never downloads"
_MEANSPARSE = "MeanSparse's sparsified activations (RobustBench's sparsified_model.py) are not in adasmooth"
_CARD = "CARD's LRR/binary ResNets (RobustBench's CARD_resnet.py) are not in adasmooth"
_REFUSALS: dict[tuple[str, str], dict[str, str]] = {
    ("cifar10", "Linf"): {
        "Chen2020Adversarial": "an ensemble of three ResNet-50s with their own bottleneck (Chen2020AdversarialNet), "
                               "not in adasmooth",
        "Pang2020Boosting": "its WideResNet with normalised features and weights (BoostingWideResNet) is not in adasmooth",
        "Ding2020MMA": "it standardises each image by its own mean and std, which adasmooth's models do not do",
        "Sehwag2021Proxy_ResNest152": "ResNeSt-152 (RobustBench's resnest.py) is not in adasmooth",
        "Huang2021Exploring": "its RobustWideResNet (robust_wide_resnet.py) is not in adasmooth",
        "Huang2021Exploring_ema": "its RobustWideResNet (robust_wide_resnet.py) is not in adasmooth",
        "Dai2021Parameterizing": "its WideResNet with learnt PSSiLU activations (paf_wide_resnet.py) is not in adasmooth",
        "Kang2021Stable": "its neural-ODE layers (sodef_layers.py) are not in adasmooth",
        "Debenedetti2022Light_XCiT-S12": _HUB,
        "Debenedetti2022Light_XCiT-M12": _HUB,
        "Debenedetti2022Light_XCiT-L12": _HUB,
        "Huang2022Revisiting_WRN-A4": "its robust ResNet (robust_resnet.py) is not in adasmooth",
        "Bai2023Improving_edm": _MIXTURE,
        "Bai2024MixedNUTS": _MIXTURE,
        "Amini2024MeanSparse_Ra_WRN_70_16": _MEANSPARSE,
        "Amini2024MeanSparse_S-WRN-94-16": _MEANSPARSE,
    },
    ("cifar10", "L2"): {
        "Ding2020MMA": "it standardises each image by its own mean and std, which adasmooth's models do not do",
        "Amini2024MeanSparse_S-WRN-70-16": _MEANSPARSE,
    },
    ("cifar10", "corruptions"): {
        "Diffenderfer2021Winning_LRR": _CARD,
        "Diffenderfer2021Winning_LRR_CARD_Deck": _CARD,
        "Diffenderfer2021Winning_Binary": _CARD,
        "Diffenderfer2021Winning_Binary_CARD_Deck": _CARD,
        "Hendrycks2020AugMix_ResNeXt": "the CIFAR ResNeXt-29 (RobustBench's resnext.py) is not in adasmooth",
    },
    ("cifar100", "Linf"): {
        "Debenedetti2022Light_XCiT-S12": _HUB,
        "Debenedetti2022Light_XCiT-M12": _HUB,
        "Debenedetti2022Light_XCiT-L12": _HUB,
        "Bai2023Improving_edm": _MIXTURE,
        "Bai2023Improving_trades": _MIXTURE,
        "Bai2024MixedNUTS": _MIXTURE,
        "Amini2024MeanSparse_S-WRN-70-16": _MEANSPARSE,
    },
    ("cifar100", "corruptions"): {
        "Diffenderfer2021Winning_LRR": _CARD,
        "Diffenderfer2021Winning_LRR_CARD_Deck": _CARD,
        "Diffenderfer2021Winning_Binary": _CARD,
        "Diffenderfer2021Winning_Binary_CARD_Deck": _CARD,
        "Hendrycks2020AugMix_ResNeXt": "the CIFAR ResNeXt-29 (RobustBench's resnext.py) is not in adasmooth",
    },
    ("imagenet", "Linf"): {
        "Standard_R50": "its weights are torchvision's own download, not a RobustBench file; use "
                        "torchvision:resnet50@FILE with torchvision's weights file",
        "Debenedetti2022Light_XCiT-S12": _HUB,
        "Debenedetti2022Light_XCiT-M12": _HUB,
        "Debenedetti2022Light_XCiT-L12": _HUB,
        "Peng2023Robust": "its RaWRN-101-2 (robustarch_wide_resnet.py's ConfigurableModel) is not in adasmooth "
                          "(only the CIFAR RaWRN-70-16 is)",
        "Bai2024MixedNUTS": _MIXTURE,
        "Amini2024MeanSparse_ConvNeXt-L": _MEANSPARSE,
        "Amini2024MeanSparse_Swin-L": _MEANSPARSE,
        "Xu2024MIMIR_Swin-B": "MIMIR's own Swin (MIMIR_swin_transformer.py) is not in adasmooth",
        "Xu2024MIMIR_Swin-L": "MIMIR's own Swin (MIMIR_swin_transformer.py) is not in adasmooth",
    },
    ("imagenet", "corruptions"): {
        "Standard_R50": "its weights are torchvision's own download, not a RobustBench file; use "
                        "torchvision:resnet50@FILE with torchvision's weights file",
        "AlexNet": _HUB,
        "Tian2022Deeper_DeiT-S": _HUB,
        "Tian2022Deeper_DeiT-B": _HUB,
    },
}

REFUSED: dict[str, str] = {f"{dataset}/{threat}/{name}": reason.format(key=f"{dataset}/{threat}/{name}")
                           for (dataset, threat), table in _REFUSALS.items() for name, reason in table.items()}


def _build_zoo() -> dict[str, ZooEntry]:
    zoo = {}
    for (dataset, threat), table in _TABLES.items():
        for name, row in table.items():
            (arch, kwargs), norm, *rest = row
            if dataset == "imagenet":
                preprocessing, adapter = rest[0], (rest[1] if len(rest) > 1 else None)
                entry = ZooEntry(dataset, threat, name, arch, dict(kwargs), norm, preprocessing=preprocessing,
                                 adapter=adapter)
            else:
                entry = ZooEntry(dataset, threat, name, arch, dict(kwargs), norm, rest[0] if rest else None)
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
    """The table row for a ``robustbench:`` spec; a one-line ConfigError saying why otherwise."""
    dataset, threat, name = parse_robustbench_spec(spec)
    key = f"{dataset}/{threat}/{name}"
    if key in ZOO:
        return ZOO[key]
    if key in REFUSED:
        raise ConfigError(f"RobustBench entry {key} is not supported: {REFUSED[key]}")
    if dataset not in _CLASSES:
        raise ConfigError(f"RobustBench entry {key}: no data set {dataset!r} in RobustBench 1.1.1 "
                          f"(known: {', '.join(_CLASSES)})")
    if (dataset, threat) not in _TABLES:
        known = sorted({t for d, t in _TABLES if d == dataset})
        raise ConfigError(f"RobustBench entry {key}: RobustBench 1.1.1 has no {threat!r} entries for {dataset} "
                          f"(it has {', '.join(known)})")
    raise ConfigError(f"RobustBench entry {key} is not in RobustBench 1.1.1's {dataset}/{threat} table "
                      f"(names are case-sensitive; the README's model-zoo table lists them)")


def robustbench_file(entry: ZooEntry, model_dir: str | Path | None = None) -> Path:
    return resolve_model_dir(model_dir) / entry.dataset / entry.threat / f"{entry.name}.pt"


def threat_record(dataset: str, threat: str) -> dict[str, Any]:
    """The threat model RobustBench evaluates a ``dataset/threat`` entry under: ``model`` (its folder),
    ``norm`` and ``eps`` (both None for corruptions)."""
    return {"model": threat, "norm": THREATS[threat], "eps": _EPS.get((threat, dataset))}


def robustbench_info(spec: str, model_dir: str | Path | None = None) -> dict[str, Any]:
    """What the entry is, in the shape of a checkpoint sidecar (commands default to it): architecture,
    classes, input shape, data set, normalisation, preprocessing (ImageNet) and the leaderboard's threat model."""
    entry = robustbench_entry(spec)
    mean, std = entry.normalization or ((0.0,) * 3, (1.0,) * 3)
    preprocessing = None
    if entry.preprocessing is not None:
        preprocessing = {"name": entry.preprocessing, **PREPROCESSINGS[entry.preprocessing]}
    return {
        "architecture": entry.architecture,
        "num_classes": entry.num_classes,
        "in_channels": entry.input_shape[0],
        "input_shape": list(entry.input_shape),
        "normalization": {"mean": list(mean), "std": list(std)},
        "model_kwargs": dict(entry.kwargs),
        "dataset": entry.dataset,
        "threat": threat_record(entry.dataset, entry.threat),
        "preprocessing": preprocessing,
        "requires": entry.library,
        "source": f"{PREFIX}{entry.key}",
        "file": str(robustbench_file(entry, model_dir)),
    }


# Where files keep the normalisation of entries that apply it in their own module (or a wrapper's).
_NORMALIZATION_KEYS = (("mu", "sigma"), ("normalize.mean", "normalize.std"))


def _normalization_from_file(state: dict[str, torch.Tensor], path: Path) -> tuple[list, list] | None:
    """``mu``/``sigma`` buffers saved by entries that normalise in their own module (or a
    ``normalize_model`` wrapper's ``normalize.mean``/``.std``), removed from ``state``."""
    for mean_key, std_key in _NORMALIZATION_KEYS:
        found = [k for k in (mean_key, std_key) if k in state]
        if len(found) == 1:
            raise CheckpointError(f"{path} holds {found[0]!r} but not its partner; not a RobustBench file")
        if found:
            return state.pop(mean_key).flatten().tolist(), state.pop(std_key).flatten().tolist()
    return None


def build_entry(entry: ZooEntry, mean=None, std=None) -> nn.Module:
    """The entry's network with fresh weights; the table's normalisation unless ``mean``/``std`` are given."""
    if mean is None and std is None and entry.normalization is not None:
        mean, std = entry.normalization
    return create_model(entry.architecture, entry.num_classes, in_channels=entry.input_shape[0], mean=mean, std=std,
                        input_shape=entry.input_shape, dataset=entry.dataset, **entry.kwargs)


def _layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("normalize.")}


def entries_fitting(state: dict[str, torch.Tensor], exclude: ZooEntry | None = None) -> list[str]:
    """The entries (``dataset/threat/name``) whose architecture has exactly the keys and shapes of
    ``state``; only adasmooth's own architectures are tried (timm/torchvision ones are not imported)."""
    wanted = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("normalize.")}
    fits, tried = [], {}
    for key, entry in ZOO.items():
        if entry.library is not None or key == (exclude.key if exclude else None):
            continue
        variant = (entry.architecture, repr(sorted(entry.kwargs.items())), entry.num_classes)
        if variant not in tried:
            with torch.device("meta"):
                tried[variant] = _layout(build_entry(entry, (0.0,) * 3, (1.0,) * 3)) == wanted
        if tried[variant]:
            fits.append(key)
    return fits


def library_state(state: dict[str, torch.Tensor], model: nn.Module, entry: ZooEntry,
                  source: str) -> dict[str, torch.Tensor]:
    """A RobustBench file's state for a timm/torchvision entry: adapted as RobustBench adapts it, under
    ``model.`` (its files hold the library network's own keys; ours sit in vision.VisionModel's ``model``)."""
    return {f"model.{k}": v for k, v in adapt_library_state(state, model, entry.adapter, source).items()}


def load_robustbench(spec: str, device: str | torch.device = "cpu",
                     model_dir: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a RobustBench entry from its local file; (model in eval mode, info). Never downloads.

    A file that does not fit the entry's architecture is a CheckpointError naming it, the keys, and
    the entries whose architecture it does fit, if any."""
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
    model = build_entry(entry, info["normalization"]["mean"], info["normalization"]["std"])
    if entry.library is not None:
        state = library_state(state, model, entry, spec)
    # The normalisation is not in RobustBench's files: it comes from the table (or mu/sigma above).
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    try:
        load_state_checked(model, state, path)
    except CheckpointError as err:
        fits = entries_fitting(state, exclude=entry) if entry.library is None else []
        if not fits:
            raise
        shown = ", ".join(fits[:3]) + (f" and {len(fits) - 3} more" if len(fits) > 3 else "")
        raise CheckpointError(f"{err}; its keys fit the architecture of {shown} (is it that entry's file?)") from None
    return model.to(device).eval(), info


# ---------------------------------------------------------------------------- the README's zoo table

README_BEGIN = "<!-- robustbench-zoo: generated by adasmooth.models.robustbench.zoo_markdown() -->"
README_END = "<!-- /robustbench-zoo -->"


def _describe(entry: ZooEntry) -> str:
    if entry.library is not None:
        kw = entry.kwargs
        text = f"{entry.library} `{kw['network']}`"
        if "stem" in kw:
            text += " + ConvStem"
        if kw.get("options"):
            text += " (" + ", ".join(f"{k}={v}" for k, v in kw["options"].items()) + ")"
        return text
    flags = ", ".join(k if v is True else f"{k}={v}" for k, v in entry.kwargs.items())
    return f"`{entry.architecture}`" + (f" ({flags})" if flags else "")


def _describe_norm(entry: ZooEntry) -> str:
    if entry.normalization is None:
        return "none"
    return " / ".join("(" + ", ".join(f"{v:.4g}" for v in part) + ")" for part in entry.normalization)


def _radius(eps: float) -> str:
    k = round(eps * 255)
    return f"{k}/255" if abs(eps - k / 255) < 1e-12 else f"{eps:g}"


def zoo_markdown() -> str:
    """The README's model-zoo table: the loading entries grouped by data set, threat, architecture,
    normalisation and preprocessing, then the refused ones grouped by reason."""
    groups: dict[tuple, list[str]] = {}
    for entry in ZOO.values():
        threat = threat_record(entry.dataset, entry.threat)
        radius = f" {_radius(threat['eps'])}" if threat["eps"] else ""
        row = (f"{entry.dataset}/{entry.threat}{radius}", _describe(entry), _describe_norm(entry),
               entry.preprocessing or "-", f"`[vision]` ({entry.library})" if entry.library else "-")
        groups.setdefault(row, []).append(entry.name)
    lines = [README_BEGIN, "",
             f"{len(ZOO)} entries load ({sum(e.library is not None for e in ZOO.values())} of them need "
             f"the `[vision]` extra, installed as \"Set up and run\" says); {len(REFUSED)} are refused, each with its reason.", "",
             "| threat | entries | architecture | normalisation (mean / std) | preprocessing | needs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (threat, arch, norm, prep, needs), names in groups.items():
        lines.append(f"| {threat} | {', '.join(names)} | {arch} | {norm} | {prep} | {needs} |")
    refused: dict[tuple[str, str], list[str]] = {}
    for key, reason in REFUSED.items():
        dataset, threat, name = key.split("/")
        refused.setdefault((f"{dataset}/{threat}", reason), []).append(name)
    lines += ["", "| refused | entries | why |", "| --- | --- | --- |"]
    lines += [f"| {where} | {', '.join(names)} | {reason} |" for (where, reason), names in refused.items()]
    return "\n".join(lines + ["", README_END])
