"""Result files: JSON with provenance, CSV, a plain-text table; helpers shared by every command."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["provenance", "write_result", "write_csv", "format_table", "to_jsonable"]

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str))
    tmp.replace(path)
    return path


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("no rows to write")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


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
