"""Why mixing works: the confidence gap of g and h (paper Section 5.1.2, Table 1) and local Lipschitz
estimates of h's probabilities (Appendix C.3).

- ``confidence_gap_table``: for each model, on clean, PGD-20 and AutoAttack-style inputs (each
  model attacked on its own), the accuracy and the mean / median gap between the top two
  probabilities over correctly and over incorrectly predicted inputs. The AutoAttack inputs follow
  Appendix D.2: the two APGD components (APGD-CE and, with at least 4 classes, targeted APGD-DLR)
  in minimum-margin mode, keeping, per input, the point with the smallest probability margin.
  A model with an ``attack_source`` (e.g. :class:`~adasmooth.mixing.nonlinear.TransformedModel`, h
  with the MixedNUTS map) is attacked through that source and judged on its own logits, so the
  table and histograms show the transformed h's gap on the points that attack h.
- ``lipschitz_analysis``: Eq. C.1 per input and class, and how often Theorem 3.5's radius with these
  local constants reaches eps (for several alphas), among inputs h classifies correctly.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import APGD, PGD, APGDTargeted
from ..attacks.apgd import N_TARGET_CLASSES
from ..core.errors import ConfigError, InputError
from ..core.plotting import pyplot, save_figure
from ..certify.lipschitz import estimate_local_lipschitz, estimated_radius

__all__ = [
    "SETTINGS",
    "confidence_gap",
    "gap_statistics",
    "attack_for_gap",
    "autoattack_mode",
    "confidence_gap_table",
    "lipschitz_analysis",
    "plot_gap_histograms",
    "plot_lipschitz_histogram",
]

SETTINGS = ("clean", "pgd20", "autoattack")


def confidence_gap(logits: torch.Tensor) -> torch.Tensor:
    """p_(1) - p_(2): the gap between the two largest softmax probabilities, (N,)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InputError(f"expected (N, C) logits with C >= 2, got {tuple(logits.shape)}")
    top2 = F.softmax(logits.float(), 1).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).to(logits.dtype)


def _mean_median(values: np.ndarray) -> tuple[float | None, float | None]:
    if values.size == 0:
        return None, None
    return float(values.mean()), float(np.median(values))


def gap_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy (%) and mean / median confidence gap over correct and over incorrect predictions."""
    if labels.shape != (logits.shape[0],):
        raise InputError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    gap = confidence_gap(logits).detach().cpu().numpy()
    correct = (logits.argmax(1) == labels.to(logits.device)).cpu().numpy()
    mean_ok, median_ok = _mean_median(gap[correct])
    mean_bad, median_bad = _mean_median(gap[~correct])
    return {
        "accuracy": 100.0 * float(correct.mean()),
        "n": int(correct.size),
        "n_correct": int(correct.sum()),
        "gap_correct_mean": mean_ok,
        "gap_correct_median": median_ok,
        "gap_incorrect_mean": mean_bad,
        "gap_incorrect_median": median_bad,
    }


AUTOATTACK_MODE = "APGD-CE + APGD-T (DLR), minimum-margin mode"


def autoattack_mode() -> str:
    """How the ``autoattack`` column is computed (recorded in the results)."""
    return AUTOATTACK_MODE


def attack_for_gap(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    setting: str,
    eps: float,
    norm: str = "linf",
    seed: int = 0,
    aa_steps: int = 100,
) -> torch.Tensor:
    """The inputs of one Table 1 column: ``clean``, ``pgd20`` (CE, 20 steps, step 2.5 eps / 20) or
    ``autoattack`` (smallest-margin point of the APGD components, Appendix D.2)."""
    if setting == "clean":
        return x
    if setting == "pgd20":
        return PGD(model, eps, norm, steps=20, loss="ce", seed=seed)(x, y)
    if setting != "autoattack":
        raise ConfigError(f"unknown setting {setting!r}; use one of {SETTINGS}")
    x_adv, margin = APGD(model, eps, norm, steps=aa_steps, loss="ce", seed=seed,
                         minimum_margin=True).attack_with_margins(x, y)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    if num_classes < 4:  # the targeted DLR loss needs 4 classes
        return x_adv
    targeted = APGDTargeted(model, eps, norm, steps=aa_steps, seed=seed, minimum_margin=True,
                            n_target_classes=min(N_TARGET_CLASSES, num_classes - 1))
    x_t, margin_t = targeted.attack_with_margins(x, y)
    smaller = margin_t < margin
    return torch.where(smaller.view(-1, *([1] * (x.dim() - 1))), x_t, x_adv)


def confidence_gap_table(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    settings: Sequence[str] = SETTINGS,
    batch_size: int = 256,
    seed: int = 0,
    aa_steps: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Table 1: rows {model, setting, accuracy, gap means / medians}, and the raw gaps for histograms."""
    from ..core.progress import progress_bar

    for s in settings:
        if s not in SETTINGS:
            raise ConfigError(f"unknown setting {s!r}; use one of {SETTINGS}")
    rows, raw = [], {}
    total = len(models) * len(settings) * math.ceil(x.shape[0] / batch_size)
    bar = progress_bar(total=total, desc="confidence gap", disable=not progress, leave=False)
    try:
        for name, model in models.items():
            raw[name] = {}
            for setting in settings:
                logits = []
                for start in range(0, x.shape[0], batch_size):
                    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                    source = getattr(model, "attack_source", model)  # the map's gradients are useless: attack h
                    xa = attack_for_gap(source, xb, yb, setting, eps, norm, seed=seed + start, aa_steps=aa_steps)
                    with torch.no_grad():
                        logits.append(model(xa))
                    bar.update(1)
                logits_t = torch.cat(logits)
                stats = gap_statistics(logits_t, y)
                rows.append({"model": name, "setting": setting, **stats})
                raw[name][setting] = {
                    "gap": confidence_gap(logits_t).cpu().tolist(),
                    "correct": (logits_t.argmax(1) == y.to(logits_t.device)).cpu().tolist(),
                }
    finally:
        bar.close()
    return {"rows": rows, "raw": raw, "eps": eps, "norm": norm, "autoattack_mode": autoattack_mode()}


def lipschitz_analysis(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    alphas: Sequence[float] = (0.6, 0.7, 0.8, 0.9, 1.0),
    steps: int = 20,
    restarts: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Appendix C.3 for model h: local Lipschitz constants within the eps-ball (Eq. C.1, PGD) and the
    fraction of inputs where h is correct and Theorem 3.5's estimated radius is >= eps, per alpha."""
    from ..core.progress import progress_bar

    lips, probs, preds = [], [], []
    for start in progress_bar(range(0, x.shape[0], batch_size), desc="local Lipschitz", disable=not progress,
                              leave=False):
        est = estimate_local_lipschitz(model, x[start:start + batch_size], eps, norm, steps=steps,
                                       restarts=restarts, seed=seed + start)
        lips.append(est.lipschitz)
        probs.append(est.probs)
        preds.append(est.predicted)
    from ..certify.lipschitz import LocalLipschitz

    est = LocalLipschitz(torch.cat(lips), torch.cat(probs), torch.cat(preds), float(eps), norm)
    correct = (est.predicted == y.to(est.predicted.device))
    per_alpha = []
    for alpha in alphas:
        radius = estimated_radius(est, alpha)
        reached = correct & (radius >= eps)
        per_alpha.append({
            "alpha": float(alpha),
            "robust_at_eps_pct": 100.0 * float(reached.float().mean()),
            "median_radius": float(radius.median()),
        })
    mean_lip = est.mean_lipschitz
    lip_y = est.lipschitz.gather(1, est.predicted[:, None]).squeeze(1)
    others = est.lipschitz.scatter(1, est.predicted[:, None], float("nan"))
    return {
        "eps": float(eps),
        "norm": norm,
        "steps": steps,
        "restarts": restarts,
        "n": int(x.shape[0]),
        "clean_accuracy": 100.0 * float(correct.float().mean()),
        "mean_lipschitz_eq_c1": float(mean_lip.mean()),
        "median_lipschitz_eq_c1": float(mean_lip.median()),
        "mean_lipschitz_predicted_class": float(lip_y.mean()),
        "mean_lipschitz_other_classes": float(torch.nanmean(others)),
        "mean_max_probability_change": float((est.lipschitz * eps).max(1).values.mean()),
        "per_alpha": per_alpha,
        "per_input_mean_lipschitz": mean_lip.cpu().tolist(),
    }


def plot_gap_histograms(result: Mapping[str, Any], path) -> None:
    """One panel per (model, setting): histograms of the gap over correct and incorrect predictions."""

    raw = result["raw"]
    names = list(raw)
    settings = list(next(iter(raw.values())))
    plt = pyplot()
    fig, axes = plt.subplots(len(names), len(settings), figsize=(3.6 * len(settings), 2.8 * len(names)), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for r, name in enumerate(names):
        for c, setting in enumerate(settings):
            ax = axes[r][c]
            gap = np.asarray(raw[name][setting]["gap"])
            ok = np.asarray(raw[name][setting]["correct"], dtype=bool)
            ax.hist(gap[ok], bins=bins, alpha=0.6, label=f"correct ({ok.sum()})")
            ax.hist(gap[~ok], bins=bins, alpha=0.6, label=f"incorrect ({(~ok).sum()})")
            ax.set_title(f"{name}, {setting}", fontsize=9)
            ax.set_xlabel("top-2 probability gap", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_lipschitz_histogram(result: Mapping[str, Any], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(result["per_input_mean_lipschitz"], bins=30)
    ax.set_xlabel(f"local Lipschitz constant (Eq. C.1), {result['norm']} eps={result['eps']}")
    ax.set_ylabel("inputs")
    ax.set_title(f"mean {result['mean_lipschitz_eq_c1']:.3f}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
