"""Certified-accuracy plots (matplotlib on the Agg backend, imported only when drawing)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..core.plotting import pyplot as _pyplot
from ..core.plotting import save_figure as _save

__all__ = ["plot_certified_curves", "plot_frontier"]


def plot_certified_curves(
    path,
    radii: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    clean: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Certified accuracy (%) against the l_2 radius, one line per entry; clean accuracies as open
    circles at radius 0 (the curves' discontinuities, as in Figures 6-7)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(list(radii), list(ys), color=f"C{i % 10}", label=label, linestyle="--" if "Lip" in label else "-")
    for i, (label, acc) in enumerate((clean or {}).items()):
        ax.scatter([0.0], [acc], facecolors="none", edgecolors=f"C{(i + len(curves)) % 10}", s=60, zorder=3,
                   label=f"clean, {label}")
    ax.set_xlabel("l_2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_frontier(path, frontier: Mapping, title: str | None = None) -> Path:
    """Figure 6: the baseline smoothed model, every (sigma, alpha) mixture at its clean accuracy, and
    their pointwise maximum (the Pareto frontier)."""
    radii = frontier["radii"]
    curves = {f"RS sigma={frontier['baseline']['sigma']} alone": frontier["baseline"]["certified_accuracy"]}
    for c in frontier["candidates"]:
        curves[f"mixed, sigma={c['sigma']}, alpha={c['alpha']:.3g} (clean {c['clean_accuracy']:.1f}%)"] = c["certified_accuracy"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(radii, ys, color=f"C{i % 10}", label=label, linewidth=1.2)
    ax.plot(radii, frontier["frontier"], color="k", linestyle=":", linewidth=2.2, label="Pareto frontier")
    ax.scatter([0.0], [frontier["target_clean_accuracy"]], facecolors="none", edgecolors="k", s=60, zorder=3,
               label="clean accuracy (all)")
    ax.set_xlabel("l_2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or f"equal clean accuracy {frontier['target_clean_accuracy']:.1f}%, bound: {frontier['bound']}",
                 fontsize=9)
    return _save(fig, path)
