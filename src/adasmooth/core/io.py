"""Files: the one atomic writer, result JSON with provenance, CSV, a plain-text table, resume state.

Every file adasmooth writes goes through :func:`atomic_write`: the content lands in a temporary file
beside the target and is renamed over it only when complete, so an interrupted or failed write
leaves the old file intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import tempfile
import json
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .errors import CheckpointError

__all__ = [
    "atomic_write",
    "atomic_path",
    "write_text",
    "write_json",
    "provenance",
    "write_result",
    "write_csv",
    "format_table",
    "to_jsonable",
    "save_resume_state",
    "load_resume_state",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> Path:
    """Strict JSON (no NaN), atomically; non-JSON values go through :func:`to_jsonable` first."""
    return write_text(path, json.dumps(to_jsonable(payload), indent=indent, allow_nan=False, default=str))

_PACKAGES = ("adasmooth", "torch", "numpy", "scipy", "scikit-learn", "matplotlib", "safetensors", "pyautoattack")


def provenance() -> dict[str, Any]:
    """Package versions, Python, platform and time: recorded in every result and checkpoint."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays: their floats need the checks below
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, float) and obj in (math.inf, -math.inf):
        # strict JSON has no infinity; float("inf") reads this back
        return "inf" if obj > 0 else "-inf"
    return obj


def write_result(path: str | Path, results: Any, config: Any = None, seed: int | None = None) -> Path:
    """Write ``{"results", "config", "seed", "provenance"}`` as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "results": to_jsonable(results),
        "config": to_jsonable(config),
        "seed": seed,
        "provenance": provenance(),
    }
    return write_json(path, payload)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    if not rows:
        raise ValueError("no rows to write")

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def _fmt(v: Any, precision: int) -> str:
    if isinstance(v, float):
        return f"{v:.{precision}f}"
    return "" if v is None else str(v)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, precision: int = 2) -> str:
    """A fixed-width text table; floats printed with ``precision`` decimals."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c), precision) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


# ---------------------------------------------------------------------------- resume state


def save_resume_state(path: str | Path, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write a resume file: tensors and plain values only (it is read back with ``weights_only=True``).

    ``config`` is the part of the run's config that determines its result; a resume file made with
    another config is refused on load.
    """
    payload = {"format": "adasmooth-resume", "config": to_jsonable(config), "state": state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_resume_state(path: str | Path, config: dict[str, Any], device: str | torch.device = "cpu") -> dict | None:
    """The state saved by :func:`save_resume_state` if it exists and was made with ``config``.

    Returns None when there is no file. A file made with another config, or one that cannot be read
    (truncated, foreign, pickled code), is a CheckpointError naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"resume file {path} cannot be read ({first[:200]}); delete it to start over"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != "adasmooth-resume" or "state" not in payload:
        raise CheckpointError(f"resume file {path} is not an adasmooth resume file; delete it to start over")
    saved = payload.get("config")
    wanted = to_jsonable(config)
    if saved != wanted:
        changed = sorted(k for k in set(saved or {}) | set(wanted) if (saved or {}).get(k) != wanted.get(k))
        raise CheckpointError(
            f"resume file {path} was made with a different config (differs in: {', '.join(changed)}); "
            "delete it, or pass --no-resume to start over"
        )
    return payload["state"]
