"""Calibration of mixed classifiers for a target clean accuracy (paper App. D.1).

- :func:`calibrate_adaptive`: the mixing network's eval-time shift (or alpha_min with a fixed range
  width) by bisection, keeping alpha as large (robust) as the target allows.
- :func:`calibrate_fixed_alpha`: the largest fixed alpha with the same clean accuracy.
- Training-free calibration of the nonlinear (MixedNUTS) rule, :mod:`adasmooth.mixing.nonlinear`:
  :func:`robust_margin_logits` (h's logits on attacked correct and on clean misclassified inputs),
  :func:`spca_objective`, :func:`grid_search_nonlinear` (the (s, c, p) grid for a share beta of
  h's robust accuracy) and :func:`calibrate_nonlinear_to_accuracy` (the same grid at a target
  clean accuracy).
- :class:`CalibrateConfig` / :func:`run_calibration`: the ``calibrate`` command: both, on held-out
  data, then optionally the Table 2/3 report (:mod:`adasmooth.evaluate.tables`); with
  ``--rule nonlinear`` also the MixedNUTS calibration, written as a fixed-mixture file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import check_attack_requirements
from ..core.config import data_dir_option, dataset_option, option, RunOptions
from ..core.errors import ConfigError, InputError
from ..core.runtime import resolve_device
from ..data import Dataset, load_dataset
from ..mixing import MixedClassifier, mix_logits
from ..mixing.adaptive import AdaptiveMixedClassifier, load_adaptive_classifier, save_adaptive_classifier
from ..mixing.fixed import save_fixed_mixture
from ..mixing.nonlinear import ACTIVATIONS, TOP_K, NonlinearParams, nonlinear_map, nonlinear_mix_log_probs, nonlinear_rule
from ..mixing.network import ranged_alpha
from ..models.checkpoint import checkpoint_paths, recorded_dataset, recorded_threat
from ..models.loader import load_model, model_info
from ..core.checks import check_counts, check_eps, check_finite
from ..train.loop import clean_accuracy
from .tables import REPORT_SETTINGS, report_attacks, report_table

__all__ = [
    "calibrate_adaptive",
    "calibrate_fixed_alpha",
    "fixed_alpha_classifier",
    "bisect_decreasing",
    "robust_margin_logits",
    "probability_margins",
    "spca_objective",
    "nonlinear_grid",
    "grid_search_nonlinear",
    "calibrate_nonlinear_to_accuracy",
    "calibrate_nonlinear",
    "CalibrateConfig",
    "run_calibration",
]


@torch.no_grad()
def _cached_outputs(model: AdaptiveMixedClassifier, data: Dataset, batch_size: int = 256):
    """g and h logits and the BN-normalised gamma of every example, computed once."""
    model.eval()
    device = next(model.mixing_net.parameters()).device
    gs, hs, zs, ys = [], [], [], []
    for x, y in data.batches(batch_size):
        g, h, first, second = model.base_outputs(x.to(device))
        zs.append(model.mixing_net.normalized_gamma(model.mixing_net.gamma(first, second)))
        gs.append(g)
        hs.append(h)
        ys.append(y.to(device))
    return torch.cat(gs), torch.cat(hs), torch.cat(zs), torch.cat(ys)


def bisect_decreasing(acc_of: Callable[[float], float], lo: float, hi: float, target: float,
                       iters: int = 40) -> tuple[float, float, bool]:
    """Largest value in [lo, hi] whose accuracy is >= target, for an accuracy falling with the value.

    Returns (value, accuracy, reached). ``reached`` is False when even ``lo`` falls short (then
    ``lo`` is returned). Accuracy is a step function and only roughly monotone, so the invariant
    acc(lo) >= target > acc(hi) is what bisection keeps.
    """
    acc_lo, acc_hi = acc_of(lo), acc_of(hi)
    if acc_hi >= target:
        return hi, acc_hi, True
    if acc_lo < target:
        return lo, acc_lo, False
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        acc_mid = acc_of(mid)
        if acc_mid >= target:
            lo, acc_lo = mid, acc_mid
        else:
            hi = mid
    return lo, acc_lo, True


def calibrate_adaptive(
    model: AdaptiveMixedClassifier,
    data: Dataset,
    target_acc: float,
    param: Literal["shift", "alpha_min"] = "shift",
    scale: float | None = None,
    alpha_range: tuple[float, float] | None = None,
    range_width: float | None = None,
    shift_bounds: tuple[float, float] = (-20.0, 20.0),
    batch_size: int = 256,
) -> dict[str, Any]:
    """Set the mixing network's eval shift (or alpha_min, with a fixed range width) so that the clean
    accuracy on ``data`` is as close to ``target_acc`` (%) from above as the data allow, keeping alpha
    as large (robust) as possible. Writes the result into the network's buffers; returns a summary.
    """
    net = model.mixing_net
    if not 0 < target_acc <= 100:
        raise InputError(f"target_acc is a percentage in (0, 100], got {target_acc}")
    if scale is not None or alpha_range is not None:
        net.set_eval_head(scale=scale, alpha_range=alpha_range)
    g, h, z, y = _cached_outputs(model, data, batch_size)
    eval_scale = float(net.eval_scale)

    def acc(shift: float, lo: float, hi: float) -> float:
        alpha, _ = ranged_alpha(z * eval_scale + shift, lo, hi)
        logits = model.mix_from_logits(g, h, alpha)  # Eq. 3.4, or the MixedNUTS mixture of a nonlinear model
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    if param == "shift":
        lo_a, hi_a = float(net.alpha_min), float(net.alpha_max)
        value, reached_acc, reached = bisect_decreasing(lambda s: acc(s, lo_a, hi_a), *shift_bounds, target_acc)
        net.set_eval_head(shift=value)
    elif param == "alpha_min":
        width = range_width if range_width is not None else float(net.alpha_max - net.alpha_min)
        if not 0 < width <= 1:
            raise InputError(f"range_width must be in (0, 1], got {width}")
        shift = float(net.eval_shift)
        value, reached_acc, reached = bisect_decreasing(lambda m: acc(shift, m, m + width), 0.0, 1.0 - width,
                                                         target_acc)
        net.set_eval_head(alpha_range=(value, value + width))
    else:
        raise InputError(f"param must be 'shift' or 'alpha_min', got {param!r}")
    alpha, _ = ranged_alpha(z * eval_scale + float(net.eval_shift), float(net.alpha_min), float(net.alpha_max))
    return {"param": param, "value": value, "clean_acc": reached_acc, "target_acc": target_acc,
            "reached": reached, "eval_head": net.eval_head(), "alpha_mean": alpha.mean().item(),
            "examples": len(data)}


@torch.no_grad()
def calibrate_fixed_alpha(std_model: nn.Module, rob_model: nn.Module, data: Dataset, target_acc: float,
                          std_scale: float = 1.0, rob_scale: float = 1.0, batch_size: int = 256) -> dict[str, Any]:
    """The largest fixed alpha whose mixed classifier keeps a clean accuracy >= ``target_acc`` (%)."""
    g, h, y = _base_logits(std_model, rob_model, data, batch_size)

    def acc(a: float) -> float:
        logits = mix_logits(g, h, torch.tensor(a, dtype=torch.float64), std_scale, rob_scale)
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    alpha, reached_acc, reached = bisect_decreasing(acc, 0.0, 1.0, target_acc)
    return {"alpha": alpha, "clean_acc": reached_acc, "target_acc": target_acc, "reached": reached,
            "examples": len(data)}


@torch.no_grad()
def _base_logits(std_model: nn.Module, rob_model: nn.Module, data: Dataset, batch_size: int = 256):
    """(g logits, h logits, labels) of every example of ``data``, both models in eval mode."""
    std_model.eval()
    rob_model.eval()
    device = next(std_model.parameters()).device
    gs, hs, ys = [], [], []
    for x, y in data.batches(batch_size):
        x = x.to(device)
        gs.append(std_model(x))
        hs.append(rob_model(x))
        ys.append(y.to(device))
    return torch.cat(gs), torch.cat(hs), torch.cat(ys)


def fixed_alpha_classifier(std_model: nn.Module, rob_model: nn.Module, alpha: float, std_scale: float = 1.0,
                           rob_scale: float = 1.0) -> MixedClassifier:
    """The fixed-alpha counterpart (Eq. 3.4) with the same base models and logit scales."""
    return MixedClassifier(std_model, rob_model, alpha, std_scale=std_scale, rob_scale=rob_scale).eval()


# ---------------------------------------------------------------------------- MixedNUTS: training-free


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


# ---------------------------------------------------------------------------- the calibrate command


@dataclass
class CalibrateConfig(RunOptions):
    mixnet: list[str] = option(help="adaptive classifier checkpoint(s) from train-mixnet (e.g. one per setting)",
                               default_factory=list)
    target_acc: float | None = option(None, help="clean accuracy (percent) to reach on the calibration data")
    target_between: float | None = option(None, help="or: target = acc(h) + this fraction of acc(g) - acc(h)")
    param: Literal["shift", "alpha_min"] = option("shift", help="what to tune: the sigmoid shift, or alpha_min "
                                                                "with a fixed range width")
    scale: float | None = option(None, help="eval-time sigmoid scale; none: keep the stored one")
    alpha_range: list[float] | None = option(None, help="eval-time alpha range MIN,MAX")
    range_width: float | None = option(None, help="alpha_max - alpha_min with param alpha_min")
    dataset: str | None = dataset_option()
    data_dir: str | None = data_dir_option()
    split: Literal["val", "test"] = option("val", help="calibration data: held-out part of the training set (val) "
                                                       "or a test slice")
    val_fraction: float = option(0.1, help="held-out part of the training set (split val)")
    calib_offset: int = option(0, help="first calibration example of the split")
    calib_examples: int | None = option(None, help="number of calibration examples; none: all")
    output: str | None = option(None, help="calibrated checkpoint (one input only); "
                                           "none: <checkpoint>-calibrated", short="-o")
    report: bool = option(False, help="also evaluate g, h, the adaptive and the fixed-alpha classifiers "
                                      "under settings A-D")
    report_settings: list[str] = option(help="columns of the report", default_factory=lambda: list(REPORT_SETTINGS))
    eval_examples: int = option(500, help="test examples in the report")
    eval_offset: int = option(0, help="first test example of the report")
    eps: float | None = option(None, help="attack radius of the report; none: the training eps")
    norm: Literal["linf", "l2"] | None = option(None, help="threat model of the report; none: the training one")
    batch_size: int = option(250, help="batch size")
    # MixedNUTS: training-free calibration of the nonlinear rule
    rule: Literal["prob", "nonlinear"] = option("prob", help="nonlinear: also calibrate the MixedNUTS map (s, c, p) "
                                                            "and alpha of a fixed mixture of std and rob")
    std: str | None = option(None, help="standard model g for rule nonlinear (default: the first mixnet's)")
    rob: str | None = option(None, help="robust model h for rule nonlinear (default: the first mixnet's)")
    beta: float = option(98.5, help="rule nonlinear: percentage of h's robust accuracy to keep")
    grid_size: int = option(8, help="rule nonlinear: values per axis of the (s, c, p) grid")
    s_range: list[float] = option(help="rule nonlinear: LOW,HIGH of the scale s (log-spaced)",
                                  default_factory=lambda: [0.05, 5.0])
    c_range: list[float] = option(help="rule nonlinear: LOW,HIGH of the shift c", default_factory=lambda: [-1.1, 0.0])
    p_range: list[float] = option(help="rule nonlinear: LOW,HIGH of the power p", default_factory=lambda: [1.0, 4.0])
    top_k: int = option(TOP_K, help="rule nonlinear: normalise h's logits over its top-k (all classes if >= C)")
    activation: Literal["gelu", "relu", "elu", "softplus"] = option("gelu", help="rule nonlinear: activation")
    margin_apgd_steps: int = option(100, help="rule nonlinear: steps of the APGD-CE / APGD-T attacks on h "
                                              "whose margins set the cutoff")

    def validate(self) -> None:
        nonlinear = self.rule == "nonlinear"
        if not self.mixnet and not (nonlinear and self.std and self.rob):
            raise ConfigError("give at least one adaptive classifier checkpoint (mixnet), or rule nonlinear "
                              "with std and rob")
        if not nonlinear and (self.target_acc is None) == (self.target_between is None):
            raise ConfigError("give exactly one of target_acc and target_between")
        if self.target_acc is not None and self.target_between is not None:
            raise ConfigError("give at most one of target_acc and target_between")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}")
        check_finite("beta", self.beta, 0, strict=True, high=100)
        check_counts(self, "grid_size", "margin_apgd_steps")
        check_counts(self, "top_k", low=2)
        nonlinear_grid(1, self.s_range, self.c_range, self.p_range)  # checks the ranges
        if self.target_acc is not None and not 0 < self.target_acc <= 100:
            raise ConfigError(f"target_acc is a percentage in (0, 100], got {self.target_acc}")
        if self.target_between is not None and not 0 <= self.target_between <= 1:
            raise ConfigError(f"target_between must be in [0, 1], got {self.target_between}")
        if self.output and len(self.mixnet) + nonlinear > 1:
            raise ConfigError("output names one calibrated checkpoint; with several inputs leave it unset")
        if self.alpha_range is not None and (len(self.alpha_range) != 2
                                             or not all(0 <= a <= 1 for a in self.alpha_range)):
            raise ConfigError(f"alpha_range must be two numbers in [0, 1]: min, max; got {self.alpha_range}")
        if self.range_width is not None and not 0 < self.range_width <= 1:
            raise ConfigError(f"range_width must be in (0, 1], got {self.range_width}")
        check_finite("scale", self.scale, 0, strict=True)
        check_eps(self.eps, self.norm)
        check_finite("val_fraction", self.val_fraction, 0, below=1)
        check_counts(self, "calib_offset", "eval_offset", low=0)
        check_counts(self, "eval_examples", "batch_size", "calib_examples")
        bad = [s for s in self.report_settings if s not in REPORT_SETTINGS]
        if bad:
            raise ConfigError(f"unknown report settings {bad}; use A, B, C, D")


def calibrated_output(cfg: CalibrateConfig, mixnet: str) -> str:
    """Where the calibrated copy of ``mixnet`` goes: ``cfg.output``, else ``<mixnet>-calibrated``."""
    return cfg.output or str(checkpoint_paths(mixnet)[0].with_suffix("")) + "-calibrated"


def _calibration_data(cfg: CalibrateConfig, dataset: str) -> Dataset:
    data = load_dataset(dataset, cfg.split, cfg.data_dir, cfg.val_fraction if cfg.split == "val" else 0.0, cfg.seed)
    end = len(data) if cfg.calib_examples is None else cfg.calib_offset + cfg.calib_examples
    if cfg.calib_offset >= len(data):
        raise ConfigError(f"calib_offset {cfg.calib_offset} is past the {len(data)} {cfg.split} examples")
    return Dataset(data.x[cfg.calib_offset:end], data.y[cfg.calib_offset:end], data.num_classes, data.name, data.split)


def _base_pair(cfg: CalibrateConfig, loaded, device):
    """(g, h, std path, rob path, dataset, rob sidecar): from std/rob when given, else the first mixnet's."""
    first_model, first_info = loaded[0] if loaded else (None, {})
    std_path = cfg.std or first_info.get("std_checkpoint")
    rob_path = cfg.rob or first_info.get("rob_checkpoint")
    if cfg.std or cfg.rob or first_model is None:
        if not (std_path and rob_path):
            raise ConfigError("give both std and rob (or a mixnet that records its base models)")
        (g, g_info), (h, h_info) = load_model(std_path, device), load_model(rob_path, device)
        dataset = cfg.dataset or first_info.get("dataset") or recorded_dataset(None, {std_path: g_info, rob_path: h_info})
        return g, h, std_path, rob_path, dataset, h_info
    dataset = cfg.dataset or first_info.get("dataset")
    if not dataset:
        raise ConfigError(f"{cfg.mixnet[0]} records no data set; give dataset")
    rob_info = model_info(rob_path) if rob_path else {}
    return first_model.std_model, first_model.rob_model, std_path, rob_path, dataset, rob_info


def _threat(cfg: CalibrateConfig, first_info: dict, rob_info: dict, rob_path: str | None) -> tuple[float, str]:
    train_cfg = first_info.get("training", {}).get("config", {})
    if cfg.eps is None and train_cfg.get("eps") is not None:
        return train_cfg["eps"], cfg.norm or train_cfg.get("norm", "linf")
    return recorded_threat(cfg.eps, cfg.norm, rob_info, rob_path or "h")


def calibrate_nonlinear(cfg: CalibrateConfig, g: nn.Module, h: nn.Module, calib: Dataset, target: float | None,
                        eps: float, norm: str) -> tuple[MixedClassifier, dict[str, Any]]:
    """The MixedNUTS calibration of the ``calibrate`` command: the beta fit, and the target-accuracy fit
    when a target is given (that one is returned as the mixture); on ``calib`` (1000 examples by default)."""
    data = calib if cfg.calib_examples is not None else calib.subset(1000)
    attacked, wrong = robust_margin_logits(h, data, eps, norm, cfg.margin_apgd_steps, cfg.batch_size, cfg.seed)
    grid = nonlinear_grid(cfg.grid_size, cfg.s_range, cfg.c_range, cfg.p_range)
    fit = grid_search_nonlinear(attacked, wrong, grid, cfg.beta, cfg.top_k, cfg.activation)
    gl, hl, yl = _base_logits(g, h, data, cfg.batch_size)

    def params_of(d: dict) -> NonlinearParams:
        return NonlinearParams(s=d["s"], c=d["c"], p=d["p"], top_k=cfg.top_k, activation=cfg.activation)

    fit["clean_acc"] = 100.0 * (nonlinear_mix_log_probs(gl, hl, fit["alpha"], params_of(fit)).argmax(1) == yl
                                ).float().mean().item()
    summary: dict[str, Any] = {"examples": len(data), "eps": eps, "norm": norm, "attacked_correct": len(attacked),
                               "clean_wrong": len(wrong), "margin_apgd_steps": cfg.margin_apgd_steps, "beta_fit": fit}
    chosen = fit
    if target is not None:
        chosen = summary["at_target"] = calibrate_nonlinear_to_accuracy(gl, hl, yl, attacked, grid, target,
                                                                        cfg.top_k, cfg.activation)
    summary["chosen"] = "at_target" if target is not None else "beta_fit"
    return MixedClassifier(g, h, chosen["alpha"], rule=nonlinear_rule(params_of(chosen))).eval(), summary


def describe_nonlinear(summary: dict[str, Any]) -> str:
    """Lines for the terminal: the beta fit, the target fit, the file written."""
    f = summary["beta_fit"]
    lines = [f"  nonlinear (MixedNUTS), margins of h on {summary['attacked_correct']} attacked-correct and "
             f"{summary['clean_wrong']} clean-wrong of {summary['examples']} examples ({summary['norm']} "
             f"eps={summary['eps']}):",
             f"    beta {f['beta']}: s={f['s']:.4g} c={f['c']:.4g} p={f['p']:.4g} alpha={f['alpha']:.6f} -> "
             f"objective {100 * f['objective']:.2f}% of h's clean errors out of g's reach, clean {f['clean_acc']:.2f}%"]
    if "at_target" in summary:
        t = summary["at_target"]
        lines.append(f"    target {t['target_acc']:.2f}%: s={t['s']:.4g} c={t['c']:.4g} p={t['p']:.4g} "
                     f"alpha={t['alpha']:.6f} -> clean {t['clean_acc']:.2f}%, {t['robust_share']:.1f}% of h's robust "
                     f"inputs kept{'' if t['reached'] else ' [target NOT reached]'}")
    lines.append(f"    wrote {summary['saved']} ({summary['chosen']})")
    return "\n".join(lines)


def run_calibration(cfg: CalibrateConfig) -> dict[str, Any]:
    """Calibrate each adaptive classifier and the fixed-alpha counterpart (and, with rule nonlinear, the
    MixedNUTS mixture); optionally the report table."""
    cfg.validate()
    if cfg.report:  # AutoAttack (column C) needs pyautoattack: find out now, not after calibrating
        check_attack_requirements(report_attacks(cfg.report_settings))
    device = resolve_device(cfg.device)
    loaded = [load_adaptive_classifier(p, device=device) for p in cfg.mixnet]
    first_info = loaded[0][1] if loaded else {}
    g, h, std_path, rob_path, dataset, rob_info = _base_pair(cfg, loaded, device)
    std_scale, rob_scale = (loaded[0][0].std_scale, loaded[0][0].rob_scale) if loaded else (1.0, 1.0)
    calib = _calibration_data(cfg, dataset)
    acc_g, acc_h = clean_accuracy(g, calib, cfg.batch_size, device), clean_accuracy(h, calib, cfg.batch_size, device)
    target = cfg.target_acc
    if cfg.target_between is not None:
        target = acc_h + cfg.target_between * (acc_g - acc_h)
    results: dict[str, Any] = {"target_acc": target, "calibration": {"split": cfg.split, "examples": len(calib),
                                                                      "std_clean_acc": acc_g, "rob_clean_acc": acc_h},
                               "adaptive": []}
    for path, (model, info) in zip(cfg.mixnet, loaded):
        summary = calibrate_adaptive(model, calib, target, cfg.param, cfg.scale,
                                     tuple(cfg.alpha_range) if cfg.alpha_range else None, cfg.range_width,
                                     batch_size=cfg.batch_size)
        out = calibrated_output(cfg, path)
        meta = {k: v for k, v in info.items() if k not in ("provenance", "eval_head", "mixing_net", "taps",
                                                           "std_scale", "rob_scale", "detach_features", "nonlinear",
                                                           "format_version", "kind", "num_classes")}
        meta["calibration"] = {**summary, "source": str(path), "split": cfg.split, "dataset": dataset}
        save_adaptive_classifier(model, out, meta)
        results["adaptive"].append({"checkpoint": str(path), "calibrated": out, "setting": info.get("setting"),
                                    **summary})
    fixed = None
    if target is not None:
        fixed = results["fixed"] = calibrate_fixed_alpha(g, h, calib, target, std_scale, rob_scale, cfg.batch_size)
    nonlinear_model = None
    if cfg.rule == "nonlinear":
        eps, norm = _threat(cfg, first_info, rob_info, rob_path)
        nonlinear_model, summary = calibrate_nonlinear(cfg, g, h, calib, target, eps, norm)
        out = cfg.output or str(checkpoint_paths(rob_path)[0].with_suffix("")) + "-mixednuts"
        recorded = {**summary, "beta_fit": {k: v for k, v in summary["beta_fit"].items() if k != "objectives"}}
        save_fixed_mixture(nonlinear_model, out, {"std_checkpoint": std_path, "rob_checkpoint": rob_path,
                                                  "dataset": dataset, "calibration": recorded})
        results["nonlinear"] = {**summary, "saved": str(checkpoint_paths(out)[1])}
    first_out = results["adaptive"][0]["calibrated"] if results["adaptive"] else out
    results["results_file"] = str(first_out) + ".calibration.json"
    if cfg.report:
        eps, norm = _threat(cfg, first_info, rob_info, rob_path)
        test = load_dataset(dataset, "test", cfg.data_dir)
        test = Dataset(test.x[cfg.eval_offset:cfg.eval_offset + cfg.eval_examples],
                       test.y[cfg.eval_offset:cfg.eval_offset + cfg.eval_examples], test.num_classes, test.name, "test")
        models: dict[str, nn.Module] = {"g (standard)": g, "h (robust)": h}
        for model, info in loaded:
            label = f"adaptive ({info.get('setting') or '?'})"
            while label in models:
                label += "'"
            models[label] = model
        if fixed is not None:
            models[f"fixed alpha={fixed['alpha']:.4f}"] = fixed_alpha_classifier(g, h, fixed["alpha"], std_scale,
                                                                                 rob_scale)
        if nonlinear_model is not None:
            models[f"nonlinear alpha={nonlinear_model.alpha:.4f}"] = nonlinear_model
        results["report"] = {"eps": eps, "norm": norm, "examples": len(test),
                             "rows": report_table(models, test, eps, norm, cfg.report_settings, cfg.batch_size,
                                                  cfg.seed, cfg.progress)}
    return results
