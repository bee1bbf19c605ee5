"""RobustBench's own code, loaded by file path for the cross-checks (``import robustbench`` needs torchvision,
which does not import here).

The architecture files that the supported entries use (``dm_wide_resnet.py``, ``wide_resnet.py``,
``resnet.py``, ``robustarch_wide_resnet.py``, ``utils_architectures.py``, ``convstem_models.py``) and
the enums load as they are. The model-zoo tables ``cifar10.py`` / ``cifar100.py`` / ``imagenet.py``
import many other architecture files and timm/torchvision at module level; the other architecture
files are satisfied by stand-in modules whose attributes are empty ``nn.Module`` classes (the
entries checked never build them). timm and torchvision are the real libraries when both import
(the ``[vision]`` extra), else :func:`stand_in_timm` / :func:`stand_in_torchvision`: small networks
whose layout depends on the model name and options asked for, with the attributes RobustBench's
files touch (a ConvNeXt's ``stem``, a ViT's ``patch_embed.proj``), and torchvision's documented
squeeze-excitation. Everything is registered in ``sys.modules`` only inside :func:`peer_modules`
and removed afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

REAL_ARCHITECTURES = ("dm_wide_resnet", "wide_resnet", "resnet", "utils_architectures", "robustarch_wide_resnet",
                      "convstem_models")
ZOO_TABLES = {"cifar10": {"Linf": "linf", "L2": "l2", "corruptions": "common_corruptions"},
              "cifar100": {"Linf": "linf", "corruptions": "common_corruptions"},
              "imagenet": {"Linf": "linf", "corruptions": "common_corruptions"}}


def robustbench_root() -> Path:
    """The installed robustbench package folder; skips the test when robustbench==1.1.1 is not installed."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("robustbench is not installed (pip install robustbench==1.1.1 --no-deps; .ci/run does)")
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "model_zoo" / "architectures" / "dm_wide_resnet.py").is_file():
        pytest.skip(f"robustbench at {root} lacks its model_zoo architecture files")
    return root


class _StandIn(types.ModuleType):
    """A module any attribute of which is an empty nn.Module subclass (only to satisfy imports)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (nn.Module,), {})


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


# ---------------------------------------------------------------------------- timm / torchvision stand-ins

# Output width of each stand-in network by name: RobustBench's ConvStems must fit the ConvNeXt/ViT they replace.
_WIDTHS = {"convnext_tiny": 96, "convnext_small": 96, "convnext_base": 128, "convnext_large": 192,
           "deit_small_patch16_224": 384, "vit_base_patch16_224": 768}


class StandInNet(nn.Module):
    """A small network for a library model ``name``: a strided stem (``stem``, or ``patch_embed.proj``
    for ViTs), a hidden 1x1 layer whose width depends on the name and options (so a wrong name or option
    shows as a key-shape mismatch), global pooling and a linear head."""

    def __init__(self, name: str, num_classes: int = 1000, **options):
        super().__init__()
        width = _WIDTHS.get(name, 8)
        hidden = 3 + sum(map(ord, name)) % 7 + int(options.get("width_per_group", 64)) // 32
        stem = nn.Conv2d(3, width, 4, 4)
        if name.startswith(("vit", "deit")):
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, width, 16, 16)
        else:
            self.stem = stem
        self.mix = nn.Conv2d(width, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x) if hasattr(self, "patch_embed") else self.stem(x)
        x = torch.relu(self.bn(self.mix(x)))
        return self.head(x.mean(dim=(2, 3)))


def stand_in_timm() -> types.ModuleType:
    """``timm`` with ``create_model`` and the constructors ``convstem_models.py`` calls."""
    timm = types.ModuleType("timm")
    timm.create_model = lambda name, pretrained=False, **kw: StandInNet(name, **kw)
    models = types.ModuleType("timm.models")
    models.create_model = timm.create_model
    convnext = types.ModuleType("timm.models.convnext")
    convnext.convnext_tiny = lambda pretrained=False, **kw: StandInNet("convnext_tiny", **kw)
    convnext.convnext_small = lambda pretrained=False, **kw: StandInNet("convnext_small", **kw)
    convnext._create_convnext = lambda variant, pretrained=False, **kw: StandInNet(
        variant.split(".")[0], **{k: v for k, v in kw.items() if k not in ("depths", "dims")})
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.vit_base_patch16_224 = lambda pretrained=False, **kw: StandInNet("vit_base_patch16_224", **kw)
    models.convnext, models.vision_transformer = convnext, vit
    models.convnext_large = lambda pretrained=False, **kw: StandInNet("convnext_large", **kw)
    timm.models = models
    return timm


class TorchvisionSE(nn.Module):
    """torchvision.ops.SqueezeExcitation(input_channels, squeeze_channels, activation), as documented:
    x * sigmoid(fc2(act(fc1(avgpool(x)))))."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()

    def forward(self, x):
        return x * self.fc2(self.activation(self.fc1(self.avgpool(x)))).sigmoid()


def stand_in_torchvision() -> types.ModuleType:
    """``torchvision`` with the ResNets RobustBench's ImageNet table builds and ``ops.misc.SqueezeExcitation``."""
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    for name in ("resnet18", "resnet50", "wide_resnet50_2"):
        setattr(models, name, lambda pretrained=False, weights=None, _n=name, **kw: StandInNet(_n, **kw))
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")
    misc.SqueezeExcitation, misc.Conv2dNormActivation = TorchvisionSE, None
    tv.models, tv.ops, ops.misc = models, ops, misc
    return tv


def _register_tree(module: types.ModuleType) -> None:
    """``module`` and its module attributes (recursively) in ``sys.modules`` under their names."""
    sys.modules[module.__name__] = module
    for value in vars(module).values():
        if isinstance(value, types.ModuleType) and value.__name__.startswith(module.__name__ + "."):
            _register_tree(value)


def real_libraries() -> bool:
    """Whether the real timm and torchvision import here (then the peer uses them)."""
    try:
        import timm  # noqa: F401
        import torchvision.models  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises more than ImportError
        return False
    return True


@contextmanager
def peer_modules():
    """A namespace with RobustBench's architecture modules and its model-zoo tables: ``tables[(dataset,
    threat)]`` (``zoo[dataset]``: the Linf ones of CIFAR), ``real_libraries``: whether timm/torchvision are real."""
    root = robustbench_root()
    arch_dir = root / "model_zoo" / "architectures"
    real = real_libraries()
    before = dict(sys.modules)
    try:
        if not real:
            _register_tree(stand_in_timm())
            _register_tree(stand_in_torchvision())
        _package("robustbench", root)
        _package("robustbench.model_zoo", root / "model_zoo")
        _package("robustbench.model_zoo.architectures", arch_dir)
        _load("robustbench.model_zoo.enums", root / "model_zoo" / "enums.py")
        peers = {name: _load(f"robustbench.model_zoo.architectures.{name}", arch_dir / f"{name}.py")
                 for name in REAL_ARCHITECTURES}
        for path in arch_dir.glob("*.py"):
            name = f"robustbench.model_zoo.architectures.{path.stem}"
            if path.stem not in REAL_ARCHITECTURES and path.stem != "__init__":
                sys.modules[name] = _StandIn(name)
                setattr(sys.modules["robustbench.model_zoo.architectures"], path.stem, sys.modules[name])
        zoo = {ds: _load(f"robustbench.model_zoo.{ds}", root / "model_zoo" / f"{ds}.py") for ds in ZOO_TABLES}
        tables = {(ds, threat): getattr(zoo[ds], attr) for ds, threats in ZOO_TABLES.items()
                  for threat, attr in threats.items()}
        yield types.SimpleNamespace(**peers, modules=zoo, tables=tables, real_libraries=real,
                                    zoo={"cifar10": zoo["cifar10"].linf, "cifar100": zoo["cifar100"].linf})
    finally:
        # only what was registered here: dropping modules torch imported meanwhile would make it register them twice
        for name in set(sys.modules) - set(before):
            if name.split(".")[0] in ("robustbench", "timm", "torchvision"):
                del sys.modules[name]
        sys.modules.update({k: v for k, v in before.items() if k.split(".")[0] in ("robustbench", "timm", "torchvision")})


def stand_in_packages(monkeypatch, root: Path) -> set[str]:
    """Register RobustBench's package folders as plain packages (their ``__init__`` imports torchvision)
    and a stand-in ``timm``; returns the module names present before, for :func:`forget_peer_modules`."""
    before = set(sys.modules)
    for name, folder in (("robustbench", root), ("robustbench.model_zoo", root / "model_zoo"),
                         ("robustbench.model_zoo.architectures", root / "model_zoo" / "architectures")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        monkeypatch.setitem(sys.modules, name, pkg)
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    return before


def forget_peer_modules(before: set[str]) -> None:
    """Drop the RobustBench modules imported since ``before``, so the next test loads them afresh."""
    for name in set(sys.modules) - before:
        if name.startswith("robustbench"):
            del sys.modules[name]


def randomize_normalisation(module: nn.Module, gen) -> None:
    """Non-trivial normalisation statistics and affine terms, so a swapped or skipped one shows."""
    import torch

    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            m.weight.data = 1 + 0.2 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=gen)
            m.running_var = 1 + 0.3 * torch.rand(m.running_var.shape, generator=gen)
