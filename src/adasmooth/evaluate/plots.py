"""Plots shared by the commands and benchmarks (matplotlib with the Agg backend, imported lazily).

Importing this module does not import matplotlib: only drawing does, so the library and the CLI
start fast and work on machines without a display.

The sweep's plots say what was attacked and how (``attack``, e.g. "PGD-20, linf, eps=0.2") and on how
many test images (``n_examples``); with ``n_examples`` they draw 95 % Wilson intervals, since on a few
hundred images one image is a visible fraction of a point.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Any, Mapping, Sequence

from ..core.errors import InputError
from ..core.plotting import pyplot, save_figure

__all__ = ["pyplot", "save_figure", "plot_curves", "plot_accuracy_vs_alpha", "plot_tradeoff", "wilson_interval",
           "describe_attack"]

# Reference-line labels closer than this fraction of the y range are pushed apart, so that two lines at
# nearly the same accuracy (g and h both ~97 % clean) keep readable labels.
_LABEL_GAP = 0.045


def wilson_interval(accuracy_pct: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (in %) of an accuracy of ``accuracy_pct`` % measured on ``n`` examples.

    With p = accuracy / 100 and z the normal quantile of (1 + confidence) / 2:
    (p + z^2 / 2n -/+ z * sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n). Unlike p -/+ z sqrt(p(1-p)/n)
    it stays inside [0, 100] and does not shrink to a point at 0 % or 100 %.
    """
    if n < 1:
        raise InputError(f"an interval needs n >= 1 examples, got {n}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    p = accuracy_pct / 100.0
    if not 0.0 <= p <= 1.0:
        raise InputError(f"accuracy must be in [0, 100] %, got {accuracy_pct}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def describe_attack(steps: int, norm: str, eps: float, name: str = "PGD") -> str:
    """The attack as plot titles name it, e.g. ``PGD-20, linf, eps=0.2``."""
    return f"{name}-{steps}, {norm}, eps={eps:g}"


def _spread_labels(ys: Sequence[float], gap: float) -> list[float]:
    """Label positions near ``ys`` (same order), at least ``gap`` apart."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        placed[i] = max(ys[i], last + gap)
        last = placed[i]
    return placed


def plot_curves(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    hlines: Mapping[str, float] | None = None,
    points: Mapping[str, tuple[float, float]] | None = None,
    ylim: tuple[float, float] | None = None,
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """One line per entry of ``curves`` (label -> (xs, ys)), with a shaded band per entry of ``bands``
    (label of a curve -> (lows, highs))); dashed horizontal reference lines (label -> y), each labelled at
    its right end (labels pushed apart where lines nearly coincide); single labelled points
    (label -> (x, y))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 4.8))
    for i, (label, (xs, ys)) in enumerate(curves.items()):
        ax.plot(list(xs), list(ys), marker="o", markersize=3.5, label=label, color=f"C{i % 10}")
        if bands and label in bands:
            lows, highs = bands[label]
            ax.fill_between(list(xs), list(lows), list(highs), color=f"C{i % 10}", alpha=0.15, linewidth=0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    styles = ["--", ":", "-.", (0, (5, 1))]
    lines = list((hlines or {}).items())
    y_low, y_high = ax.get_ylim()
    label_ys = _spread_labels([y for _, y in lines], _LABEL_GAP * (y_high - y_low))
    for i, ((label, y), label_y) in enumerate(zip(lines, label_ys)):
        color = f"C{(i + len(curves)) % 10}"
        ax.axhline(y, linestyle=styles[i % len(styles)], color=color, linewidth=1.2)
        ax.annotate(f"{label} {y:.1f}", xy=(1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(1.01, label_y), textcoords=("axes fraction", "data"), fontsize=7, color=color,
                    va="center", annotation_clip=False)
    for i, (label, (px, py)) in enumerate((points or {}).items()):
        ax.scatter([px], [py], marker="*", s=90, zorder=3, color=f"C{(i + len(curves)) % 10}", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def _title(head: str, attack: str | None, n_examples: int | None, interval_note: str) -> str:
    parts = [head]
    if attack:
        parts.append(f"attacks: {attack}")
    if n_examples:
        parts.append(f"n = {n_examples} test images; {interval_note}: 95 % Wilson intervals")
    return "\n".join(parts)


def plot_accuracy_vs_alpha(
    rows: Sequence[Mapping[str, Any]],
    reference: Mapping[str, float],
    path: str | Path,
    variant: str = "prob",
    title: str | None = None,
    attack: str | None = None,
    n_examples: int | None = None,
) -> Path:
    """Figure 4 of the paper: clean / STD / ROB / MIX accuracy of h_alpha against alpha, with g and
    h alone as horizontal lines. ``attack`` (see :func:`describe_attack`) and ``n_examples`` go into the
    title; with ``n_examples`` each curve gets its 95 % interval as a band."""
    rows = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["alpha"])
    if not rows:
        raise ValueError(f"no sweep rows for variant {variant!r}")
    alphas = [r["alpha"] for r in rows]
    keys = {
        "h_alpha, clean": "clean_acc",
        "h_alpha, STD attack (crafted on g)": "std_attack_acc",
        "h_alpha, ROB attack (crafted on h)": "rob_attack_acc",
        "h_alpha, MIX attack (on h_alpha)": "mix_attack_acc",
    }
    curves = {label: (alphas, [r[key] for r in rows]) for label, key in keys.items()}
    bands = None
    if n_examples:
        bands = {label: tuple(zip(*(wilson_interval(r[key], n_examples) for r in rows)))
                 for label, key in keys.items()}
    hlines = {
        "g clean": reference["g_clean_acc"],
        "h clean": reference["h_clean_acc"],
        "g, STD attack": reference["g_std_attack_acc"],
        "h, ROB attack": reference["h_rob_attack_acc"],
    }
    head = title or f"h_alpha = mix of g and h ({variant})"
    return plot_curves(path, curves, "alpha (weight of the robust model h)", "accuracy (%)",
                       title=_title(head, attack, n_examples, "bands"), hlines=hlines, ylim=(-2, 102), bands=bands)


def plot_tradeoff(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    reference: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    attacked_key: str = "mix_attack_acc",
    title: str | None = None,
    attack: str | None = None,
    n_examples: int | None = None,
) -> Path:
    """Figures 1 and 5: attacked against clean accuracy, one curve per mixing variant, its points drawn
    in alpha order and each labelled with its alpha (where clean accuracy is not monotone in alpha the
    curve turns back, and the labels show the order); g and h alone as points. With ``n_examples``
    every point gets 95 % intervals as error bars in both directions."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if not variants:
        raise ValueError("no sweep rows to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    labelled: list[tuple[float, float]] = []
    for i, v in enumerate(variants):
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["alpha"])
        xs, ys = [r["clean_acc"] for r in rs], [r[attacked_key] for r in rs]
        color = f"C{i % 10}"
        if n_examples:
            def spans(values):
                bounds = [wilson_interval(val, n_examples) for val in values]
                # max(0, ...): the interval contains the value, up to rounding
                return [[max(0.0, val - lo) for val, (lo, _) in zip(values, bounds)],
                        [max(0.0, hi - val) for val, (_, hi) in zip(values, bounds)]]
            ax.errorbar(xs, ys, xerr=spans(xs), yerr=spans(ys), fmt="none", ecolor=color, elinewidth=0.7,
                        capsize=1.5, alpha=0.35)
        ax.plot(xs, ys, marker="o", markersize=3.5, color=color, label=(labels or {}).get(v, v))
        for r, x, y in zip(rs, xs, ys):
            # where several variants share a point (alpha = 0 is g for all of them) label it once
            if any(abs(x - lx) < 0.05 and abs(y - ly) < 0.05 for lx, ly in labelled):
                continue
            labelled.append((x, y))
            ax.annotate(f"{r['alpha']:g}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6,
                        color=color)
    if reference is not None:
        for i, (label, (px, py)) in enumerate({
            "g alone": (reference["g_clean_acc"], reference["g_std_attack_acc"]),
            "h alone": (reference["h_clean_acc"], reference["h_rob_attack_acc"]),
        }.items()):
            ax.scatter([px], [py], marker="*", s=110, zorder=3, color=f"C{(i + len(variants)) % 10}", label=label)
    attacked = {"mix_attack_acc": "MIX-attacked", "std_attack_acc": "STD-attacked", "rob_attack_acc": "ROB-attacked",
                "worst_attack_acc": "worst-case attacked"}.get(attacked_key, attacked_key)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{attacked} accuracy (%)")
    head = title or f"{attacked} vs clean accuracy; numbers at the points: alpha"
    ax.set_title(_title(head, attack, n_examples, "bars"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)
