"""An append-only journal of finished work, so that a long run killed at any moment continues where it stopped.

The journal is a JSON-lines file beside the run's output: a header line that records the config the
run was started with, then one line per finished batch holding that batch's per-example records (each
with its example ``index``). Every line is flushed and fsync'ed before the run moves on, so a SIGKILL
loses at most the batch in flight. A torn last line (killed mid-write) is healed when the run starts
again: the file is cut back to its last complete line, every complete record kept, and a warning says
so. A write that fails (a full disk) is undone the same way before the error is raised.

A run started again with the same config skips the examples the journal holds; with another config it
is refused (a CheckpointError naming what differs) unless ``restart`` is given, which starts over.

Several processes of one run (torchrun) each append to their own file ``<journal>.<part>`` and read all
of them, so a run resumed with another number of processes still finds every finished example.
Besides records, a line may carry ``meta`` (e.g. seconds spent per attack), collected in ``metas``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import CheckpointError
from .io import disk_full, disk_full_error, to_jsonable

__all__ = ["Journal", "journal_path"]

FORMAT = "adasmooth-journal"

logger = logging.getLogger(__name__)


def journal_path(output: str | Path) -> Path:
    """``<output>.journal``: where the journal of the run writing ``output`` lives."""
    output = Path(output)
    return output.with_name(output.name + ".journal")


class Journal:
    """``Journal(path, config, restart=False)``: ``done`` maps example index -> record; ``append(records)``."""

    def __init__(self, path: str | Path, config: dict[str, Any], restart: bool = False, part: str | None = None):
        self.base = Path(path)
        self.path = self.base if part is None else self.base.with_name(f"{self.base.name}.{part}")
        self.config = to_jsonable(config)
        self.done: dict[int, dict[str, Any]] = {}
        self.metas: list[dict[str, Any]] = []
        if restart:
            self.remove_all()
        for file in self.files():
            self._read(file)

    def files(self) -> list[Path]:
        """Every part of this journal on disk (the single-process file and the per-process ones)."""
        parts = sorted(self.base.parent.glob(f"{self.base.name}.*")) if self.base.parent.is_dir() else []
        return ([self.base] if self.base.is_file() else []) + [p for p in parts if p.is_file()]

    def _read(self, file: Path) -> None:
        data = file.read_bytes()
        complete = data.rfind(b"\n") + 1  # bytes up to the end of the last complete line
        if complete < len(data):
            data = self._torn_tail(file, data, complete)
        lines = data.decode("utf-8", errors="replace").splitlines()
        if not lines:
            return
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(f"journal {file} is not an adasmooth journal; delete it or pass --restart")
        if header.get("config") != self.config and len(lines) == 1 and file == self.path:
            os.truncate(file, 0)  # a header alone holds no work: this run's header replaces it
        elif header.get("config") != self.config and len(lines) > 1:
            saved = header.get("config") or {}
            changed = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
            raise CheckpointError(f"journal {file} was made with a different config (differs in: "
                                  f"{', '.join(changed)}); pass --restart to start over")
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise CheckpointError(f"journal {file} is damaged at line {number}; pass --restart") from None
            for record in entry.get("records", []):
                self.done[int(record["index"])] = record
            if entry.get("meta"):
                self.metas.append(entry["meta"])

    def _torn_tail(self, file: Path, data: bytes, complete: int) -> bytes:
        """A last line without its newline: the run writing it was killed mid-write (lines are written whole
        and in order, so only the last can be torn). This run's own file is cut back to its complete lines,
        so that new lines start on a line of their own; another process's part is only read, since that
        process may be writing its line right now."""
        tail = data[complete:]
        try:
            whole = isinstance(json.loads(tail), dict)  # killed between the line and its newline
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = False
        if file == self.path:
            if whole:
                with file.open("ab") as f:
                    f.write(b"\n")
            else:
                os.truncate(file, complete)
                logger.warning("journal %s: its last line (%d bytes) was torn by an interrupted write; removed "
                               "it, kept the %d complete line(s) before it", file, len(tail),
                               data[:complete].count(b"\n"))
        return data + b"\n" if whole else data[:complete]

    def _write_line(self, payload: dict[str, Any]) -> None:
        line = (json.dumps(to_jsonable(payload), allow_nan=False) + "\n").encode()
        existed = self.path.is_file()
        size = self.path.stat().st_size if existed else 0
        if not size:
            # written with the first finished work: a run that fails before any leaves no journal behind
            line = (json.dumps({"format": FORMAT, "config": self.config}) + "\n").encode() + line
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            if disk_full(err):
                raise disk_full_error(self.path) from err
            raise
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as err:
            # undo the part of the line that was written: the journal stays what it was before
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            os.close(fd)
            if not existed:
                self.path.unlink(missing_ok=True)
            if disk_full(err):
                raise disk_full_error(self.path) from err
            raise
        os.close(fd)

    def append(self, records: Iterable[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
        """Record finished examples (each a dict with an ``index``), and ``meta``, durably, in one line."""
        records = [to_jsonable(r) for r in records]
        if not records and not meta:
            return
        self._write_line({"records": records, **({"meta": to_jsonable(meta)} if meta else {})})
        for record in records:
            self.done[int(record["index"])] = record
        if meta:
            self.metas.append(to_jsonable(meta))

    def pending(self, indices: Iterable[int]) -> list[int]:
        """The given example indices the journal does not hold yet, in order."""
        return [i for i in indices if i not in self.done]

    def remove_all(self) -> None:
        """Delete every part of the journal (once the run's final output is written, or to restart)."""
        for file in self.files():
            file.unlink(missing_ok=True)
