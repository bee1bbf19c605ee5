"""A mixed model as one self-contained file that plain PyTorch loads: deployment and submission elsewhere.

:func:`export_mixture` writes any mixed model of adasmooth (fixed-alpha or adaptive, any base models)
as a ``torch.export`` program by default: ``torch.export.load(path).module()`` gives back a module
whose ``forward(x)`` returns the same logits, with adasmooth not installed. The file carries
``adasmooth.json`` (kind, format, input shape, alpha or the mixing network's eval head, provenance),
readable with ``torch.export.load(path, extra_files={"adasmooth.json": ""})``.

The program is traced without strict mode, so the library's Python-level parts (the ``frozen()``
context, the forward hooks that tap the base models' features, shape checks) run once while
tracing and leave a plain graph behind. Checks on values cannot be traced: they are skipped while
``torch.compiler.is_exporting()`` (the bounds of alpha are checked where they are set). The batch
dimension is symbolic, so the program takes any batch size.

``format="torchscript"`` writes a TorchScript file (``torch.jit.trace``; ``torch.jit.load``, with
``_extra_files`` for the record) instead; it is also the fallback where ``torch.export`` cannot trace
a model (a base model with data-dependent Python control flow, say): the reason is logged and
recorded as ``fallback``. TorchScript is deprecated upstream (torch 2.14 warns on every save and load).

Either way the file is verified before it is written: saved to memory, loaded back, and compared
with the library on a fresh input of another batch size than the one traced.

Rules that differentiate inside the forward pass (the gradient-based trust weights R_i of
Eq. 3.3) cannot be traced; they are refused with a ConfigError.

:func:`load_mixture` loads a saved mixture of either kind from its sidecar's ``kind``, or one of the
authors' released composites from a ``robustbench:<dataset>/Linf/Bai2023Improving_*`` spec, or their
MixedNUTS model from ``robustbench:cifar100/Linf/Bai2024MixedNUTS`` (a nonlinear-rule fixed mixture).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from ..core.io import atomic_write, provenance
from ..models.checkpoint import checkpoint_paths
from ..models.robustbench import PREFIX, parse_robustbench_spec, resolve_model_dir
from .bases import mixture_input_shape
from .adaptive import KIND as ADAPTIVE_KIND
from .adaptive import AdaptiveMixedClassifier, load_adaptive_classifier
from .fixed import FIXED_KIND, MixedClassifier, load_fixed_mixture

__all__ = ["export_mixture", "load_mixture", "mixture_files", "mixture_input_shape", "load_exported",
           "EXPORT_FORMATS", "EXPORT_TOLERANCE", "TRACEABLE_RULES"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("export", "torchscript")  # torch.export program (.pt2) | TorchScript
EXPORT_TOLERANCE = 1e-5  # max |logit difference| between the exported file and the library
TRACEABLE_RULES = ("prob", "logit")  # the others take input gradients inside forward
RECORD = "adasmooth.json"  # the name of the record inside an exported file


def load_mixture(path: str | Path, device: str | torch.device = "cpu",
                 model_dir: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A saved fixed (``kind: fixed-mixture``) or adaptive mixture, by the kind its sidecar records; or a
    ``robustbench:<dataset>/Linf/<Bai2023 or Bai2024MixedNUTS entry>`` read from ``model_dir``."""
    if str(path).startswith(PREFIX):
        return _load_released_composite(str(path), device, model_dir)
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise CheckpointError(f"mixture file {sidecar} not found")
    try:
        kind = json.loads(sidecar.read_text()).get("kind")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{sidecar} is not a JSON object") from None
    if kind == FIXED_KIND:
        return load_fixed_mixture(path, device=device)
    if kind == ADAPTIVE_KIND:
        return load_adaptive_classifier(path, device=device)
    raise CheckpointError(f"{sidecar} is not a saved mixture (kind {kind!r}; expected {FIXED_KIND} or {ADAPTIVE_KIND})")


def mixture_files(spec: str | Path, model_dir: str | Path | None = None) -> list[Path]:
    """The files :func:`load_mixture` reads for ``spec`` (the mixture's own; a composite's three files)."""
    if str(spec).startswith(PREFIX):
        from .bai2023 import bai2023_files
        from .bai2024 import bai2024_files

        dataset, threat, name = parse_robustbench_spec(str(spec))
        files = bai2024_files if name.startswith("Bai2024") else bai2023_files
        return files(name, dataset, resolve_model_dir(model_dir), threat)
    return list(checkpoint_paths(spec))


def _load_released_composite(spec: str, device, model_dir) -> tuple[nn.Module, dict[str, Any]]:
    from .bai2023 import BAI2023_ENTRIES, load_bai2023
    from .bai2024 import BAI2024_ENTRIES, bai2024_info, load_bai2024

    dataset, threat, name = parse_robustbench_spec(spec)
    if name.startswith("Bai2024"):  # MixedNUTS: a fixed-alpha nonlinear mixture (unsupported entries refused there)
        model = load_bai2024(name, dataset, resolve_model_dir(model_dir), device, threat)
        info = {"kind": FIXED_KIND, "dataset": dataset, "spec": spec, "rule": "nonlinear", "alpha": model.alpha,
                **bai2024_info(name, dataset, threat)}
        return model, info
    if (dataset, name) not in BAI2023_ENTRIES:
        known = ", ".join(f"{PREFIX}{d}/Linf/{n}" for d, n in [*BAI2023_ENTRIES, *BAI2024_ENTRIES])
        raise ConfigError(f"{spec} is not a released mixture; known: {known} (single models go to --model/--std/--rob)")
    model = load_bai2023(name, dataset, resolve_model_dir(model_dir), device, threat)
    info = {"kind": ADAPTIVE_KIND, "dataset": dataset, "input_shape": [3, 32, 32], "spec": spec,
            "threat": {"norm": "linf", "eps": 8 / 255}}
    return model, info


def _describe(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, MixedClassifier):
        return {"kind": FIXED_KIND, "alpha": model.alpha, "rule": model.rule,
                "std_scale": model.std_scale, "rob_scale": model.rob_scale}
    if isinstance(model, AdaptiveMixedClassifier):
        head = model.mixing_net.eval_head() if hasattr(model.mixing_net, "eval_head") else None
        return {"kind": ADAPTIVE_KIND, "mixing_net": type(model.mixing_net).__name__, "eval_head": head,
                "std_scale": model.std_scale, "rob_scale": model.rob_scale}
    return {"kind": type(model).__name__}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _program_saver(model: nn.Module, example: torch.Tensor) -> Callable[[dict[str, Any]], bytes]:
    """Trace ``model`` with ``torch.export`` (batch dimension symbolic); a function from a record to the file's bytes."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)

    def save(record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={RECORD: json.dumps(record, default=str)})
        return buffer.getvalue()

    return save


@contextlib.contextmanager
def _torchscript_deprecation_ignored() -> Iterator[None]:
    """Torch notes TorchScript's deprecation on every save and load (a DeprecationWarning in 2.13, a
    FutureWarning in 2.14); here TorchScript was asked for, or is the fallback the command reports."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        yield


def _torchscript_saver(model: nn.Module, example: torch.Tensor) -> Callable[[dict[str, Any]], bytes]:
    """Trace ``model`` with ``torch.jit.trace``; a function from a record to the file's bytes."""
    with warnings.catch_warnings():
        # the tracer warns about each Python-level check it runs once: those are the point
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)

    def save(record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        with _torchscript_deprecation_ignored():
            torch.jit.save(traced, buffer, _extra_files={RECORD: json.dumps(record, default=str)})
        return buffer.getvalue()

    return save


def load_exported(file: bytes | str | Path) -> tuple[Callable, dict[str, Any]]:
    """An exported file of either format (told apart by its archive: TorchScript's holds ``code/``) as
    (callable module, its record); what a user without adasmooth does with ``torch.export.load(path).module()``
    or ``torch.jit.load(path)``."""
    source = io.BytesIO(file) if isinstance(file, bytes) else Path(file)
    with zipfile.ZipFile(source) as archive:
        torchscript = any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    if isinstance(source, io.BytesIO):
        source.seek(0)
    extra = {RECORD: ""}
    if torchscript:
        with _torchscript_deprecation_ignored():
            module = torch.jit.load(source if isinstance(source, io.BytesIO) else str(source), _extra_files=extra)
    else:
        module = torch.export.load(source, extra_files=extra).module()
    record = extra[RECORD]
    return module, json.loads(record.decode() if isinstance(record, bytes) else record)


def _verified(data: bytes, model: nn.Module, check: torch.Tensor) -> float:
    """max |logit difference| between the file in ``data`` and the library on ``check``; a ConfigError
    where the file returns another shape or differs by more than EXPORT_TOLERANCE."""
    module, _ = load_exported(data)
    with torch.no_grad():
        expected, got = model(check), module(check)
    if got.shape != expected.shape:
        raise ConfigError(f"the exported model returns {tuple(got.shape)} for a batch of {check.shape[0]}, the "
                          f"library {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not diff <= EXPORT_TOLERANCE:
        raise ConfigError(f"the exported model differs from the library by {diff:.3g} on a fresh input: it has "
                          "input-dependent Python control flow")
    return diff


def export_mixture(model: nn.Module, path: str | Path, input_shape: Sequence[int],
                   metadata: dict[str, Any] | None = None, seed: int = 0,
                   format: Literal["export", "torchscript"] = "export") -> dict[str, Any]:
    """Export ``model`` (in eval mode) in ``format``, verify the file, and write it to ``path`` atomically.

    The example inputs are uniform in [0, 1] of shape (2, *input_shape) for tracing and
    (3, *input_shape) for the check, on the model's device. ``format="export"`` falls back to
    TorchScript where ``torch.export`` cannot trace the model (logged; recorded as ``fallback``).
    Returns the recorded description with ``format`` and ``max_abs_diff`` (exported vs library
    logits on the check input). The model's own training flag is restored afterwards.
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if isinstance(model, MixedClassifier) and (model.rule not in TRACEABLE_RULES or model.differentiate_r):
        raise ConfigError(f"rule {model.rule!r} takes input gradients inside forward and cannot be exported; "
                          f"exportable rules: {', '.join(TRACEABLE_RULES)}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand((2, *shape), generator=gen).to(device)
    check = torch.rand((3, *shape), generator=gen).to(device)
    info = {**_describe(model), "input_shape": list(shape), **(metadata or {}), "provenance": provenance()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if format == "export":
                try:
                    save = _program_saver(model, example)
                    diff = _verified(save({**info, "format": format}), model, check)
                except Exception as err:  # torch.export raises many types for what it cannot trace
                    info["fallback"] = _first_line(err)
                    log.warning("torch.export cannot export this model (%s); writing TorchScript instead",
                                info["fallback"])
                    format = "torchscript"
            if format == "torchscript":
                save = _torchscript_saver(model, example)
                diff = _verified(save({**info, "format": format}), model, check)
    finally:
        model.train(was_training)
    info = {**info, "format": format, "max_abs_diff": diff}
    data = save(info)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return info
