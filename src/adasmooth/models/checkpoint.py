"""Checkpoints: safetensors weights plus a JSON sidecar that says how to rebuild and what was measured.

``save_checkpoint(model, "runs/std")`` writes ``runs/std.safetensors`` and ``runs/std.json``.
Loading never unpickles code: weights come from safetensors, or from a foreign ``.pt`` file via
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import ModelSpec, create_model
from ..core.io import provenance

__all__ = ["save_checkpoint", "load_checkpoint", "read_sidecar", "load_foreign_state_dict", "checkpoint_paths"]

FORMAT_VERSION = 1


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a path given with or without an extension."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write weights and sidecar atomically (temp file, then rename). Returns the weights path."""
    spec: ModelSpec | None = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no .spec; build it with adasmooth.models.create_model")
    weights, sidecar = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_w = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp_w))
    info = {
        "format_version": FORMAT_VERSION,
        "architecture": spec.name,
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
        "normalization": {"mean": spec.mean, "std": spec.std},
        "model_kwargs": spec.kwargs,
        **(metadata or {}),
        "provenance": provenance(),
    }
    tmp_s = sidecar.with_name(sidecar.name + ".tmp")
    tmp_s.write_text(json.dumps(info, indent=2, default=str))
    tmp_w.replace(weights)
    tmp_s.replace(sidecar)
    return weights


def read_sidecar(path: str | Path) -> dict[str, Any]:
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise FileNotFoundError(f"checkpoint sidecar {sidecar} not found")
    return json.loads(sidecar.read_text())


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the sidecar, load its weights, return (model in eval mode, sidecar)."""
    weights, sidecar = checkpoint_paths(path)
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights {weights} not found")
    info = read_sidecar(path)
    model = create_model(
        info["architecture"],
        num_classes=int(info["num_classes"]),
        in_channels=int(info["in_channels"]),
        mean=info["normalization"]["mean"],
        std=info["normalization"]["std"],
        **info.get("model_kwargs", {}),
    )
    state = load_file(str(weights), device=str(device))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), info


def load_foreign_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth`` file, without running pickled code.

    Strips the ``module.`` and ``model.`` prefixes that DataParallel and wrappers add, and unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}`` containers.
    """
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds no state dict")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def spec_dict(model: nn.Module) -> dict:
    return asdict(model.spec)
