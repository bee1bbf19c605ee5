"""A mixed model as one self-contained file that plain PyTorch loads: deployment and submission elsewhere.

:func:`export_mixture` writes a TorchScript file (``torch.jit.trace``) of any mixed model of adasmooth
(fixed-alpha or adaptive, any base models); ``torch.jit.load(path)`` gives back a module whose
``forward(x)`` returns the same logits, with adasmooth not installed. The file also carries
``adasmooth.json`` (kind, input shape, alpha or the mixing network's eval head, provenance), readable
with ``torch.jit.load(path, _extra_files={"adasmooth.json": ""})``.

Why TorchScript tracing and not ``torch.export``: tracing records the tensor operations the model
runs on an example input, so the library's Python-level checks (alpha within [0, 1], input shapes,
the ``frozen()`` context and the forward hooks that tap the base models' features) run once while
tracing and leave plain tensor graphs behind. ``torch.export`` refuses exactly those checks (a
data-dependent ``bool(tensor)`` / ``float(buffer)`` is a guard it cannot keep), for both kinds.
Shapes stay symbolic in the trace, so the exported model takes any batch size; every export is
verified on a fresh input of another batch size before it is written.

Rules that differentiate inside the forward pass (the gradient-based trust weights R_i of
Eq. 3.3) cannot be traced; they are refused with a ConfigError.

:func:`load_mixture` loads a saved mixture of either kind from its sidecar's ``kind``, or one of the
authors' released composites from a ``robustbench:<dataset>/Linf/Bai2023Improving_*`` spec, or their
MixedNUTS model from ``robustbench:cifar100/Linf/Bai2024MixedNUTS`` (a nonlinear-rule fixed mixture).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from ..core.io import atomic_write, provenance
from ..models.checkpoint import checkpoint_paths
from ..models.robustbench import PREFIX, parse_robustbench_spec, resolve_model_dir
from .adaptive import KIND as ADAPTIVE_KIND
from .adaptive import AdaptiveMixedClassifier, load_adaptive_classifier
from .fixed import FIXED_KIND, MixedClassifier, load_fixed_mixture

__all__ = ["export_mixture", "load_mixture", "mixture_files", "mixture_input_shape", "EXPORT_TOLERANCE", "TRACEABLE_RULES"]

EXPORT_TOLERANCE = 1e-5  # max |logit difference| between the exported file and the library
TRACEABLE_RULES = ("prob", "logit")  # the others take input gradients inside forward


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


def mixture_input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """The (C, H, W) the base models record (their ``spec.input_shape``), or None."""
    for part in (getattr(model, "std_model", None), getattr(model, "rob_model", None)):
        shape = getattr(getattr(part, "spec", None), "input_shape", None)
        if shape:
            return tuple(int(v) for v in shape)  # type: ignore[return-value]
    return None


def _describe(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, MixedClassifier):
        return {"kind": FIXED_KIND, "alpha": model.alpha, "rule": model.rule,
                "std_scale": model.std_scale, "rob_scale": model.rob_scale}
    if isinstance(model, AdaptiveMixedClassifier):
        head = model.mixing_net.eval_head() if hasattr(model.mixing_net, "eval_head") else None
        return {"kind": ADAPTIVE_KIND, "mixing_net": type(model.mixing_net).__name__, "eval_head": head,
                "std_scale": model.std_scale, "rob_scale": model.rob_scale}
    return {"kind": type(model).__name__}


def export_mixture(model: nn.Module, path: str | Path, input_shape: Sequence[int],
                   metadata: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Trace ``model`` (in eval mode) to TorchScript, verify it, and write it to ``path`` atomically.

    The example inputs are uniform in [0, 1] of shape (2, *input_shape) for the trace and
    (3, *input_shape) for the check, on the model's device. Returns the recorded description with
    ``max_abs_diff`` (exported vs library logits on the check input). The model's own training
    flag is restored afterwards.
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if isinstance(model, MixedClassifier) and (model.rule not in TRACEABLE_RULES or model.differentiate_r):
        raise ConfigError(f"rule {model.rule!r} takes input gradients inside forward and cannot be exported; "
                          f"exportable rules: {', '.join(TRACEABLE_RULES)}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand((2, *shape), generator=gen).to(device)
    check = torch.rand((3, *shape), generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about each Python-level check it runs once; those are the point
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
            expected, got = model(check), traced(check)
    finally:
        model.train(was_training)
    if got.shape != expected.shape:
        raise ConfigError(f"the traced model returns {tuple(got.shape)} for a batch of 3, the library "
                          f"{tuple(expected.shape)}: it cannot be exported by tracing")
    diff = float((got - expected).abs().max())
    if not diff <= EXPORT_TOLERANCE:
        raise ConfigError(f"the traced model differs from the library by {diff:.3g} on a fresh input: it has "
                          "input-dependent Python control flow and cannot be exported by tracing")
    info = {**_describe(model), "input_shape": list(shape), "format": "torchscript",
            "max_abs_diff": diff, **(metadata or {}), "provenance": provenance()}
    extra = {"adasmooth.json": json.dumps(info, default=str)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's, see the module docstring
        atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=extra))
    return info
