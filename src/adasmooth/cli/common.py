"""What several commands share: the checks on a run's files, made before any work.

Each command module may define ``files(cfg) -> (inputs, outputs)``; :func:`check_run_files` then
refuses, up front, an output that would overwrite an input, an output that names an existing folder,
and an output whose folder cannot be created or written. (Defaults read from the checkpoints'
sidecars live in :mod:`adasmooth.models.checkpoint`.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..core.errors import ConfigError

__all__ = ["check_run_files", "checkpoint_files"]


def checkpoint_files(*specs: str | Path | None) -> list[Path]:
    """The files the given model specs read (a checkpoint's weights and sidecar, a RobustBench file,
    weights); None entries are skipped."""
    from ..models.loader import spec_files

    return [f for spec in specs if spec for f in spec_files(spec)]


def _writable_folder(path: Path) -> None:
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"output {path} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"output {path} cannot be written: no write permission in {folder}")


def check_run_files(inputs: Iterable[str | Path], outputs: Iterable[str | Path]) -> None:
    """Refuse, before any work, outputs that would overwrite an input, name a folder, or cannot be written."""
    taken = {Path(p).resolve(): Path(p) for p in inputs}
    for out in map(Path, outputs):
        resolved = out.resolve()
        if resolved in taken:
            raise ConfigError(f"output {out} would overwrite the input {taken[resolved]}; choose another --output")
        if out.is_dir():
            raise ConfigError(f"output {out} is an existing folder; give a file path")
        _writable_folder(resolved)
