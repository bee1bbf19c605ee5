"""matplotlib on the Agg backend, imported only when something is drawn, and the one PNG writer.

Importing this module does not import matplotlib, so the library and the CLI start fast and work on
machines without a display.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save and close ``fig`` atomically, so an interrupted run never leaves half a PNG."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt))
    finally:
        pyplot().close(fig)
    return path
