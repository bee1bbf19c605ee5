"""Calibration of mixed classifiers for a target clean accuracy (paper App. D.1).

- :func:`calibrate_adaptive`: the mixing network's eval-time shift (or alpha_min with a fixed range
  width) by bisection, keeping alpha as large (robust) as the target allows.
- :func:`calibrate_fixed_alpha`: the largest fixed alpha with the same clean accuracy.
- :class:`CalibrateConfig` / :func:`run_calibration`: the ``calibrate`` command: both, on held-out
  data, then optionally the Table 2/3 report (:mod:`adasmooth.evaluate.tables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..attacks import check_attack_requirements
from ..core.config import data_dir_option, dataset_option, option, RunOptions
from ..core.errors import ConfigError, InputError
from ..core.runtime import resolve_device
from ..data import Dataset, load_dataset
from ..mixing import MixedClassifier, mix_logits
from ..mixing.adaptive import AdaptiveMixedClassifier, load_adaptive_classifier, save_adaptive_classifier
from ..mixing.network import ranged_alpha
from ..models.checkpoint import checkpoint_paths
from ..core.checks import check_counts, check_eps, check_finite
from ..train.loop import clean_accuracy
from .tables import REPORT_SETTINGS, report_attacks, report_table

__all__ = [
    "calibrate_adaptive",
    "calibrate_fixed_alpha",
    "fixed_alpha_classifier",
    "bisect_decreasing",
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
        logits = mix_logits(g, h, alpha, model.std_scale, model.rob_scale)
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
    std_model.eval()
    rob_model.eval()
    device = next(std_model.parameters()).device
    gs, hs, ys = [], [], []
    for x, y in data.batches(batch_size):
        x = x.to(device)
        gs.append(std_model(x))
        hs.append(rob_model(x))
        ys.append(y.to(device))
    g, h, y = torch.cat(gs), torch.cat(hs), torch.cat(ys)

    def acc(a: float) -> float:
        logits = mix_logits(g, h, torch.tensor(a, dtype=torch.float64), std_scale, rob_scale)
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    alpha, reached_acc, reached = bisect_decreasing(acc, 0.0, 1.0, target_acc)
    return {"alpha": alpha, "clean_acc": reached_acc, "target_acc": target_acc, "reached": reached,
            "examples": len(data)}


def fixed_alpha_classifier(std_model: nn.Module, rob_model: nn.Module, alpha: float, std_scale: float = 1.0,
                           rob_scale: float = 1.0) -> MixedClassifier:
    """The fixed-alpha counterpart (Eq. 3.4) with the same base models and logit scales."""
    return MixedClassifier(std_model, rob_model, alpha, std_scale=std_scale, rob_scale=rob_scale).eval()


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

    def validate(self) -> None:
        if not self.mixnet:
            raise ConfigError("give at least one adaptive classifier checkpoint (mixnet)")
        if (self.target_acc is None) == (self.target_between is None):
            raise ConfigError("give exactly one of target_acc and target_between")
        if self.target_acc is not None and not 0 < self.target_acc <= 100:
            raise ConfigError(f"target_acc is a percentage in (0, 100], got {self.target_acc}")
        if self.target_between is not None and not 0 <= self.target_between <= 1:
            raise ConfigError(f"target_between must be in [0, 1], got {self.target_between}")
        if self.output and len(self.mixnet) > 1:
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


def run_calibration(cfg: CalibrateConfig) -> dict[str, Any]:
    """Calibrate each adaptive classifier and the fixed-alpha counterpart; optionally the report table."""
    cfg.validate()
    if cfg.report:  # AutoAttack (column C) needs pyautoattack: find out now, not after calibrating
        check_attack_requirements(report_attacks(cfg.report_settings))
    device = resolve_device(cfg.device)
    loaded = [load_adaptive_classifier(p, device=device) for p in cfg.mixnet]
    first_model, first_info = loaded[0]
    dataset = cfg.dataset or first_info.get("dataset")
    if not dataset:
        raise ConfigError(f"{cfg.mixnet[0]} records no data set; give dataset")
    calib = _calibration_data(cfg, dataset)
    g, h = first_model.std_model, first_model.rob_model
    acc_g, acc_h = clean_accuracy(g, calib, cfg.batch_size, device), clean_accuracy(h, calib, cfg.batch_size, device)
    target = cfg.target_acc if cfg.target_acc is not None else acc_h + cfg.target_between * (acc_g - acc_h)
    results: dict[str, Any] = {"target_acc": target, "calibration": {"split": cfg.split, "examples": len(calib),
                                                                      "std_clean_acc": acc_g, "rob_clean_acc": acc_h},
                               "adaptive": []}
    for path, (model, info) in zip(cfg.mixnet, loaded):
        summary = calibrate_adaptive(model, calib, target, cfg.param, cfg.scale,
                                     tuple(cfg.alpha_range) if cfg.alpha_range else None, cfg.range_width,
                                     batch_size=cfg.batch_size)
        out = calibrated_output(cfg, path)
        meta = {k: v for k, v in info.items() if k not in ("provenance", "eval_head", "mixing_net", "taps",
                                                           "std_scale", "rob_scale", "detach_features",
                                                           "format_version", "kind", "num_classes")}
        meta["calibration"] = {**summary, "source": str(path), "split": cfg.split, "dataset": dataset}
        save_adaptive_classifier(model, out, meta)
        results["adaptive"].append({"checkpoint": str(path), "calibrated": out, "setting": info.get("setting"),
                                    **summary})
    fixed = calibrate_fixed_alpha(g, h, calib, target, first_model.std_scale, first_model.rob_scale, cfg.batch_size)
    results["fixed"] = fixed
    if cfg.report:
        train_cfg = first_info.get("training", {}).get("config", {})
        eps = cfg.eps if cfg.eps is not None else train_cfg.get("eps")
        norm = cfg.norm or train_cfg.get("norm", "linf")
        if eps is None:
            raise ConfigError(f"no eps given and none recorded in {cfg.mixnet[0]}")
        test = load_dataset(dataset, "test", cfg.data_dir)
        test = Dataset(test.x[cfg.eval_offset:cfg.eval_offset + cfg.eval_examples],
                       test.y[cfg.eval_offset:cfg.eval_offset + cfg.eval_examples], test.num_classes, test.name, "test")
        models: dict[str, nn.Module] = {"g (standard)": g, "h (robust)": h}
        for model, info in loaded:
            label = f"adaptive ({info.get('setting') or '?'})"
            while label in models:
                label += "'"
            models[label] = model
        models[f"fixed alpha={fixed['alpha']:.4f}"] = fixed_alpha_classifier(
            g, h, fixed["alpha"], first_model.std_scale, first_model.rob_scale)
        results["report"] = {"eps": eps, "norm": norm, "examples": len(test),
                             "rows": report_table(models, test, eps, norm, cfg.report_settings, cfg.batch_size,
                                                  cfg.seed, cfg.progress)}
    return results
