"""Training-free calibration of the nonlinear (MixedNUTS) rule, :mod:`adasmooth.mixing.nonlinear`.

- :func:`robust_margin_logits`: h's logits on attacked correctly classified and on clean misclassified inputs.
- :func:`spca_objective`: for one (s, c, p), the cutoff (the (100 - beta) percentile of the attacked
  margins), alpha = 1 / (1 + cutoff), and the share of clean-misclassified margins at or above it.
- :func:`grid_search_nonlinear`: the (s, c, p) grid (s log-spaced) for a share beta of h's robust accuracy.
- :func:`calibrate_nonlinear_to_accuracy`: the same grid at a target clean accuracy.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, InputError
from ..data import Dataset
from ..mixing.nonlinear import TOP_K, NonlinearParams, nonlinear_map, nonlinear_mix_log_probs
from ..core.search import bisect_decreasing

__all__ = ["robust_margin_logits", "probability_margins", "spca_objective", "nonlinear_grid", "grid_search_nonlinear",
           "calibrate_nonlinear_to_accuracy"]


def robust_margin_logits(rob_model: nn.Module, data: Dataset, eps: float, norm: str = "linf",
                         apgd_steps: int = 100, batch_size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """h's logits on (a) the inputs it classifies correctly, at the smallest-margin point APGD-CE and
    APGD-T found (kept where h is still correct there), and (b) the clean inputs it misclassifies."""
    from .analysis import attack_for_gap  # APGD-CE + APGD-T in minimum-margin mode, Appendix D.2

    rob_model.eval()
    device = next(rob_model.parameters()).device
    attacked, wrong = [], []
    for b, (x, y) in enumerate(data.batches(batch_size)):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            clean = rob_model(x)
        ok = clean.argmax(1) == y
        wrong.append(clean[~ok])
        if ok.any():
            x_adv = attack_for_gap(rob_model, x[ok], y[ok], "autoattack", eps, norm, seed=seed + b, aa_steps=apgd_steps)
            with torch.no_grad():
                logits = rob_model(x_adv)
            attacked.append(logits[logits.argmax(1) == y[ok]])
    wrong_t = torch.cat(wrong)
    return (torch.cat(attacked) if attacked else wrong_t[:0]), wrong_t


def probability_margins(logits: torch.Tensor) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per row, in float64 (numpy)."""
    top2 = F.softmax(logits.double(), dim=1).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).cpu().numpy()


def spca_objective(attacked_margins: np.ndarray, clean_wrong_margins: np.ndarray,
                   beta: float) -> tuple[float, float, float]:
    """(objective, cutoff, alpha) of one map: the cutoff is the (100 - beta) percentile of the attacked
    margins (so a share beta of h's robust inputs keep a margin above it), alpha = 1 / (1 + cutoff)
    (where alpha * margin > 1 - alpha, g's hardmax vote cannot flip h), and the objective is the share of
    h's clean errors whose margin reaches the cutoff (errors that g can no longer repair): lower is better."""
    if len(attacked_margins) == 0:
        raise InputError("no attacked input kept h correct: the margins to calibrate on are empty")
    # Margins within rounding of 1 would give alpha = 1/2 with no room left for g: keep the cutoff below 1.
    cutoff = float(min(np.percentile(attacked_margins, 100.0 - beta), 1.0 - 1e-9))
    objective = float(np.mean(clean_wrong_margins >= cutoff)) if len(clean_wrong_margins) else 0.0
    return objective, cutoff, 1.0 / (1.0 + cutoff)


def nonlinear_grid(size: int = 8, s_range: Sequence[float] = (0.05, 5.0), c_range: Sequence[float] = (-1.1, 0.0),
                   p_range: Sequence[float] = (1.0, 4.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (s, c, p) grid: s log-spaced, c and p evenly spaced, ``size`` values each (the authors' 8;
    default ranges are their CIFAR-10 initial guess)."""
    if size < 1:
        raise ConfigError(f"grid size must be >= 1, got {size}")
    for name, r in (("s_range", s_range), ("c_range", c_range), ("p_range", p_range)):
        if len(r) != 2 or not all(np.isfinite(r)) or r[0] > r[1]:
            raise ConfigError(f"{name} must be two finite numbers LOW,HIGH with LOW <= HIGH, got {list(r)}")
    if s_range[0] <= 0 or p_range[0] <= 0:
        raise ConfigError(f"s and p must be > 0, got s_range {list(s_range)}, p_range {list(p_range)}")
    return (np.geomspace(s_range[0], s_range[1], size), np.linspace(c_range[0], c_range[1], size),
            np.linspace(p_range[0], p_range[1], size))


MarginFn = Callable[[float, float, float], tuple[np.ndarray, np.ndarray]]


def _map_margins(attacked: torch.Tensor, clean_wrong: torch.Tensor, top_k: int, activation: str) -> MarginFn:
    def margins(s: float, c: float, p: float):
        return tuple(probability_margins(nonlinear_map(t, s, c, p, top_k, activation)) if len(t) else np.empty(0)
                     for t in (attacked, clean_wrong))

    return margins


def grid_search_nonlinear(attacked_logits: torch.Tensor | None, clean_wrong_logits: torch.Tensor | None,
                          grid: tuple[np.ndarray, np.ndarray, np.ndarray], beta: float = 98.5, top_k: int = TOP_K,
                          activation: str = "gelu", margins: MarginFn | None = None) -> dict[str, Any]:
    """The (s, c, p) of ``grid`` with the lowest :func:`spca_objective`; ties go to the smallest alpha
    (the most room for g, and 1 - alpha furthest from rounding). ``margins(s, c, p) -> (attacked,
    clean-wrong)`` replaces the map on the two logit sets (tests plant objectives through it)."""
    if not 0 < beta <= 100:
        raise ConfigError(f"beta is a percentage in (0, 100], got {beta}")
    margins = margins or _map_margins(attacked_logits, clean_wrong_logits, top_k, activation)
    ss, cs, ps = grid
    objective = np.empty((len(ss), len(cs), len(ps)))
    alpha = np.empty_like(objective)
    for i, s in enumerate(ss):
        for j, c in enumerate(cs):
            for k, p in enumerate(ps):
                objective[i, j, k], _, alpha[i, j, k] = spca_objective(*margins(float(s), float(c), float(p)), beta)
    best = objective == objective.min()
    i, j, k = np.unravel_index(np.where(best, alpha, np.inf).argmin(), objective.shape)
    return {"s": float(ss[i]), "c": float(cs[j]), "p": float(ps[k]), "alpha": float(alpha[i, j, k]),
            "objective": float(objective[i, j, k]), "beta": beta, "top_k": top_k, "activation": activation,
            "grid": {"s": ss.tolist(), "c": cs.tolist(), "p": ps.tolist()}, "objectives": objective.tolist()}


@torch.no_grad()
def calibrate_nonlinear_to_accuracy(g: torch.Tensor, h: torch.Tensor, y: torch.Tensor, attacked_logits: torch.Tensor,
                                    grid: tuple[np.ndarray, np.ndarray, np.ndarray], target_acc: float,
                                    top_k: int = TOP_K, activation: str = "gelu") -> dict[str, Any]:
    """(s, c, p, alpha) reaching ``target_acc`` (%) clean on the cached logits (g, h, y), keeping the
    largest share of h's attacked-correct margins at or above the cutoff (1 - alpha) / alpha.

    For each grid point alpha is the largest one whose clean accuracy reaches the target (bisection,
    as for the fixed alpha); the point that keeps most of h's robust inputs out of g's reach wins
    (ties: the higher clean accuracy)."""
    if not 0 < target_acc <= 100:
        raise InputError(f"target_acc is a percentage in (0, 100], got {target_acc}")
    best: dict[str, Any] | None = None
    for s in grid[0]:
        for c in grid[1]:
            for p in grid[2]:
                params = NonlinearParams(s=float(s), c=float(c), p=float(p), top_k=top_k, activation=activation)

                def acc(a: float) -> float:
                    logits = nonlinear_mix_log_probs(g, h, torch.tensor(a, dtype=torch.float64), params)
                    return 100.0 * (logits.argmax(1) == y).float().mean().item()

                alpha, clean, reached = bisect_decreasing(acc, 0.0, 1.0, target_acc, iters=30)
                kept = probability_margins(nonlinear_map(attacked_logits, params.s, params.c, params.p, top_k,
                                                         activation)) if len(attacked_logits) else np.empty(0)
                cutoff = (1 - alpha) / alpha if alpha > 0 else np.inf
                share = 100.0 * float(np.mean(kept >= cutoff)) if len(kept) else 0.0
                key = (reached, share, clean)
                if best is None or key > best["_key"]:
                    best = {"_key": key, **params.as_dict(), "alpha": alpha, "clean_acc": clean, "reached": reached,
                            "robust_share": share}
    best.pop("_key")
    return {**best, "target_acc": target_acc}
