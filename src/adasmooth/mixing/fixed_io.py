"""A fixed-alpha mixture as a file: alpha, the rule and its parameters, the base models' paths.

A fixed mixture has no weights of its own, so its checkpoint is one JSON sidecar
(``path.json``, kind ``fixed-mixed-classifier``); the base models are recorded by path relative
to it, as the adaptive classifier's are (see :mod:`adasmooth.mixing.adaptive`). A rule with
parameters (the MixedNUTS rule of :mod:`adasmooth.mixing.nonlinear`) stores them beside its name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError
from ..core.io import provenance, write_json
from ..models.checkpoint import checkpoint_paths, load_checkpoint
from .adaptive import _find_base, _relative_to
from .fixed import MixedClassifier
from .nonlinear import NonlinearParams, nonlinear_params_of, nonlinear_rule
from .rules import MIXING_RULES

__all__ = ["save_mixed_classifier", "load_mixed_classifier", "FIXED_KIND"]

FIXED_KIND = "fixed-mixed-classifier"
FORMAT_VERSION = 1


def save_mixed_classifier(model: MixedClassifier, path: str | Path, std_checkpoint: str | Path,
                          rob_checkpoint: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path.json`` for ``model``; returns its path. The rule must be registered or nonlinear."""
    params = nonlinear_params_of(model)
    if params is None and model.rule not in MIXING_RULES:
        raise CheckpointError(f"rule {model.rule!r} is neither registered nor nonlinear: it cannot be saved by name")
    _, sidecar = checkpoint_paths(path)
    info = {
        "format_version": FORMAT_VERSION,
        "kind": FIXED_KIND,
        "alpha": model.alpha,
        "rule": model.rule,
        "nonlinear": params.as_dict() if params is not None else None,
        "std_scale": model.std_scale,
        "rob_scale": model.rob_scale,
        "std_hardmax": model.std_hardmax,
        "norm": model.norm,
        "std_checkpoint": _relative_to(std_checkpoint, sidecar.parent),
        "rob_checkpoint": _relative_to(rob_checkpoint, sidecar.parent),
        **(metadata or {}),
        "provenance": provenance(),
    }
    write_json(sidecar, info)
    return sidecar


def load_mixed_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[MixedClassifier, dict]:
    """The mixture of ``path.json`` in eval mode, with its base models loaded from the recorded paths."""
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise CheckpointError(f"fixed mixture file {sidecar} not found")
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sidecar} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("kind") != FIXED_KIND:
        kind = info.get("kind") if isinstance(info, dict) else None
        raise CheckpointError(f"{sidecar} is not a fixed mixed classifier file (kind {kind!r})")
    bases = {}
    for role in ("std", "rob"):
        found = _find_base(info.get(f"{role}_checkpoint"), sidecar, role)
        bases[role], _ = load_checkpoint(found, device)
        info[f"{role}_checkpoint"] = str(found.resolve())
    rule = nonlinear_rule(NonlinearParams.from_dict(info["nonlinear"])) if info.get("nonlinear") else info["rule"]
    model = MixedClassifier(bases["std"], bases["rob"], info["alpha"], std_scale=info.get("std_scale", 1.0),
                            rob_scale=info.get("rob_scale", 1.0), std_hardmax=info.get("std_hardmax", False),
                            rule=rule, norm=info.get("norm", "linf"))
    return model.to(device).eval(), info
