"""RobustBench's own code, loaded by file path for the cross-checks (``import robustbench`` needs torchvision,
which does not import here).

The architecture files that the supported entries use (``dm_wide_resnet.py``, ``wide_resnet.py``,
``resnet.py``) and the enums load as they are. The model-zoo tables ``cifar10.py`` / ``cifar100.py``
import many other architecture files and timm at module level; those imports are satisfied by
stand-in modules whose attributes are empty ``nn.Module`` classes, which is enough because the
entries checked here never build them. Everything is registered in ``sys.modules`` only inside
:func:`peer_modules` and removed afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch import nn

REAL_ARCHITECTURES = ("dm_wide_resnet", "wide_resnet", "resnet")


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


@contextmanager
def peer_modules():
    """A namespace with RobustBench's architecture modules and its cifar10/cifar100 model-zoo tables."""
    root = robustbench_root()
    arch_dir = root / "model_zoo" / "architectures"
    before = dict(sys.modules)
    try:
        _package("robustbench", root)
        _package("robustbench.model_zoo", root / "model_zoo")
        _package("robustbench.model_zoo.architectures", arch_dir)
        sys.modules["timm"] = _StandIn("timm")
        _load("robustbench.model_zoo.enums", root / "model_zoo" / "enums.py")
        peers = {name: _load(f"robustbench.model_zoo.architectures.{name}", arch_dir / f"{name}.py")
                 for name in REAL_ARCHITECTURES}
        for path in arch_dir.glob("*.py"):
            name = f"robustbench.model_zoo.architectures.{path.stem}"
            if path.stem not in REAL_ARCHITECTURES and path.stem != "__init__":
                sys.modules[name] = _StandIn(name)
                setattr(sys.modules["robustbench.model_zoo.architectures"], path.stem, sys.modules[name])
        zoo = {ds: _load(f"robustbench.model_zoo.{ds}", root / "model_zoo" / f"{ds}.py") for ds in ("cifar10", "cifar100")}
        yield types.SimpleNamespace(**peers, modules=zoo,
                                    zoo={"cifar10": zoo["cifar10"].linf, "cifar100": zoo["cifar100"].linf})
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


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
