"""What several commands share: the checks on a run's files, made before any work.

Each command module may define ``files(cfg) -> (inputs, outputs)``; :func:`check_run_files` then
refuses, up front, an output that would overwrite an input, an output that names an existing folder,
and an output whose folder cannot be created or written; :func:`lock_outputs` then holds a lock on each
output while the command runs, so that a second run writing the same file is refused. (Defaults read
from the checkpoints' sidecars live in :mod:`adasmooth.models.checkpoint`.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..core.errors import ConfigError
from ..core.io import output_lock

__all__ = ["check_run_files", "checkpoint_files", "lock_outputs", "narrate", "warn_class_count"]

logger = logging.getLogger(__name__)


def narrate(message: str) -> None:
    """One line of a command's narrative: what it is doing, what it resumed, which files it wrote. It goes
    through the ``adasmooth.cli`` logger at INFO, so ``adasmooth`` shows it on stdout and ``--quiet`` hides
    it; the results a command was run for (its tables and accuracy lines) are print()ed and always shown."""
    logger.info("%s", message)


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


@contextlib.contextmanager
def lock_outputs(outputs: Iterable[str | Path]) -> Iterator[None]:
    """Hold a lock (``<output>.lock``, see :func:`adasmooth.core.io.output_lock`) on every output while
    the block runs: another run writing one of them is refused with one line. Under torchrun only rank
    0 locks (the ranks of one run share their outputs; rank 0 writes them)."""
    with contextlib.ExitStack() as stack:
        if os.environ.get("RANK", "0") == "0":
            for out in {Path(p).resolve(): Path(p) for p in outputs}.values():  # each file once, as given
                stack.enter_context(output_lock(out))
        yield


def warn_class_count(infos: Mapping[str, Mapping[str, Any]], data) -> None:
    """Warn when a model's class count differs from the data's (e.g. a 1000-class ImageNet model on a
    2-class folder): labels then index the model's first classes, which is rarely what was meant."""
    for path, info in infos.items():
        count = info.get("num_classes")
        if count is not None and int(count) != data.num_classes:
            logger.warning("%s predicts %d classes but %s %s has %d: label k is taken to be the model's class k",
                           path, int(count), data.name, data.split, data.num_classes)
