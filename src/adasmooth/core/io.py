"""Files: the one atomic writer, result JSON with provenance, CSV, a plain-text table, resume state.

Every file adasmooth writes goes through :func:`atomic_write`: the content lands in a temporary file
beside the target and is renamed over it only when complete, so an interrupted or failed write
leaves the old file intact and no temporary file behind. A full disk is an :class:`OutputError` (one
line) after that cleanup, whichever writer hit it. :func:`output_lock` keeps two processes from writing
the same output.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import os
import tempfile
import json
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import torch

from .errors import CheckpointError, OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: outputs are not locked there
    fcntl = None

__all__ = [
    "atomic_write",
    "atomic_path",
    "atomic_stream",
    "disk_full",
    "disk_full_error",
    "output_lock",
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


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how writers that do not raise an OSError word it (safetensors passes on the OS's text)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from, says the device has no space left."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OutputError):
            return False  # already reported (and cleaned up) by the writer that raised it
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path: str | Path) -> OutputError:
    """The one-line error for a write to ``path`` that ran out of space (after the write was undone)."""
    return OutputError(f"no space left on the device to write {path}; free some space and run again "
                       "(no partial file was left; earlier results are unchanged)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error remove it.

    A full disk, wherever in the write it shows, becomes an :class:`OutputError` once the temporary
    file is removed."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        # mkstemp makes the file private (0600); the result gets the mode a plain open() would give it
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        # on some file systems a full disk shows only when the data reach it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException as err:
        if disk_full(err):
            raise disk_full_error(path) from err
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    try:  # read, not set: setting it to look would race with other threads creating files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


class _WriteRecorder:
    """A binary file that remembers the OSError of a failed write, for writers that report it as
    another error without its errno (torch.save: "unexpected pos")."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def atomic_stream(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a binary file object and move the result to ``path`` atomically.

    For torch's writers: given a path, ``torch.save`` hides a full disk behind a RuntimeError and
    ``torch.jit.save`` aborts the process; given a Python file object, the write fails in Python."""

    def to_file(tmp: Path) -> None:
        with tmp.open("wb") as raw:
            recorder = _WriteRecorder(raw)
            try:
                write(recorder)
            except Exception as err:
                if recorder.error is not None and not disk_full(err):
                    raise recorder.error from err
                raise

    return atomic_write(path, to_file)


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold ``<path>.lock`` while the block runs; when another process holds it, an OutputError.

    The lock is the operating system's (``flock``), so the kernel releases it when its holder exits,
    however it exits: a killed run never leaves an output locked. The lock file (holding the pid) is
    removed on release, and so are the folders made for it that the run left empty. Without ``fcntl``
    (Windows) nothing is locked."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    if fcntl is None:  # pragma: no cover
        yield lock
        return
    made: list[Path] = []
    try:
        fd = _take_lock(lock, path, made)
    except OSError as err:
        _remove_empty(made)
        if disk_full(err):
            raise disk_full_error(lock) from err
        raise
    try:
        with contextlib.suppress(OSError):  # the pid only helps a user find the holder
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        # unlinked before the lock goes: whoever opened this file meanwhile sees that it is gone (_take_lock)
        lock.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty: the run wrote there
            folder.rmdir()


def _take_lock(lock: Path, output: Path, made: list[Path]) -> int:
    for _ in range(10):
        missing = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
        lock.parent.mkdir(parents=True, exist_ok=True)
        made.extend(reversed(missing))  # outermost first
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, UnicodeDecodeError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputError(f"output {output} is being written by another process{by} (lock {lock}); "
                              "wait for it to finish or choose another output") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(lock)
            here = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (here.st_dev, here.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released it and removed this file between our open and our lock: again
    raise OutputError(f"output {output}: could not lock {lock} (it keeps being replaced); try again")


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
    return atomic_stream(path, lambda f: torch.save(payload, f))


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
