"""The error families of adasmooth.

Every error a user can cause is one of these, with a one-line message that names the value or the
file and what was expected. The command line prints the message and exits with code 2; anything
else is a bug and shows a traceback. They subclass ValueError so that library callers who catch
ValueError for bad arguments keep working.
"""

from __future__ import annotations

__all__ = ["AdasmoothError", "ConfigError", "InputError", "DataError", "CheckpointError", "MissingDependencyError",
           "OutputError", "DivergedError"]


class AdasmoothError(ValueError):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(AdasmoothError):
    """An option or config-file value is unknown, ill-typed or out of range."""


class InputError(AdasmoothError):
    """A tensor, label, radius or other argument handed to a library function is unusable."""


class DataError(AdasmoothError, FileNotFoundError):
    """A data file is missing or corrupt; the message names the file and where it was looked for."""


class CheckpointError(AdasmoothError, FileNotFoundError):
    """A checkpoint, sidecar or resume file is missing, truncated or does not fit the model."""


class MissingDependencyError(AdasmoothError, ImportError):
    """An optional package the run needs does not import; the message says how to install it."""


class OutputError(AdasmoothError, OSError):
    """An output cannot be written: the disk is full, or another process is writing the same file.

    Raised after the write was undone: no partial or temporary file is left, earlier files are unchanged.
    """


class DivergedError(AdasmoothError, FloatingPointError):
    """Training diverged: the loss became NaN or infinite (usually a learning rate too large)."""
