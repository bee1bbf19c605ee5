"""Where a saved mixture's base models are: recorded relative to the mixture's own file, found again from there.

Shared by the fixed-alpha (:mod:`.fixed`) and adaptive (:mod:`.adaptive`) mixture files. A base model
is recorded by its checkpoint path relative to the sidecar's folder, so a results folder holding the
mixture and its base models can move; an absolute path recorded by an older version still loads,
and a base model found beside the sidecar is used when the recorded place is gone. A base model that
came from elsewhere (``robustbench:``, ``python:``, ... specs, see :func:`adasmooth.models.load_model`)
is recorded by its spec.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import CheckpointError
from ..models.checkpoint import checkpoint_paths
from ..models.loader import load_model, spec_kind

__all__ = ["relative_to", "recorded_path", "find_base", "load_bases", "mixture_input_shape"]


def mixture_input_shape(model) -> tuple[int, int, int] | None:
    """The (C, H, W) a mixture takes: its own ``input_shape`` (set where it was built for a data set or
    loaded from a file that records one), else what its base models record (``spec.input_shape``), or None."""
    for shape in (getattr(model, "input_shape", None),
                  *(getattr(getattr(getattr(model, part, None), "spec", None), "input_shape", None)
                    for part in ("std_model", "rob_model"))):
        if shape:
            return tuple(int(v) for v in shape)  # type: ignore[return-value]
    return None


def relative_to(path: str | Path | None, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (forward slashes), or absolute where no relative path exists."""
    if not path:
        return None
    if spec_kind(str(path)) != "checkpoint":
        return str(path)
    target = Path(path).resolve()
    try:
        return Path(os.path.relpath(target, folder.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(target)


def _is_spec(recorded: str | None) -> bool:
    return bool(recorded) and spec_kind(str(recorded)) != "checkpoint"


def recorded_path(recorded: str | None, sidecar: Path) -> Path | None:
    """A recorded base-model path as usable from here: relative ones are relative to the sidecar."""
    if not recorded or _is_spec(recorded):
        return None
    p = Path(recorded)
    return p if p.is_absolute() else sidecar.parent / p


def find_base(recorded: str | None, sidecar: Path, role: str) -> Path:
    """The checkpoint path of the ``role`` ("std"/"rob") base model recorded in ``sidecar``."""
    path = recorded_path(recorded, sidecar)
    if path is None:
        raise CheckpointError(f"{sidecar} records no {role} base model path; pass {role}_model=")
    # an absolute path from a folder that has since moved: the base model may sit beside the sidecar
    for candidate in (path, sidecar.parent / path.name):
        if checkpoint_paths(candidate)[0].is_file():
            return candidate
    raise CheckpointError(f"{role} base model checkpoint {checkpoint_paths(path)[0]} (recorded in {sidecar}) "
                          f"not found; also looked in {sidecar.parent}")


def load_bases(info: dict, sidecar: Path, given: dict, device) -> tuple[dict, dict]:
    """The two base models of a saved mixture: ``given[role]`` where not None, else loaded from the record.

    Returns ({"std": model, "rob": model}, {"std": absolute path, spec or None, "rob": ...}); the paths
    are where the base models were found (or would be, for given models), ready to be recorded again.
    """
    models, paths = {}, {}
    for role in ("std", "rob"):
        recorded = info.get(f"{role}_checkpoint")
        if _is_spec(recorded):
            models[role] = given[role] if given.get(role) is not None else load_model(recorded, device)[0]
            paths[role] = recorded
            continue
        if given.get(role) is None:
            found = find_base(recorded, sidecar, role)
            models[role], _ = load_model(str(found), device)
        else:
            found = recorded_path(recorded, sidecar)
            models[role] = given[role]
        paths[role] = str(found.resolve()) if found is not None else None
    return models, paths
