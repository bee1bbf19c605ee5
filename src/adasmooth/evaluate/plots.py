"""Plots shared by the commands and benchmarks (matplotlib with the Agg backend, imported lazily).

Importing this module does not import matplotlib: only drawing does, so the library and the CLI
start fast and work on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.plotting import pyplot, save_figure

__all__ = ["pyplot", "save_figure", "plot_curves", "plot_accuracy_vs_alpha", "plot_tradeoff"]


def plot_curves(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    hlines: Mapping[str, float] | None = None,
    points: Mapping[str, tuple[float, float]] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One line per entry of ``curves`` (label -> (xs, ys)), dashed horizontal reference lines
    (label -> y) and single labelled points (label -> (x, y))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3.5, label=label)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle=styles[i % len(styles)], color=f"C{(i + len(curves)) % 10}", linewidth=1.2,
                   label=label)
    for i, (label, (px, py)) in enumerate((points or {}).items()):
        ax.scatter([px], [py], marker="*", s=90, zorder=3, color=f"C{(i + len(curves)) % 10}", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_accuracy_vs_alpha(
    rows: Sequence[Mapping[str, Any]],
    reference: Mapping[str, float],
    path: str | Path,
    variant: str = "prob",
    title: str | None = None,
) -> Path:
    """Figure 4 of the paper: clean / STD / ROB / MIX accuracy of h_alpha against alpha, with g and
    h alone as horizontal lines."""
    rows = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["alpha"])
    if not rows:
        raise ValueError(f"no sweep rows for variant {variant!r}")
    alphas = [r["alpha"] for r in rows]
    curves = {
        "h_alpha, clean": (alphas, [r["clean_acc"] for r in rows]),
        "h_alpha, STD attack": (alphas, [r["std_attack_acc"] for r in rows]),
        "h_alpha, ROB attack": (alphas, [r["rob_attack_acc"] for r in rows]),
        "h_alpha, MIX attack": (alphas, [r["mix_attack_acc"] for r in rows]),
    }
    hlines = {
        "g, clean": reference["g_clean_acc"],
        "h, clean": reference["h_clean_acc"],
        "g, STD attack": reference["g_std_attack_acc"],
        "h, ROB attack": reference["h_rob_attack_acc"],
    }
    return plot_curves(path, curves, "alpha", "accuracy (%)", title=title, hlines=hlines, ylim=(-2, 102))


def plot_tradeoff(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    reference: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    attacked_key: str = "mix_attack_acc",
    title: str | None = None,
) -> Path:
    """Figures 1 and 5: attacked against clean accuracy, one curve per mixing variant (alpha
    runs along each curve); g and h alone as points."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if not variants:
        raise ValueError("no sweep rows to plot")
    curves = {}
    for v in variants:
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["alpha"])
        curves[(labels or {}).get(v, v)] = ([r["clean_acc"] for r in rs], [r[attacked_key] for r in rs])
    points = None
    if reference is not None:
        points = {
            "g alone": (reference["g_clean_acc"], reference["g_std_attack_acc"]),
            "h alone": (reference["h_clean_acc"], reference["h_rob_attack_acc"]),
        }
    return plot_curves(path, curves, "clean accuracy (%)", "attacked accuracy (%)", title=title, points=points)
