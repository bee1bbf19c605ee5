"""One way in for every model: ``load_model(spec)``.

A spec is one of

- a path to an adasmooth checkpoint (``runs/std``: ``runs/std.safetensors`` + ``runs/std.json``);
- ``robustbench:<dataset>/<threat>/<name>``: a RobustBench zoo file under the model folder
  (``model_dir``, else ``$ADASMOOTH_MODEL_DIR``, else ``./models``), see :mod:`.robustbench`;
- ``python:package.module:factory``: ``factory()`` must return an ``nn.Module`` taking pixels in [0, 1];
- ``timm:<name>`` / ``torchvision:<name>``: built without pretrained weights (nothing is downloaded),
  with the ImageNet normalisation in front so they take pixels in [0, 1].

The last three take their weights from ``weights=FILE`` or a ``@FILE`` suffix of the spec
(``python:mynets:cnn@runs/cnn.safetensors``): ``.safetensors``, or a ``.pt``/``.pth`` read with
``weights_only=True``; ``module.``/``model.`` prefixes are stripped and the keys must match exactly.

``load_model`` returns (model in eval mode, info). ``info`` has the fields of a checkpoint sidecar
that commands read (``num_classes``, ``dataset``, ``input_shape``, ``threat``, ...; None where the
source does not say), so "the sidecar is the truth" holds for every kind.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..core.config import option
from ..core.errors import CheckpointError, ConfigError, MissingDependencyError
from .base import Normalize, count_classes
from .checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_foreign_state_dict,
    load_state_checked,
    read_sidecar,
    read_weights,
    strip_wrapper_prefixes,
)
from .robustbench import MODEL_DIR_ENV, load_robustbench, robustbench_info

__all__ = ["load_model", "model_info", "spec_kind", "spec_files", "model_dir_option", "SPEC_HELP", "PixelInput"]

KINDS = ("robustbench", "python", "timm", "torchvision")
SPEC_HELP = ("a checkpoint path, robustbench:<dataset>/<threat>/<name>, python:<module>:<factory>[@WEIGHTS], "
             "timm:<name>[@WEIGHTS] or torchvision:<name>[@WEIGHTS]")
# timm and torchvision models expect ImageNet-normalised inputs; adasmooth models take pixels in [0, 1].
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def model_dir_option() -> Any:
    return option(None, help=f"folder of RobustBench model files (robustbench: specs); "
                             f"default ${MODEL_DIR_ENV}, else ./models")


def spec_kind(spec: str) -> str:
    """``checkpoint``, or the prefix of a spec (``robustbench``, ``python``, ``timm``, ``torchvision``)."""
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise ConfigError(f"model spec must be a non-empty string, got {spec!r}")
    head, sep, _ = str(spec).partition(":")
    if sep and head in KINDS:
        return head
    # "hf:..." or "robustbnech:..." is a typo'd kind, not a checkpoint called that.
    if sep and head.isalpha() and len(head) > 1 and not Path(str(spec)).exists():
        raise ConfigError(f"model spec {spec!r}: unknown kind {head!r}; give {SPEC_HELP}")
    return "checkpoint"


def _split_weights(spec: str, weights: str | Path | None) -> tuple[str, Path | None]:
    body, sep, suffix = spec.partition("@")
    if sep and weights is not None:
        raise ConfigError(f"model spec {spec!r} names weights after '@' and weights= is given too; give one")
    chosen = suffix if sep else weights
    if sep and not suffix:
        raise ConfigError(f"model spec {spec!r}: nothing after '@' (expected a weights file)")
    return body, Path(chosen) if chosen is not None else None


@contextmanager
def _cwd_importable() -> Iterator[None]:
    """The working directory on ``sys.path`` for one import: the console script does not put it there."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _python_model(spec: str, body: str) -> nn.Module:
    module_name, sep, attr = body.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model spec {spec!r}: expected python:<package.module>:<factory>")
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model spec {spec!r}: cannot import {module_name} ({_first_line(err)})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model spec {spec!r}: {module_name} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _optional_import(package: str, spec: str):
    try:
        return importlib.import_module(package)
    except Exception as err:  # a broken install raises more than ImportError (e.g. missing compiled ops)
        raise MissingDependencyError(
            f"model spec {spec!r} needs {package}, which does not import here ({_first_line(err)}); "
            f"install it (pip install 'adasmooth[vision]') or use a checkpoint, robustbench: or python: spec"
        ) from None


class PixelInput(nn.Module):
    """A model that expects normalised inputs, made to take pixels in [0, 1] like every adasmooth model."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(list(mean), list(std))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def _library_model(kind: str, spec: str, name: str) -> nn.Module:
    if not name:
        raise ConfigError(f"model spec {spec!r}: expected {kind}:<model name>")
    if kind == "timm":
        timm = _optional_import("timm", spec)
        model = timm.create_model(name, pretrained=False)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return PixelInput(model, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    models = _optional_import("torchvision.models", spec)
    return PixelInput(models.get_model(name, weights=None), IMAGENET_MEAN, IMAGENET_STD)


def _load_weights_into(model: nn.Module, path: Path) -> None:
    """Weights from ``path`` into ``model`` with a strict key check; a ``PixelInput`` takes them for its inner model."""
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights file {path} not found")
        state = strip_wrapper_prefixes(read_weights(path))
    else:
        state = load_foreign_state_dict(path, containers=("state_dict", "model_state_dict"))
    target = model.model if isinstance(model, PixelInput) else model
    load_state_checked(target, state, path)


def _class_count(model: nn.Module) -> int | None:
    """The spec's class count, else a ``num_classes`` attribute, else the last Linear layer's outputs."""
    known = count_classes(model) or getattr(model, "num_classes", None)
    if isinstance(known, int):
        return known
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _module_info(model: nn.Module, spec: str, body: str, weights: Path | None) -> dict[str, Any]:
    model_spec = getattr(model, "spec", None)
    return {
        "architecture": body,
        "num_classes": _class_count(model),
        "input_shape": list(model_spec.input_shape) if model_spec and model_spec.input_shape else None,
        "dataset": model_spec.dataset if model_spec else None,
        "source": spec,
        "weights": str(weights) if weights is not None else None,
    }


def load_model(spec: str | Path, device: str | torch.device = "cpu", *, model_dir: str | Path | None = None,
               weights: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model a spec names, in eval mode on ``device``, and its info (see the module docstring)."""
    spec = str(spec)
    kind = spec_kind(spec)
    if kind in ("checkpoint", "robustbench") and (weights is not None or (kind == "robustbench" and "@" in spec)):
        raise ConfigError(f"model spec {spec!r}: weights apply only to python:, timm: and torchvision: specs")
    if kind == "checkpoint":
        if Path(spec).suffix in (".pt", ".pth", ".bin", ".ckpt"):
            raise ConfigError(f"{spec} is a bare weights file, not an adasmooth checkpoint; give "
                              f"python:<module>:<factory>@{spec}, or robustbench:<dataset>/<threat>/<name>")
        return load_checkpoint(spec, device)
    if kind == "robustbench":
        return load_robustbench(spec, device, model_dir)
    body, weights_path = _split_weights(spec[len(kind) + 1:], weights)
    model = _python_model(spec, body) if kind == "python" else _library_model(kind, spec, body)
    if weights_path is not None:
        _load_weights_into(model, weights_path)
    return model.to(device).eval(), _module_info(model, spec, body, weights_path)


def model_info(spec: str | Path, *, model_dir: str | Path | None = None) -> dict[str, Any]:
    """What a spec's model records, without loading its weights where that is possible (checkpoint
    sidecars, the RobustBench table); python:/timm:/torchvision: specs are built to find out."""
    spec = str(spec)
    kind = spec_kind(spec)
    if kind == "checkpoint":
        return read_sidecar(spec)
    if kind == "robustbench":
        return robustbench_info(spec, model_dir)
    return load_model(spec, model_dir=model_dir)[1]


def spec_files(spec: str | Path, *, model_dir: str | Path | None = None) -> list[Path]:
    """The files a spec reads (so that no output of a run overwrites them)."""
    spec = str(spec)
    kind = spec_kind(spec)
    if kind == "checkpoint":
        return list(checkpoint_paths(spec))
    if kind == "robustbench":
        return [Path(robustbench_info(spec, model_dir)["file"])]
    _, weights = _split_weights(spec[len(kind) + 1:], None)
    return [weights] if weights is not None else []

