"""What several commands share: "sidecars are the truth" (data set, input shape and threat model default
to what the checkpoints record) and the checks that no output overwrites an input."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from ..core.errors import ConfigError

__all__ = ["recorded_dataset", "check_input_shape", "recorded_threat", "check_outputs_not_inputs",
           "check_file_output", "checkpoint_files"]


# ---------------------------------------------------------------------------- sidecars are the truth


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
        print(f"note: running models trained on {distinct[0]} on {requested} (--force-dataset)")
    return requested


def check_input_shape(infos: Mapping[str, Mapping[str, Any]], input_shape: Iterable[int], dataset: str) -> None:
    """Data whose (C, H, W) differs from the shape a checkpoint was trained on is an error naming both
    (also under --force-dataset: such a model cannot run on them)."""
    from ..models.checkpoint import trained_input_shape

    shape = tuple(int(s) for s in input_shape)
    for path, info in infos.items():
        trained = trained_input_shape(dict(info))
        if trained is not None and trained != shape:
            raise ConfigError(f"{path} takes inputs of shape {trained} but {dataset} has {shape}")


def recorded_threat(eps: float | None, norm: str | None, info: Mapping[str, Any], path: str) -> tuple[float, str]:
    """eps and norm: as given, else what the robust checkpoint records (training, else evaluation values)."""
    from ..models.checkpoint import sidecar_defaults

    recorded = sidecar_defaults(dict(info))
    norm = norm or recorded["norm"] or "linf"
    eps = eps if eps is not None else recorded["eps"]
    if eps is None:
        raise ConfigError(f"{path} records no eps; give --eps")
    return float(eps), norm


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files that make up a checkpoint (weights and sidecar)."""
    from ..models.checkpoint import checkpoint_paths

    return list(checkpoint_paths(path))


def check_outputs_not_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """No output of a run may overwrite one of its inputs; checked before any work."""
    taken = {Path(p).resolve(): Path(p) for p in inputs}
    for out in outputs:
        resolved = Path(out).resolve()
        if resolved in taken:
            raise ConfigError(f"output {out} would overwrite the input {taken[resolved]}; choose another --output")


def check_file_output(path: str | Path) -> Path:
    """An output that must be a file: an existing folder there is an error (before any work)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {path} is an existing folder; give a file path")
    return path
