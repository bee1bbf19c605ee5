"""One certification run over a data set: smoothed models alone (Cohen et al.) and mixed with a
standard model g, with TSV / JSON / PNG outputs. Shared by ``adasmooth certify`` and the benchmark.

Outputs for ``prefix`` (each smoothed model gets a ``_sigma<S>`` tag):
- ``<prefix>_sigma<S>.tsv``: Cohen's layout (idx label predict radius correct time), written per input;
- ``<prefix>_sigma<S>_counts.json``: the Monte Carlo counts, rewritten every few inputs (a killed run
  keeps them, and every certificate can be recomputed from them);
- ``<prefix>_sigma<S>_mixed_alpha<A>.tsv``: per-input mixed certificates;
- ``<prefix>.json`` (written by the caller, e.g. with ``core.io.write_result``) and ``<prefix>_curves.png`` / ``<prefix>_frontier_<bound>.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from ..core.io import write_json, write_text
from .mixed import (
    STATISTICS_NOTE,
    SmoothingCounts,
    clean_accuracy,
    cohen_certificates,
    collect_counts,
    curve,
    mixed_certificates,
    pareto_frontier,
)
from .smoothing import ABSTAIN, Smooth, TsvLog, certified_accuracy

__all__ = ["certify_smoothed_models", "summary_rows"]


def _tag(value: float) -> str:
    return f"{value:g}"


def _write_mixed_tsv(path: Path, certs: Mapping[str, np.ndarray]) -> None:
    cols = ("idx", "label", "predict", "correct", "h_class", "p_lower", "p_other_upper", "radius_rs", "radius_lip")
    lines = ["\t".join(cols)]
    for i in range(len(certs["idx"])):
        lines.append("\t".join([
            str(int(certs["idx"][i])), str(int(certs["labels"][i])), str(int(certs["predict"][i])),
            str(int(certs["correct"][i])), str(int(certs["h_class"][i])), f"{certs['p_lower'][i]:.6f}",
            f"{certs['p_other_upper'][i]:.6f}", f"{certs['radius_rs'][i]:.4f}", f"{certs['radius_lip'][i]:.4f}",
        ]))
    write_text(path, "\n".join(lines) + "\n")


def certify_smoothed_models(
    models: Mapping[float, nn.Module],
    data: Any,
    num_classes: int,
    *,
    std_model: nn.Module | None = None,
    alphas: Sequence[float] = (),
    n0: int = 100,
    n: int = 100_000,
    alpha_conf: float = 0.001,
    batch_size: int = 1000,
    radii: Sequence[float] = tuple(np.round(np.arange(0, 1.55, 0.05), 4)),
    frontier_alphas: Sequence[float] = tuple(np.round(np.arange(0.5, 1.0001, 0.01), 4)),
    std_hardmax: bool = False,
    std_scale: float = 1.0,
    skip: int = 1,
    max_examples: int | None = None,
    prefix: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    flush_every: int = 10,
) -> tuple[dict[str, Any], dict[float, SmoothingCounts]]:
    """Certify each smoothed model (sigma -> base classifier) alone and, with ``std_model``, the mixture
    at each alpha; with two or more sigmas and a g, the Figure-6 frontier at the clean accuracy of the
    first sigma alone. Returns (results, counts by sigma); writes files when ``prefix`` is given."""
    if not models:
        raise InputError("give at least one smoothed model")
    for a in alphas:
        if not 0 <= a <= 1:
            raise InputError(f"mixing weights must lie in [0, 1], got {a}")
    if alphas and std_model is None:
        raise InputError("mixed certificates (alphas) need a standard model g")
    prefix = Path(prefix) if prefix is not None else None
    results: dict[str, Any] = {
        "n0": n0, "n": n, "alpha_conf": alpha_conf, "confidence": 1 - alpha_conf, "radii": list(radii),
        "statistics": STATISTICS_NOTE, "std_hardmax": std_hardmax, "std_scale": std_scale, "models": [],
    }
    all_counts: dict[float, SmoothingCounts] = {}
    for model_index, (sigma, model) in enumerate(models.items()):
        smooth = Smooth(model, num_classes, float(sigma), seed=seed + model_index)
        stem = None if prefix is None else prefix.with_name(f"{prefix.name}_sigma{_tag(sigma)}")
        tsv = TsvLog(stem.with_name(stem.name + ".tsv")) if stem is not None else None
        counts_file = stem.with_name(stem.name + "_counts.json") if stem is not None else None

        def on_example(counts: SmoothingCounts, tsv=tsv, counts_file=counts_file) -> None:
            if tsv is not None:
                (row,) = cohen_certificates(counts, alpha_conf, first=len(counts) - 1)
                tsv.add(row)
            if counts_file is not None and len(counts) % flush_every == 0:
                write_json(counts_file, counts.to_dict(), indent=None)

        start = time.perf_counter()
        counts = collect_counts(smooth, data, n0, n, batch_size, std_model=std_model, skip=skip,
                                max_examples=max_examples, device=device, progress=progress,
                                on_example=on_example)
        elapsed = time.perf_counter() - start
        if counts_file is not None:
            write_json(counts_file, counts.to_dict(), indent=None)
        all_counts[float(sigma)] = counts
        cohen_rows = cohen_certificates(counts, alpha_conf)
        alone = mixed_certificates(counts, 1.0, alpha_conf)
        entry: dict[str, Any] = {
            "sigma": float(sigma),
            "examples": len(counts),
            "seconds": elapsed,
            "noisy_samples_per_second": len(counts) * (n0 + n) / elapsed,
            "images_per_second": len(counts) / elapsed,
            "smoothed_clean_accuracy": clean_accuracy(alone),
            "cohen_certified_accuracy": [100.0 * v for v in certified_accuracy(cohen_rows, radii)],
            "cohen_abstain_pct": 100.0 * float(np.mean([r["predict"] == ABSTAIN for r in cohen_rows])),
            "h_alone_rs_certified_accuracy": curve(alone, radii, "rs"),
            "h_alone_lip_certified_accuracy": curve(alone, radii, "lip"),
            "mixed": [],
        }
        for alpha in alphas:
            certs = mixed_certificates(counts, alpha, alpha_conf, std_hardmax=std_hardmax, std_scale=std_scale)
            entry["mixed"].append({
                "alpha": float(alpha),
                "clean_accuracy": clean_accuracy(certs),
                "rs_certified_accuracy": curve(certs, radii, "rs"),
                "lip_certified_accuracy": curve(certs, radii, "lip"),
            })
            if stem is not None:
                _write_mixed_tsv(stem.with_name(f"{stem.name}_mixed_alpha{_tag(alpha)}.tsv"), certs)
        results["models"].append(entry)
    if std_model is not None and len(models) >= 2:
        first = float(next(iter(models)))
        results["frontier"] = {
            bound: pareto_frontier(all_counts, first, radii, alpha_conf, frontier_alphas, bound=bound,
                                   std_hardmax=std_hardmax, std_scale=std_scale)
            for bound in ("rs", "lip")
        }
    if prefix is not None:
        _plot(results, prefix)
    return results, all_counts


def _plot(results: Mapping[str, Any], prefix: Path) -> None:
    from .plots import plot_certified_curves, plot_frontier

    curves, clean = {}, {}
    for m in results["models"]:
        s = m["sigma"]
        curves[f"RS sigma={s} (Cohen)"] = m["cohen_certified_accuracy"]
        clean[f"RS sigma={s}"] = m["smoothed_clean_accuracy"]
        for mix in m["mixed"]:
            curves[f"mixed sigma={s} alpha={mix['alpha']:g}, Thm A.2"] = mix["rs_certified_accuracy"]
            curves[f"mixed sigma={s} alpha={mix['alpha']:g}, Lip (Thm 3.5)"] = mix["lip_certified_accuracy"]
            clean[f"mixed sigma={s} alpha={mix['alpha']:g}"] = mix["clean_accuracy"]
    title = f"n={results['n']}, n0={results['n0']}, confidence {100 * results['confidence']:.2f}% (simultaneous CP)"
    plot_certified_curves(prefix.with_name(prefix.name + "_curves.png"), results["radii"], curves, clean, title)
    for bound, front in results.get("frontier", {}).items():
        plot_frontier(prefix.with_name(f"{prefix.name}_frontier_{bound}.png"), front)


def summary_rows(results: Mapping[str, Any], show_radii: Sequence[float]) -> list[dict[str, Any]]:
    """Rows for ``core.io.format_table``: clean and certified accuracy (%) at ``show_radii``."""
    radii = list(results["radii"])

    def at(values):
        out = {}
        for r in show_radii:
            idx = int(np.argmin(np.abs(np.asarray(radii) - r)))
            if abs(radii[idx] - r) > 1e-6:
                raise InputError(f"radius {r} is not among the certified radii")
            out[f"r={r:g}"] = values[idx]
        return out

    rows = []
    for m in results["models"]:
        s = m["sigma"]
        rows.append({"classifier": f"RS sigma={s:g} (Cohen)", "clean": m["smoothed_clean_accuracy"],
                     **at(m["cohen_certified_accuracy"])})
        for mix in m["mixed"]:
            for bound, key in (("A.2", "rs_certified_accuracy"), ("3.5", "lip_certified_accuracy")):
                rows.append({"classifier": f"mixed sigma={s:g} alpha={mix['alpha']:g} Thm {bound}",
                             "clean": mix["clean_accuracy"], **at(mix[key])})
    for bound, front in results.get("frontier", {}).items():
        for c in front["candidates"]:
            rows.append({"classifier": f"frontier[{bound}] sigma={c['sigma']:g} alpha={c['alpha']:g}",
                         "clean": c["clean_accuracy"], **at(c["certified_accuracy"])})
        rows.append({"classifier": f"Pareto frontier [{bound}]", "clean": front["target_clean_accuracy"],
                     **at(front["frontier"])})
    return rows
