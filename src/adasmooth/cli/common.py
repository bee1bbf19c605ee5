"""What several commands share: the checks that no output overwrites an input, made before any work.

(Defaults from the checkpoints' sidecars live in :mod:`adasmooth.models.checkpoint`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..core.errors import ConfigError

__all__ = ["check_outputs_not_inputs", "check_file_output", "checkpoint_files"]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a model spec reads (a checkpoint's weights and sidecar, a RobustBench file, weights)."""
    from ..models.loader import spec_files

    return spec_files(path)


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
