"""Checkpoints: safetensors weights plus a JSON sidecar that says how to rebuild and what was measured.

``save_checkpoint(model, "runs/std")`` writes ``runs/std.safetensors`` and ``runs/std.json``.
Loading never unpickles code: weights come from safetensors, or from a foreign ``.pt`` file via
``torch.load(weights_only=True)``. Every way a checkpoint can be unusable (missing, truncated,
not JSON, a field missing, an unknown architecture, weights that do not fit) is one
CheckpointError line naming the file.

The sidecar is the truth about a model: :func:`sidecar_defaults` gives commands the data set,
input shape and threat model to default to, and :func:`check_data_matches` refuses data the model
was not trained on.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parameter import is_lazy

from ..core.errors import CheckpointError, ConfigError
from ..core.io import atomic_write, provenance, write_json
from ..data import DATASETS, dataset_info
from .base import ModelSpec, create_model

_log = logging.getLogger(__name__)

__all__ = [
    "recorded_dataset",
    "load_checkpoint_data",
    "check_input_shape",
    "recorded_threat",
    "save_checkpoint",
    "load_checkpoint",
    "read_sidecar",
    "read_weights",
    "write_weights_and_sidecar",
    "load_state_checked",
    "load_foreign_state_dict",
    "strip_wrapper_prefixes",
    "checkpoint_paths",
    "check_data_matches",
    "sidecar_defaults",
    "trained_input_shape",
]

FORMAT_VERSION = 1
_REQUIRED_FIELDS = ("architecture", "num_classes", "in_channels", "normalization")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a path given with or without an extension."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


# ---------------------------------------------------------------------------- files


def write_weights_and_sidecar(path: str | Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write ``state`` as safetensors and ``info`` as the JSON sidecar, each atomically; the weights path."""
    weights, sidecar = checkpoint_paths(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    write_json(sidecar, info)
    return weights


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of the checkpoint at ``path`` as a dict; CheckpointError if missing or not a JSON object."""
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint sidecar {sidecar} not found")
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint sidecar {sidecar} is not JSON ({_first_line(err)})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"checkpoint sidecar {sidecar} holds a JSON {type(info).__name__}, not an object")
    return info


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint's safetensors file; CheckpointError if missing, truncated or corrupt."""
    weights, _ = checkpoint_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found")
    try:
        return load_file(str(weights), device=str(device))
    except Exception as err:  # safetensors raises its own error type (and OSError) for damaged files
        raise CheckpointError(
            f"checkpoint weights {weights} are truncated or not a safetensors file ({_first_line(err)})"
        ) from None


def _name_some(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state, strict=True)``, with one CheckpointError line naming ``source``
    and the keys that are missing, unexpected or of another shape instead of torch's multi-line error.

    Lazy parameters have no shape yet; torch sizes them from ``state`` while loading.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and not is_lazy(v) and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_name_some(unexpected)}")
    if reshaped:
        problems.append(f"shape mismatch {_name_some(reshaped, 2)}")
    if problems:
        raise CheckpointError(f"weights in {source} do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------- base-model checkpoints


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write weights and sidecar, each atomically. Returns the weights path.

    The sidecar records the spec (architecture, classes, channels, normalisation, kwargs, input
    shape, data set when the spec knows it) and then ``metadata`` (``dataset``, ``training``,
    ``metrics``, ...), which wins where both name the same field.
    """
    spec: ModelSpec | None = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("model has no .spec; build it with adasmooth.models.create_model")
    info = {
        "format_version": FORMAT_VERSION,
        "architecture": spec.name,
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
        "normalization": {"mean": spec.mean, "std": spec.std},
        "model_kwargs": spec.kwargs,
        "input_shape": list(spec.input_shape) if spec.input_shape is not None else None,
        **({"dataset": spec.dataset} if spec.dataset is not None else {}),
        **(metadata or {}),
        "provenance": provenance(),
    }
    return write_weights_and_sidecar(path, model.state_dict(), info)


def _model_from_sidecar(info: dict[str, Any], sidecar: Path) -> nn.Module:
    if info.get("kind") == "adaptive-mixed-classifier":
        raise CheckpointError(f"{sidecar} is an adaptive mixed classifier; load it with load_adaptive_classifier")
    missing = [f for f in _REQUIRED_FIELDS if f not in info]
    if missing:
        raise CheckpointError(f"checkpoint sidecar {sidecar} lacks the field(s) {', '.join(missing)}")
    norm, kwargs, shape = info["normalization"], info.get("model_kwargs") or {}, info.get("input_shape")
    if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
        raise CheckpointError(f"checkpoint sidecar {sidecar}: 'normalization' must hold 'mean' and 'std'")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"checkpoint sidecar {sidecar}: 'model_kwargs' must be an object")
    try:
        return create_model(
            str(info["architecture"]),
            num_classes=int(info["num_classes"]),
            in_channels=int(info["in_channels"]),
            mean=norm["mean"],
            std=norm["std"],
            input_shape=shape,
            dataset=info.get("dataset"),
            **kwargs,
        )
    except ConfigError as err:
        raise CheckpointError(f"checkpoint sidecar {sidecar}: {err}") from None
    except (TypeError, ValueError) as err:  # ill-typed fields, or kwargs the architecture does not take
        raise CheckpointError(f"checkpoint sidecar {sidecar} does not describe a model: {_first_line(err)}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the sidecar, load its weights, return (model in eval mode, sidecar)."""
    weights, sidecar = checkpoint_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found")
    info = read_sidecar(path)
    model = _model_from_sidecar(info, sidecar)
    load_state_checked(model, read_weights(path, device), weights)
    return model.to(device).eval(), info


# ---------------------------------------------------------------------------- foreign files


def _refused_global(err: BaseException) -> str:
    """The global torch's safe unpickler refused, e.g. ``posix.system`` (empty when it names none)."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f" (it references {match.group(1)})" if match else ""


def load_foreign_state_dict(
    path: str | Path, containers: Sequence[str] = ("state_dict", "model_state_dict", "model")
) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth`` file, without running pickled code.

    Strips the ``module.`` and ``model.`` prefixes that DataParallel and wrappers add, and unwraps
    the ``containers`` (``{"state_dict": ...}``, ``{"model": ...}``), in that order.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises loading with weights_only=False, which would run the code.
        raise CheckpointError(
            f"{path} holds pickled code or is not a state dict{_refused_global(err)}; it was not loaded"
        ) from None
    except Exception as err:  # torch raises many types for truncated or foreign files
        detail = "" if "weights_only" in str(err) else f" ({_first_line(err)})"
        raise CheckpointError(f"{path} cannot be read as a torch state dict{detail}") from None
    for key in containers:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds no state dict (a {type(obj).__name__})")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path} holds no state dict: the values of {_name_some(not_tensors)} are not tensors")
    return strip_wrapper_prefixes(obj)


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``module.`` (DataParallel) and then ``model.`` (wrapper) prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ---------------------------------------------------------------------------- sidecars are the truth


def _shape(value: Sequence[int] | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if value is not None else None


def trained_input_shape(info: dict[str, Any]) -> tuple[int, ...] | None:
    """The (C, H, W) a checkpoint was trained on: recorded in the sidecar, else its data set's."""
    if info.get("input_shape"):
        return _shape(info["input_shape"])
    dataset = info.get("dataset")
    if dataset in DATASETS:
        return dataset_info(dataset)["input_shape"]
    return None


def check_data_matches(
    info: dict[str, Any],
    dataset_name: str,
    input_shape: Sequence[int] | None = None,
    source: str = "the checkpoint",
) -> None:
    """ConfigError unless the data (``dataset_name``, ``input_shape``) are what the sidecar ``info`` was trained on.

    ``input_shape`` defaults to the registered shape of ``dataset_name``. What the sidecar does not
    record is not checked.
    """
    if input_shape is None and dataset_name in DATASETS:
        input_shape = dataset_info(dataset_name)["input_shape"]
    data_shape = _shape(input_shape)
    trained_on, trained_shape = info.get("dataset"), trained_input_shape(info)
    same_data = trained_on is None or trained_on == dataset_name
    if trained_shape is not None and data_shape is not None:
        same_shape = trained_shape == data_shape
    elif info.get("in_channels") is not None and data_shape is not None:
        same_shape = int(info["in_channels"]) == data_shape[0]
    else:
        same_shape = True
    if same_data and same_shape:
        return
    if trained_shape is None and info.get("in_channels") is not None:
        trained_desc = f"{info['in_channels']}-channel inputs"
    else:
        trained_desc = f"input {trained_shape}"
    trained = f"{trained_on} ({trained_desc})" if trained_on else trained_desc
    data = f"{dataset_name} (input {data_shape})" if data_shape is not None else dataset_name
    fix = f"pass --dataset {trained_on} or" if trained_on else "pass"
    raise ConfigError(f"{source} was trained on {trained} but the data are {data}; "
                      f"{fix} a checkpoint trained on {dataset_name}")


def sidecar_defaults(info: dict[str, Any]) -> dict[str, Any]:
    """What a command defaults to for a checkpoint: ``dataset``, ``input_shape``, ``norm``, ``eps``.

    ``norm`` and ``eps`` come from the training config, else from the threat model the metrics were
    measured under, else from a recorded ``threat`` (RobustBench entries); each is None when the
    sidecar does not record it.
    """
    config = (info.get("training") or {}).get("config") or {}
    metrics = info.get("metrics") or {}
    threat = info.get("threat") or {}  # models from elsewhere (RobustBench) record their threat model here

    def first(*values):
        return next((v for v in values if v is not None), None)

    return {
        "dataset": info.get("dataset"),
        "input_shape": trained_input_shape(info),
        "norm": first(config.get("norm"), metrics.get("eval_norm"), threat.get("norm")),
        "eps": first(config.get("eps"), metrics.get("eval_eps"), threat.get("eps")),
    }


# ---------------------------------------------------------------------------- sidecars are the truth:
# what a command runs on defaults to what its checkpoints record


def recorded_dataset(requested: str | None, infos: Mapping[str, Mapping[str, Any]], force: bool = False) -> str:
    """The data set to run on: the one the checkpoints record, unless ``requested`` (with ``force``).

    ``infos`` maps each checkpoint's path to its sidecar. Checkpoints recording different data sets,
    or a requested data set other than the recorded one without ``force``, are a ConfigError naming both.
    """
    recorded = {path: info.get("dataset") for path, info in infos.items() if info.get("dataset")}
    distinct = sorted(set(recorded.values()))
    if len(distinct) > 1:
        listing = ", ".join(f"{p} on {d}" for p, d in recorded.items())
        raise ConfigError(f"the checkpoints were trained on different data sets: {listing}")
    if requested is None:
        if not distinct:
            raise ConfigError("the checkpoints record no data set; give --dataset")
        return distinct[0]
    if distinct and requested != distinct[0] and not force:
        path = next(iter(recorded))
        raise ConfigError(f"--dataset {requested}, but {path} was trained on {distinct[0]}; leave --dataset out "
                          f"to use {distinct[0]}, or add --force-dataset to run on {requested} anyway")
    if distinct and requested != distinct[0]:
        _log.warning("running models trained on %s on %s (--force-dataset)", distinct[0], requested)
    return requested


def check_input_shape(infos: Mapping[str, Mapping[str, Any]], input_shape: Iterable[int], dataset: str) -> None:
    """Data whose (C, H, W) differs from the shape a checkpoint was trained on is an error naming both
    (also under --force-dataset: such a model cannot run on them)."""
    shape = tuple(int(s) for s in input_shape)
    for path, info in infos.items():
        trained = trained_input_shape(dict(info))
        if trained is not None and trained != shape:
            raise ConfigError(f"{path} takes inputs of shape {trained} but {dataset} has {shape}")


def recorded_threat(eps: float | None, norm: str | None, info: Mapping[str, Any], path: str) -> tuple[float, str]:
    """eps and norm: as given, else what the robust checkpoint records (training, else evaluation values)."""
    recorded = sidecar_defaults(dict(info))
    norm = norm or recorded["norm"] or "linf"
    eps = eps if eps is not None else recorded["eps"]
    if eps is None:
        raise ConfigError(f"{path} records no eps; give --eps")
    return float(eps), norm


def load_checkpoint_data(cfg: Any, infos: Mapping[str, Mapping[str, Any]], dataset: str, split: str):
    """``(image options, data)`` of a run on checkpoints: ``split`` of ``dataset`` read with
    ``cfg.data_dir`` and ``cfg.image`` (declared by :func:`adasmooth.data.images.image_options`), the
    image crop defaulting to the input size the checkpoints were trained on, files decoded by
    ``cfg.workers`` processes."""
    from ..data import load_dataset

    image = cfg.image.fit(map(trained_input_shape, infos.values()))
    return image, load_dataset(dataset, split, cfg.data_dir, image=image, workers=cfg.workers)
