"""One certification run over a data set: smoothed models alone (Cohen et al.) and mixed with a
standard model g, with TSV / JSON / PNG outputs. Shared by ``adasmooth certify`` and the benchmark.

Two steps: counting (``mixed.count_inputs``: network queries, one record per input, any subset of
inputs, in any process) and ``certification_results`` (every certificate, curve, frontier and file
from the final counts, no network query). ``certify_smoothed_models`` runs both in one process; the
``certify`` command journals the counting and runs the second step once all inputs are counted.

Outputs for ``prefix`` (each smoothed model gets a ``_sigma<S>`` tag):
- ``<prefix>_sigma<S>.tsv``: Cohen's layout (idx label predict radius correct time); written per input
  by ``certify_smoothed_models``, and whole by ``certification_results``;
- ``<prefix>_sigma<S>_counts.json``: the Monte Carlo counts (every certificate can be recomputed from
  them), rewritten every few inputs by ``certify_smoothed_models`` so that a killed run keeps them;
- ``<prefix>_sigma<S>_mixed_alpha<A>.tsv``: per-input mixed certificates;
- ``<prefix>.json`` (written by the caller, e.g. with ``core.io.write_result``) and ``<prefix>_curves.png`` / ``<prefix>_frontier_<bound>.png``.
"""

from __future__ import annotations

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
    count_inputs,
    curve,
    mixed_certificates,
    pareto_frontier,
)
from .smoothing import ABSTAIN, Smooth, TsvLog, certified_accuracy

__all__ = ["certification_results", "certify_smoothed_models", "smoothed_classifiers", "summary_rows"]


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


DEFAULT_RADII = tuple(np.round(np.arange(0, 1.55, 0.05), 4))
DEFAULT_FRONTIER_ALPHAS = tuple(np.round(np.arange(0.5, 1.0001, 0.01), 4))
TIMING_NOTE = (
    "seconds is the sum of the per-input counting times of that sigma (compute time, each including g's "
    "forward pass; summed over the processes of a sharded run and over the runs of a resumed one), not wall "
    "time; noisy_samples_per_second and images_per_second are per that time"
)


def smoothed_classifiers(models: Mapping[float, nn.Module], num_classes: int, seed: int = 0) -> dict[float, Smooth]:
    """One ``Smooth`` per sigma; the k-th model's noise is seeded by ``seed + k`` (and each input's index)."""
    return {float(sigma): Smooth(model, num_classes, float(sigma), seed=seed + k)
            for k, (sigma, model) in enumerate(models.items())}


def _check_alphas(alphas: Sequence[float], has_std: bool) -> None:
    for a in alphas:
        if not 0 <= a <= 1:
            raise InputError(f"mixing weights must lie in [0, 1], got {a}")
    if alphas and not has_std:
        raise InputError("mixed certificates (alphas) need a standard model g")


def _stem(prefix: Path, sigma: float) -> Path:
    return prefix.with_name(f"{prefix.name}_sigma{_tag(sigma)}")


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
    radii: Sequence[float] = DEFAULT_RADII,
    frontier_alphas: Sequence[float] = DEFAULT_FRONTIER_ALPHAS,
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
    """Count (``count_inputs``) and certify (``certification_results``) in one process: each smoothed
    model (sigma -> base classifier) alone and, with ``std_model``, the mixture at each alpha. Returns
    (results, counts by sigma); writes files when ``prefix`` is given, the Cohen TSVs row by row and the
    counts every ``flush_every`` inputs while counting, so an interrupted run keeps them."""
    if not models:
        raise InputError("give at least one smoothed model")
    _check_alphas(alphas, std_model is not None)
    prefix = Path(prefix) if prefix is not None else None
    on_input = None
    if prefix is not None:
        tsvs = {float(s): TsvLog(_stem(prefix, s).with_name(_stem(prefix, s).name + ".tsv")) for s in models}

        def on_input(record: Mapping[str, Any], counts_by_sigma: Mapping[float, SmoothingCounts]) -> None:
            for sigma, counts in counts_by_sigma.items():
                (row,) = cohen_certificates(counts, alpha_conf, first=len(counts) - 1)
                tsvs[sigma].add(row)
                if len(counts) % flush_every == 0:
                    write_json(_counts_file(prefix, sigma), counts.to_dict(), indent=None)

    all_counts = count_inputs(smoothed_classifiers(models, num_classes, seed), data, n0, n, batch_size,
                              std_model=std_model, skip=skip, max_examples=max_examples, device=device,
                              progress=progress, on_input=on_input)
    results = certification_results(all_counts, alphas=alphas, alpha_conf=alpha_conf, radii=radii,
                                    frontier_alphas=frontier_alphas, std_hardmax=std_hardmax, std_scale=std_scale,
                                    prefix=prefix)
    return results, all_counts


def _counts_file(prefix: Path, sigma: float) -> Path:
    stem = _stem(prefix, sigma)
    return stem.with_name(stem.name + "_counts.json")


def certification_results(
    counts_by_sigma: Mapping[float, SmoothingCounts],
    *,
    alphas: Sequence[float] = (),
    alpha_conf: float = 0.001,
    radii: Sequence[float] = DEFAULT_RADII,
    frontier_alphas: Sequence[float] = DEFAULT_FRONTIER_ALPHAS,
    std_hardmax: bool = False,
    std_scale: float = 1.0,
    prefix: str | Path | None = None,
) -> dict[str, Any]:
    """Every result from final counts (no network query): Cohen certificates of each smoothed model,
    the mixture at each alpha, and with two or more sigmas and g's logits, the Figure-6 frontier at the
    clean accuracy of the first sigma alone. With ``prefix``, writes the Cohen and mixed TSVs, the
    counts JSONs and the PNGs (the results JSON is the caller's)."""
    if not counts_by_sigma:
        raise InputError("give the counts of at least one smoothed model")
    has_std = all(len(c.std_logits) for c in counts_by_sigma.values())
    _check_alphas(alphas, has_std)
    prefix = Path(prefix) if prefix is not None else None
    first_counts = next(iter(counts_by_sigma.values()))
    results: dict[str, Any] = {
        "n0": first_counts.n0, "n": first_counts.n, "alpha_conf": alpha_conf, "confidence": 1 - alpha_conf,
        "radii": list(radii), "statistics": STATISTICS_NOTE, "std_hardmax": std_hardmax, "std_scale": std_scale,
        "timing": TIMING_NOTE, "models": [],
    }
    for sigma, counts in counts_by_sigma.items():
        cohen_rows = cohen_certificates(counts, alpha_conf)
        alone = mixed_certificates(counts, 1.0, alpha_conf)
        seconds = float(sum(counts.seconds))
        entry: dict[str, Any] = {
            "sigma": float(sigma),
            "examples": len(counts),
            "seconds": seconds,
            "noisy_samples_per_second": len(counts) * (counts.n0 + counts.n) / seconds if seconds > 0 else None,
            "images_per_second": len(counts) / seconds if seconds > 0 else None,
            "smoothed_clean_accuracy": clean_accuracy(alone),
            "cohen_certified_accuracy": [100.0 * v for v in certified_accuracy(cohen_rows, radii)],
            "cohen_abstain_pct": 100.0 * float(np.mean([r["predict"] == ABSTAIN for r in cohen_rows])),
            "h_alone_rs_certified_accuracy": curve(alone, radii, "rs"),
            "h_alone_lip_certified_accuracy": curve(alone, radii, "lip"),
            "mixed": [],
        }
        stem = None if prefix is None else _stem(prefix, sigma)
        if prefix is not None:
            TsvLog(stem.with_name(stem.name + ".tsv")).extend(cohen_rows)
            write_json(_counts_file(prefix, sigma), counts.to_dict(), indent=None)
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
    if has_std and len(counts_by_sigma) >= 2:
        first = float(next(iter(counts_by_sigma)))
        results["frontier"] = {
            bound: pareto_frontier(counts_by_sigma, first, radii, alpha_conf, frontier_alphas, bound=bound,
                                   std_hardmax=std_hardmax, std_scale=std_scale)
            for bound in ("rs", "lip")
        }
    if prefix is not None:
        _plot(results, prefix)
    return results


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
