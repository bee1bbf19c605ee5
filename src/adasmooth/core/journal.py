"""An append-only journal of finished work, so that a long run killed at any moment continues where it stopped.

The journal is a JSON-lines file beside the run's output: a header line that records the config the
run was started with, then one line per finished batch holding that batch's per-example records (each
with its example ``index``). Every line is flushed and fsync'ed before the run moves on, so a SIGKILL
loses at most the batch in flight; a torn last line (killed mid-write) is ignored on reading.

A run started again with the same config skips the examples the journal holds; with another config it
is refused (a CheckpointError naming what differs) unless ``restart`` is given, which starts over.

Several processes of one run (torchrun) each append to their own file ``<journal>.<part>`` and read all
of them, so a run resumed with another number of processes still finds every finished example.
Besides records, a line may carry ``meta`` (e.g. seconds spent per attack), collected in ``metas``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import CheckpointError
from .io import to_jsonable

__all__ = ["Journal", "journal_path"]

FORMAT = "adasmooth-journal"


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
        lines = file.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(f"journal {file} is not an adasmooth journal; delete it or pass --restart")
        if header.get("config") != self.config and len(lines) > 1:
            saved = header.get("config") or {}
            changed = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
            raise CheckpointError(f"journal {file} was made with a different config (differs in: "
                                  f"{', '.join(changed)}); pass --restart to start over")
        for number, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the run was killed while writing its last line
                    break
                raise CheckpointError(f"journal {file} is damaged at line {number}; pass --restart") from None
            for record in entry.get("records", []):
                self.done[int(record["index"])] = record
            if entry.get("meta"):
                self.metas.append(entry["meta"])

    def _write_line(self, payload: dict[str, Any]) -> None:
        if not self.path.is_file() or not self.path.stat().st_size:
            # written with the first finished work: a run that fails before any leaves no journal behind
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = json.dumps({"format": FORMAT, "config": self.config}) + "\n"
            self.path.write_text(header)
        with self.path.open("a") as f:
            f.write(json.dumps(to_jsonable(payload), allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
