"""One way in for every model: ``load_model(spec)``.

A spec is one of

- a path to an adasmooth checkpoint (``runs/std``: ``runs/std.safetensors`` + ``runs/std.json``);
- ``robustbench:<dataset>/<threat>/<name>``: a RobustBench zoo file under the model folder
  (``model_dir``, else ``$ADASMOOTH_MODEL_DIR``, else ``./models``), see :mod:`.robustbench`;
- ``python:package.module:factory``: ``factory()`` must return an ``nn.Module`` taking pixels in [0, 1];
- ``timm:<name>`` / ``torchvision:<name>``: built without pretrained weights (nothing is downloaded),
  with the ImageNet normalisation in front so they take pixels in [0, 1].

The last three take constructor options after ``?``, query-string style, and their weights from
``weights=FILE`` or a ``@FILE`` suffix, in that order: ``timm:resnet18?num_classes=10&drop_rate=0.1@w.pt``.
Option values are typed: ``true``/``false`` are booleans, then integers, then floats, else strings.
Weights are ``.safetensors``, or a ``.pt``/``.pth`` read with ``weights_only=True``;
``module.``/``model.`` prefixes are stripped and the keys must match exactly. Where the options do
not set ``num_classes``, a timm or torchvision model (or a factory taking ``num_classes``) gets the
class count of the weights' classifier head. Every failure to build a model is one ConfigError line.

timm and torchvision models list their stages in ``stage_names`` (module paths below the wrapper,
``model.layer1``), so the mixing network has default taps (:func:`adasmooth.models.default_taps`
takes the second and third names): for timm, the modules of ``feature_info`` at a reduction of 4 or
more, after the module before them; for torchvision, each family's stages (``layer1``.. of the
ResNets, ``trunk_output.block1``.. of RegNets, ``features.denseblock1``.. of DenseNets, ``stage2``..
of ShuffleNets), and for models built on a ``features`` sequence (VGG, EfficientNet, MobileNet,
ConvNeXt, ...) the last element at each reduction of 4 or more, measured on a 64x64 input. So the
default taps end at reductions 4 and 8 where the model has those, like the reference ResNet's
layer1 and layer2.

``load_model`` returns (model in eval mode, info). ``info`` has the fields of a checkpoint sidecar
that commands read (``num_classes``, ``dataset``, ``input_shape``, ``threat``, ...; None where the
source does not say), so "the sidecar is the truth" holds for every kind.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
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
SPEC_HELP = ("a checkpoint path, robustbench:<dataset>/<threat>/<name>, python:<module>:<factory>[?OPTIONS][@WEIGHTS], "
             "timm:<name>[?OPTIONS][@WEIGHTS] or torchvision:<name>[?OPTIONS][@WEIGHTS] (OPTIONS: "
             "name=value&..., e.g. num_classes=10)")
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


def _typed(text: str) -> bool | int | float | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_options(spec: str, body: str) -> tuple[str, dict[str, Any]]:
    """``name?key=value&key=value`` -> (name, typed options); see the module docstring."""
    name, sep, query = body.partition("?")
    options: dict[str, Any] = {}
    if not sep:
        return name, options
    if not query:
        raise ConfigError(f"model spec {spec!r}: nothing after '?' (expected name=value options)")
    for item in query.split("&"):
        key, eq, text = item.partition("=")
        if not eq or not key.isidentifier():
            raise ConfigError(f"model spec {spec!r}: option {item!r} is not name=value")
        if key in options:
            raise ConfigError(f"model spec {spec!r}: option {key!r} is given twice")
        options[key] = _typed(text)
    return name, options


def _build(spec: str, what: str, factory, options: dict[str, Any]) -> Any:
    """``factory(**options)``; whatever it raises becomes one ConfigError line naming the spec."""
    try:
        return factory(**options)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as err:
        given = f" with {options}" if options else ""
        raise ConfigError(f"model spec {spec!r}: {what}{given} failed ({type(err).__name__}: {_first_line(err)})") from None


def _python_factory(spec: str, name: str):
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model spec {spec!r}: expected python:<package.module>:<factory>")
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as err:  # a syntax error or whatever the module raises while it runs
        detail = _first_line(err) if isinstance(err, ImportError) else f"{type(err).__name__}: {_first_line(err)}"
        raise ConfigError(f"model spec {spec!r}: cannot import {module_name} ({detail})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model spec {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _python_model(spec: str, name: str, options: dict[str, Any]) -> nn.Module:
    attr = name.rpartition(":")[2]
    model = _build(spec, f"{attr}()", _python_factory(spec, name), options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _takes_num_classes(kind: str, spec: str, name: str) -> bool:
    if kind != "python":
        return True
    try:
        return "num_classes" in inspect.signature(_python_factory(spec, name)).parameters
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        return False


def _optional_import(package: str, spec: str):
    try:
        return importlib.import_module(package)
    except Exception as err:  # a broken install raises more than ImportError (e.g. missing compiled ops)
        raise MissingDependencyError(
            f"model spec {spec!r} needs {package}, which does not import here ({_first_line(err)}); "
            f"install it (pip install 'adasmooth[vision]') or use a checkpoint, robustbench: or python: spec"
        ) from None


class PixelInput(nn.Module):
    """A model that expects normalised inputs, made to take pixels in [0, 1] like every adasmooth model.

    ``stage_names``: the inner model's stages as module paths of this wrapper (``model.layer1``), or
    empty where the loader knows none."""

    def __init__(self, model: nn.Module, mean, std, stage_names: tuple[str, ...] = ()):
        super().__init__()
        self.normalize = Normalize(list(mean), list(std))
        self.model = model
        # "" (nothing before the first stage) is the normalisation in front of it
        self.stage_names = tuple(f"model.{name}" if name else "normalize" for name in stage_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def timm_stages(model: nn.Module) -> tuple[str, ...]:
    """timm's ``feature_info`` modules at a reduction of 4 or more, after the module before them
    (``""``: none); the last two entries where fewer reach 4 (see the module docstring)."""
    info = getattr(model, "feature_info", None)
    entries = [e for e in (getattr(info, "info", info) or []) if isinstance(e, dict) and e.get("module")]
    modules = dict(model.named_modules())
    entries = [e for e in entries if e["module"] in modules]
    if len(entries) < 2:
        return ()
    first = next((i for i, e in enumerate(entries) if (e.get("reduction") or 0) >= 4), len(entries))
    first = min(first, len(entries) - 2)
    before = entries[first - 1]["module"] if first > 0 else ""
    return (before, *(e["module"] for e in entries[first:]))


# torchvision families by their module paths: (the module before the stages, the stages)
TORCHVISION_STAGES = (
    ("maxpool", ("layer1", "layer2", "layer3", "layer4")),  # ResNet, ResNeXt, Wide ResNet
    ("stem", ("trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4")),  # RegNet
    ("features.pool0", ("features.denseblock1", "features.denseblock2", "features.denseblock3",
                        "features.denseblock4")),  # DenseNet
    ("maxpool", ("stage2", "stage3", "stage4")),  # ShuffleNet v2
)
STAGE_PROBE_SIZE = 64  # pixels of the square input on which the reductions of a ``features`` sequence are measured


def _sequence_stages(model: nn.Module, features: nn.Sequential) -> tuple[str, ...]:
    """The last element of ``features`` at each reduction of 4 or more (and the one before the first)."""
    sizes: dict[int, int] = {}
    hooks = [child.register_forward_hook(lambda _m, _i, out, i=i: sizes.__setitem__(i, out.shape[-1]))
             for i, child in enumerate(features)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, STAGE_PROBE_SIZE, STAGE_PROBE_SIZE))
    except Exception:  # a model that needs another input size: no default stages
        return ()
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    reductions = {i: STAGE_PROBE_SIZE // max(size, 1) for i, size in sizes.items()}
    last_at: dict[int, int] = {}
    for i in sorted(reductions):
        last_at[reductions[i]] = i
    stages = [last_at[r] for r in sorted(last_at) if r >= 4]
    if len(stages) < 2:
        return ()
    before = f"features.{stages[0] - 1}" if stages[0] > 0 else ""
    return (before, *(f"features.{i}" for i in stages))


def torchvision_stages(model: nn.Module) -> tuple[str, ...]:
    """The stages of a torchvision model (see the module docstring), or () where none are known."""
    modules = dict(model.named_modules())
    for stem, stages in TORCHVISION_STAGES:
        if stem in modules and all(s in modules for s in stages):
            return (stem, *stages)
    features = getattr(model, "features", None)
    return _sequence_stages(model, features) if isinstance(features, nn.Sequential) else ()


def _closest(name: str, known: list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _library_model(kind: str, spec: str, name: str, options: dict[str, Any]) -> nn.Module:
    if not name:
        raise ConfigError(f"model spec {spec!r}: expected {kind}:<model name>")
    if kind == "timm":
        timm = _optional_import("timm", spec)
        known = list(timm.list_models()) if hasattr(timm, "list_models") else None
        if known is not None and name.split(".")[0] not in known:  # "resnet18.a1_in1k": a name and a weights tag
            raise ConfigError(f"model spec {spec!r}: timm has no model {name!r}{_closest(name, known)}")
        model = _build(spec, f"timm.create_model({name!r})",
                       lambda **kw: timm.create_model(name, pretrained=False, **kw), options)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return PixelInput(model, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), timm_stages(model))
    models = _optional_import("torchvision.models", spec)
    known = list(models.list_models()) if hasattr(models, "list_models") else None
    if known is not None and name not in known:
        raise ConfigError(f"model spec {spec!r}: torchvision has no model {name!r}{_closest(name, known)}")
    model = _build(spec, f"torchvision.models.get_model({name!r})",
                   lambda **kw: models.get_model(name, weights=None, **kw), options)
    return PixelInput(model, IMAGENET_MEAN, IMAGENET_STD, torchvision_stages(model))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights file {path} not found")
        return strip_wrapper_prefixes(read_weights(path))
    return load_foreign_state_dict(path, containers=("state_dict", "model_state_dict"))


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, PixelInput) else model


def _head_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The class count of the weights: rows of the classifier head's weight (timm's ``get_classifier()``,
    else the last Linear layer) in ``state``; None where the head is not found there."""
    inner = _inner(model)
    head = inner.get_classifier() if hasattr(inner, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    name = next((n for n, m in inner.named_modules() if m is head), None) if head is not None else None
    weight = state.get(f"{name}.weight") if name else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _class_count(model: nn.Module) -> int | None:
    """The spec's class count, else a ``num_classes`` attribute, else the last Linear layer's outputs."""
    known = count_classes(model) or getattr(_inner(model), "num_classes", None)
    if isinstance(known, int):
        return known
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _module_info(model: nn.Module, spec: str, name: str, options: dict[str, Any],
                 weights: Path | None) -> dict[str, Any]:
    model_spec = getattr(model, "spec", None)
    return {
        "architecture": name,
        "options": options,
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
    name, options = split_options(spec, body)

    def build(opts: dict[str, Any]) -> nn.Module:
        return _python_model(spec, name, opts) if kind == "python" else _library_model(kind, spec, name, opts)

    model = build(options)
    if weights_path is not None:
        state = _read_state(weights_path)
        classes = _head_classes(model, state) if "num_classes" not in options else None
        if classes is not None and classes != _class_count(model) and _takes_num_classes(kind, spec, name):
            options = {**options, "num_classes": classes}
            model = build(options)
        load_state_checked(_inner(model), state, weights_path)
    return model.to(device).eval(), _module_info(model, spec, name, options, weights_path)


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

