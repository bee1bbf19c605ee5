"""Progress bars: tqdm on a terminal, periodic log lines anywhere else.

A tqdm bar redraws its line with carriage returns; written to a log file or a CI console that is a
stream of half-lines. :func:`progress_bar` is the one place the library makes a bar: where stderr is a
terminal (or a notebook) it is tqdm's own, elsewhere it is a tqdm that never writes to a stream and
instead logs one line (``adasmooth.progress`` logger, level INFO) at most every ``log_every`` seconds,
plus one when the bar completes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm

__all__ = ["progress_bar", "LoggedProgress", "LOG_EVERY_S", "on_terminal"]

_log = logging.getLogger("adasmooth.progress")

LOG_EVERY_S = 30.0  # seconds between two log lines of one bar


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stderr) redraws lines: a terminal, or a Jupyter kernel's output."""
    stream = sys.stderr if stream is None else stream
    if "ipykernel" in sys.modules and type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Discard:
    """A write-only stream that keeps nothing (tqdm's clean-up writes go here)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class LoggedProgress(plain_tqdm):
    """A tqdm whose every redraw becomes at most one log line per ``log_every`` seconds."""

    def __init__(self, *args: Any, log_every: float = LOG_EVERY_S, **kwargs: Any) -> None:
        self._log_every = float(log_every)
        self._logged_n: float | None = None
        self._logged_at = float("-inf")
        kwargs["file"] = _Discard()
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("mininterval", min(self._log_every, 0.1))
        super().__init__(*args, **kwargs)

    def _log_line(self) -> None:
        self._logged_at, self._logged_n = time.monotonic(), self.n
        _log.info("%s", self.format_meter(**{**self.format_dict, "ncols": 0}))

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line on close: nothing to clear in a log
            return True
        finished = self.total is not None and self.n >= self.total
        due = time.monotonic() - self._logged_at >= self._log_every
        if self.n != self._logged_n and (due or finished):
            self._log_line()
        return True

    def close(self) -> None:
        if not self.disable and self.n != self._logged_n:
            self._log_line()  # the last state, whatever the interval
        super().close()


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, log_every: float = LOG_EVERY_S,
                 **kwargs: Any):
    """A progress bar with tqdm's interface (``update``, ``set_postfix``, iteration, ``close``).

    On a terminal: tqdm (``tqdm.auto``). Elsewhere (a pipe, a file, CI): :class:`LoggedProgress`,
    one INFO line on the ``adasmooth.progress`` logger at most every ``log_every`` seconds.
    ``disable=True`` shows nothing either way.
    """
    if disable or on_terminal():
        return auto_tqdm(iterable, disable=disable, **kwargs)
    return LoggedProgress(iterable, log_every=log_every, **kwargs)
