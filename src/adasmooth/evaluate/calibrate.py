"""Calibration of mixed classifiers for a target clean accuracy (paper App. D.1).

- :func:`calibrate_adaptive`: the mixing network's eval-time shift (or alpha_min with a fixed range
  width) by bisection, keeping alpha as large (robust) as the target allows.
- :func:`calibrate_range`: the command's default: alpha confined to [floor, floor + width], the floor
  bisected per candidate width and the width chosen by the accuracy under setting D on calibration inputs,
  so that an attack that drives alpha down cannot take it below the floor.
- :func:`calibrate_fixed_alpha`: the largest fixed alpha with the same clean accuracy;
  :func:`compare_adaptive_fixed`: both under the same attack on the same inputs, with a paired interval.
- The training-free calibration of the nonlinear (MixedNUTS) rule is in :mod:`.mixednuts`.
- :class:`CalibrateConfig` / :func:`run_calibration`: the ``calibrate`` command: both, on held-out
  data, then optionally the Table 2/3 report (:mod:`adasmooth.evaluate.tables`); with
  ``--rule nonlinear`` also the MixedNUTS calibration, written as a fixed-mixture file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..attacks import check_attack_requirements
from ..core.config import DataLoadingOptions, data_dir_option, dataset_option, option
from ..core.errors import ConfigError, InputError
from ..core.runtime import resolve_device
from ..data import Dataset, load_dataset
from ..data.images import ImageOptions, image_options
from ..mixing import MixedClassifier, mix_logits
from ..mixing.adaptive import AdaptiveMixedClassifier, load_adaptive_classifier, save_adaptive_classifier
from ..mixing.fixed import save_fixed_mixture
from ..mixing.nonlinear import ACTIVATIONS, TOP_K, NonlinearParams, nonlinear_mix_log_probs, nonlinear_rule
from ..mixing.network import ranged_alpha
from ..models.checkpoint import checkpoint_paths, recorded_dataset, recorded_threat, trained_input_shape
from ..models.loader import load_model, model_info
from ..core.checks import check_counts, check_eps, check_finite
from ..train.loop import clean_accuracy
from .paired import paired_difference
from .robustness import evaluate_robustness
from .mixednuts import calibrate_nonlinear_to_accuracy, grid_search_nonlinear, nonlinear_grid, robust_margin_logits
from ..core.search import bisect_decreasing, percent_correct
from .tables import REPORT_SETTINGS, report_attacks, report_table

__all__ = [
    "calibrate_adaptive",
    "calibrate_range",
    "attacked_correct",
    "compare_adaptive_fixed",
    "check_range_widths",
    "check_target",
    "calibration_overlap",
    "RANGE_WIDTHS",
    "MIN_CALIBRATION_EXAMPLES",
    "calibrate_fixed_alpha",
    "fixed_alpha_classifier",
    "calibrate_nonlinear",
    "describe_nonlinear",
    "CalibrateConfig",
    "run_calibration",
]

logger = logging.getLogger(__name__)

RANGE_WIDTHS = (0.02, 0.05, 0.1, 0.2, 0.4, 1.0)  # candidate widths of alpha's range (calibrate_range)
CALIBRATION_ATTACK = "D"  # adaptive AutoAttack with the alpha term: the attack that drives alpha down
ATTACK_EXAMPLES = 200  # calibration inputs attacked per candidate range
CALIB_APGD_STEPS = 50
CALIB_TARGET_CLASSES = 3
# Below this a single image moves the clean accuracy by more than one point: the bisection's target and
# the comparison's interval would say little.
MIN_CALIBRATION_EXAMPLES = 100


@torch.no_grad()
def _cached_outputs(model: AdaptiveMixedClassifier, data: Dataset, batch_size: int = 256):
    """g and h logits, the BN-normalised gamma and the label of every example, computed once."""
    model.eval()
    device = next(model.mixing_net.parameters()).device
    gs, hs, zs, ys = [], [], [], []
    for x, y in data.batches(batch_size):
        g, h, z = model.head_inputs(x.to(device))
        gs.append(g)
        hs.append(h)
        zs.append(z)
        ys.append(y.to(device))
    return torch.cat(gs), torch.cat(hs), torch.cat(zs), torch.cat(ys)


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
    if not 0 < target_acc <= 100:
        raise InputError(f"target_acc is a percentage in (0, 100], got {target_acc}")
    if scale is not None or alpha_range is not None:
        model.mixing_net.set_eval_head(scale=scale, alpha_range=alpha_range)
    outputs = _cached_outputs(model, data, batch_size)
    return {**_fit_head(model, outputs, target_acc, param, range_width, shift_bounds), "examples": len(data)}


def _fit_head(model: AdaptiveMixedClassifier, outputs, target_acc: float, param: str,
              range_width: float | None = None, shift_bounds: tuple[float, float] = (-20.0, 20.0)) -> dict[str, Any]:
    """The bisection of :func:`calibrate_adaptive` on cached (g, h, gamma, y) outputs."""
    net = model.mixing_net
    g, h, z, y = outputs
    eval_scale = float(net.eval_scale)

    def acc(shift: float, lo: float, hi: float) -> float:
        alpha, _ = ranged_alpha(z * eval_scale + shift, lo, hi)
        logits = model.mix_from_logits(g, h, alpha)  # Eq. 3.4, or the MixedNUTS mixture of a nonlinear model
        return percent_correct(logits, y)

    if param == "shift":
        lo_a, hi_a = float(net.alpha_min), float(net.alpha_max)
        value, reached_acc, reached = bisect_decreasing(lambda s: acc(s, lo_a, hi_a), *shift_bounds, target_acc)
        net.set_eval_head(shift=value)
    elif param == "alpha_min":
        width = range_width if range_width is not None else float(net.alpha_max - net.alpha_min)
        if not 0 < width <= 1:
            raise InputError(f"range_width must be in (0, 1], got {width}")
        shift = float(net.eval_shift)
        value, reached_acc, reached = bisect_decreasing(lambda m: acc(shift, m, min(1.0, m + width)), 0.0,
                                                         1.0 - width, target_acc)
        net.set_eval_head(alpha_range=(value, min(1.0, value + width)))
    else:
        raise InputError(f"param must be 'shift' or 'alpha_min', got {param!r}")
    alpha, _ = ranged_alpha(z * eval_scale + float(net.eval_shift), float(net.alpha_min), float(net.alpha_max))
    return {"param": param, "value": value, "clean_acc": reached_acc, "target_acc": target_acc,
            "reached": reached, "eval_head": net.eval_head(), "alpha_mean": alpha.mean().item()}


def check_range_widths(widths: Sequence[float]) -> list[float]:
    """The candidate widths of :func:`calibrate_range`, each in (0, 1], sorted narrowest first, no repeats."""
    widths = list(widths)
    if not widths:
        raise ConfigError("range_widths is empty: give at least one width in (0, 1]")
    bad = [w for w in widths if not (isinstance(w, (int, float)) and 0 < w <= 1)]
    if bad:
        raise ConfigError(f"range widths must lie in (0, 1], got {bad}")
    return sorted(set(float(w) for w in widths))


def attacked_correct(model: nn.Module, data: Dataset, eps: float, norm: str = "linf",
                     apgd_steps: int = CALIB_APGD_STEPS, n_target_classes: int = CALIB_TARGET_CLASSES, seed: int = 0,
                     batch_size: int = 256, progress: bool = False) -> list[bool]:
    """Per input of ``data``: correct on the clean input and under setting D (adaptive AutoAttack with
    the alpha term; on a fixed mixture the alpha term has no gradient and D is its APGD ensemble).
    Each input's random draws come from (seed, its position in ``data``), so two models attacked on the
    same data face the same draws."""
    model.eval()
    report = evaluate_robustness(model, data, attacks=[CALIBRATION_ATTACK], eps=eps, norm=norm,
                                 batch_size=batch_size, seed=seed, progress=progress,
                                 attack_options={"apgd_steps": apgd_steps, "n_target_classes": n_target_classes})
    return report.worst_case()


def calibrate_range(
    model: AdaptiveMixedClassifier,
    calib: Dataset,
    target_acc: float,
    widths: Sequence[float] = RANGE_WIDTHS,
    *,
    eps: float,
    norm: str = "linf",
    attack_examples: int = ATTACK_EXAMPLES,
    apgd_steps: int = CALIB_APGD_STEPS,
    n_target_classes: int = CALIB_TARGET_CLASSES,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Confine alpha(x) to [floor, floor + width] and choose both by the attacked accuracy.

    For each width (narrowest first) the floor is bisected, with the stored sigmoid scale and shift, to
    the highest value whose clean accuracy on ``calib`` reaches ``target_acc`` (%); the classifier is then
    attacked with setting D (:func:`attacked_correct`) on the first ``attack_examples`` inputs of
    ``calib``. The width with the most inputs correct under attack wins among those that reach the target
    (all, when none does; ``reached`` then says so); on a tie the narrower width wins: it is closer to a
    fixed alpha, so it gives the attacker less room to move alpha. The network's eval head is left at
    the chosen range. Returns a summary with every candidate (width, floor, clean and robust accuracy)
    and, under ``attacked_correct``, the chosen classifier's per-input outcomes under attack.
    """
    widths = check_range_widths(widths)
    if not 0 < target_acc <= 100:
        raise InputError(f"target_acc is a percentage in (0, 100], got {target_acc}")
    if attack_examples < 1:
        raise InputError(f"attack_examples must be >= 1, got {attack_examples}")
    outputs = _cached_outputs(model, calib, batch_size)
    attack_set = calib.subset(attack_examples)
    candidates, outcomes = [], []
    for width in widths:
        fit = _fit_head(model, outputs, target_acc, "alpha_min", width)
        correct = attacked_correct(model, attack_set, eps, norm, apgd_steps, n_target_classes, seed, batch_size,
                                   progress)
        outcomes.append(correct)
        candidates.append({"width": width, "alpha_min": fit["value"], "alpha_max": fit["eval_head"]["alpha_max"],
                           "clean_acc": fit["clean_acc"], "reached": fit["reached"], "alpha_mean": fit["alpha_mean"],
                           "robust_acc": 100.0 * sum(correct) / len(correct)})
    pool = [i for i, c in enumerate(candidates) if c["reached"]] or list(range(len(candidates)))
    best = pool[0]
    for i in pool[1:]:  # strictly more inputs correct: ties keep the narrower width
        if sum(outcomes[i]) > sum(outcomes[best]):
            best = i
    chosen = candidates[best]
    model.mixing_net.set_eval_head(alpha_range=(chosen["alpha_min"], chosen["alpha_max"]))
    return {"param": "range", "value": chosen["alpha_min"], "width": chosen["width"],
            "clean_acc": chosen["clean_acc"], "target_acc": target_acc, "reached": chosen["reached"],
            "eval_head": model.mixing_net.eval_head(), "alpha_mean": chosen["alpha_mean"], "examples": len(calib),
            "robust_acc": chosen["robust_acc"], "candidates": candidates,
            "attack": _attack_record(eps, norm, len(attack_set), apgd_steps, n_target_classes, seed),
            "attacked_correct": outcomes[best]}


def _attack_record(eps: float, norm: str, examples: int, apgd_steps: int, n_target_classes: int,
                   seed: int) -> dict[str, Any]:
    return {"setting": CALIBRATION_ATTACK, "eps": eps, "norm": norm, "examples": examples,
            "apgd_steps": apgd_steps, "n_target_classes": n_target_classes, "seed": seed}


def compare_adaptive_fixed(
    adaptive: nn.Module,
    fixed: MixedClassifier,
    data: Dataset,
    eps: float,
    norm: str = "linf",
    apgd_steps: int = CALIB_APGD_STEPS,
    n_target_classes: int = CALIB_TARGET_CLASSES,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    adaptive_correct: Sequence[bool] | None = None,
    fixed_correct: Sequence[bool] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The adaptive classifier against the fixed alpha under the same attack (setting D, same seed) on the
    same inputs ``data``: both accuracies (%), the difference (points) with its paired interval
    (:func:`adasmooth.evaluate.paired.paired_difference`), and the verdict: ``better`` when the interval
    lies above 0, ``not clearly better`` when only the difference does, else ``not better``.
    Outcomes already measured on exactly these inputs and this attack may be passed in."""
    if adaptive_correct is None:
        adaptive_correct = attacked_correct(adaptive, data, eps, norm, apgd_steps, n_target_classes, seed,
                                            batch_size, progress)
    if fixed_correct is None:
        fixed_correct = attacked_correct(fixed, data, eps, norm, apgd_steps, n_target_classes, seed, batch_size,
                                         progress)
    paired = paired_difference(adaptive_correct, fixed_correct, confidence)
    if paired["interval"][0] > 0:
        verdict = "better"
    elif paired["difference"] > 0:
        verdict = "not clearly better"
    else:
        verdict = "not better"
    return {"attack": _attack_record(eps, norm, paired["n"], apgd_steps, n_target_classes, seed),
            "adaptive_acc": paired["first_acc"], "fixed_acc": paired["second_acc"], "fixed_alpha": float(fixed.alpha),
            "difference": paired["difference"], "interval": paired["interval"], "confidence": confidence,
            "adaptive_only": paired["first_only"], "fixed_only": paired["second_only"], "verdict": verdict}


def check_target(target_acc: float, std_acc: float, rob_acc: float, examples: int) -> None:
    """A target clean accuracy must lie between h's and g's on the calibration data: above g's it cannot
    be reached, below h's alpha = 1 (h alone) already meets it."""
    low, high = min(std_acc, rob_acc), max(std_acc, rob_acc)
    if target_acc > high or target_acc < low:
        side = "above" if target_acc > high else "below"
        raise InputError(f"target clean accuracy {target_acc:.2f}% is {side} what mixing can reach on the "
                         f"{examples} calibration images: g {std_acc:.2f}%, h {rob_acc:.2f}%; choose a target "
                         f"between them (or --target-between)")


def calibration_overlap(training: dict[str, Any], dataset: str | None, split: str, val_fraction: float,
                        seed: int) -> str | None:
    """Why the calibration images may be among the mixing network's training images, from its sidecar's
    ``training`` record (``images``: split, val_fraction, seed, n_train; else its ``config``); None when the
    record shows they are not, or records nothing."""
    images, config = training.get("images") or {}, training.get("config") or {}
    if not images and not config:
        return None
    trained_on = config.get("dataset")
    if trained_on and dataset and trained_on != dataset:
        return None
    trained_split = images.get("split", "train")
    if split == "test" or trained_split == "test":
        if split == trained_split:
            return (f"the mixing network was trained on {dataset} test images and the calibration uses test "
                    f"images too: they may overlap; calibrate on --split val")
        return None
    trained_fraction = float(images.get("val_fraction", config.get("val_fraction")) or 0.0)
    trained_seed = images.get("seed", config.get("seed"))
    if trained_fraction == 0:
        return (f"the mixing network was trained on the whole {dataset} training set (val_fraction 0), so the "
                f"calibration images (split val) are among its training images; use --split test, or train it "
                f"with a val_fraction")
    if trained_fraction != val_fraction or (trained_seed is not None and int(trained_seed) != seed):
        return (f"the mixing network held out val_fraction {trained_fraction:g} with seed {trained_seed}, the "
                f"calibration split val uses val_fraction {val_fraction:g} with seed {seed}: its images may be "
                f"among the network's training images; use --val-fraction {trained_fraction:g} --seed "
                f"{trained_seed}, or --split test")
    return None


@torch.no_grad()
def calibrate_fixed_alpha(std_model: nn.Module, rob_model: nn.Module, data: Dataset, target_acc: float,
                          std_scale: float = 1.0, rob_scale: float = 1.0, batch_size: int = 256) -> dict[str, Any]:
    """The largest fixed alpha whose mixed classifier keeps a clean accuracy >= ``target_acc`` (%)."""
    g, h, y = _base_logits(std_model, rob_model, data, batch_size)

    def acc(a: float) -> float:
        logits = mix_logits(g, h, torch.tensor(a, dtype=torch.float64), std_scale, rob_scale)
        return percent_correct(logits, y)

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


# ---------------------------------------------------------------------------- the calibrate command


@dataclass
class CalibrateConfig(DataLoadingOptions):
    mixnet: list[str] = option(help="adaptive classifier checkpoint(s) from train-mixnet (e.g. one per setting)",
                               default_factory=list)
    target_acc: float | None = option(None, help="clean accuracy (percent) to reach on the calibration data")
    target_between: float | None = option(None, help="or: target = acc(h) + this fraction of acc(g) - acc(h)")
    param: Literal["range", "shift", "alpha_min"] = option(
        "range", help="what to tune: range = alpha confined to [floor, floor + width], the floor bisected for "
                      "each of range_widths and the width with the best accuracy under setting D kept; shift = "
                      "the sigmoid shift, alpha free in the stored range; alpha_min = the floor of one range width")
    range_widths: list[float] = option(help="param range: candidate widths of alpha's range, each in (0, 1]",
                                       default_factory=lambda: list(RANGE_WIDTHS))
    attack_examples: int = option(ATTACK_EXAMPLES, help="calibration inputs (the first ones) attacked with setting D "
                                                        "to choose the range and to compare with the fixed alpha")
    calib_apgd_steps: int = option(CALIB_APGD_STEPS, help="APGD steps of the calibration attack (setting D)")
    calib_n_target_classes: int = option(CALIB_TARGET_CLASSES, help="target classes of the calibration attack's "
                                                                    "APGD-T")
    scale: float | None = option(None, help="eval-time sigmoid scale; none: keep the stored one")
    alpha_range: list[float] | None = option(None, help="eval-time alpha range MIN,MAX (param shift or alpha_min)")
    range_width: float | None = option(None, help="alpha_max - alpha_min with param alpha_min")
    dataset: str | None = dataset_option()
    data_dir: str | None = data_dir_option()
    image: ImageOptions = image_options()
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
    eps: float | None = option(None, help="attack radius of the calibration attack and the report; none: the "
                                          "training eps")
    norm: Literal["linf", "l2"] | None = option(None, help="threat model of the calibration attack and the report; "
                                                          "none: the training one")
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
        if self.mixnet and self.target_acc is None and self.target_between is None:
            raise ConfigError("calibrating a mixnet needs a target: give target_acc or target_between")
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
                                             or not 0 <= self.alpha_range[0] < self.alpha_range[1] <= 1):
            raise ConfigError(f"alpha_range must be two numbers in [0, 1]: min < max; got {self.alpha_range}")
        if self.alpha_range is not None and self.param == "range" and self.mixnet:
            raise ConfigError("param range chooses alpha's range itself; drop alpha_range or use param shift or "
                              "alpha_min")
        if self.range_width is not None and not 0 < self.range_width <= 1:
            raise ConfigError(f"range_width must be in (0, 1], got {self.range_width}")
        check_range_widths(self.range_widths)
        check_counts(self, "attack_examples", "calib_apgd_steps", "calib_n_target_classes")
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
    data = load_dataset(dataset, cfg.split, cfg.data_dir, cfg.val_fraction if cfg.split == "val" else 0.0, cfg.seed,
                        image=cfg.image, workers=cfg.workers)
    end = len(data) if cfg.calib_examples is None else min(len(data), cfg.calib_offset + cfg.calib_examples)
    if cfg.calib_offset >= len(data):
        raise ConfigError(f"calib_offset {cfg.calib_offset} is past the {len(data)} {cfg.split} examples")
    # select, not a slice of data.x: image files outside the range are never decoded
    return data.select(range(cfg.calib_offset, end))


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


def fixed_alpha_command(std_path: str | None, rob_path: str | None, alpha: float, std_scale: float = 1.0,
                        rob_scale: float = 1.0) -> str:
    """The command that evaluates the fixed-alpha mixture (what to use when adaptive does not win)."""
    command = f"adasmooth evaluate --std {std_path or 'G'} --rob {rob_path or 'H'} --alpha {alpha:.4f}"
    if std_scale != 1.0:
        command += f" --std-scale {std_scale:g}"
    if rob_scale != 1.0:
        command += f" --rob-scale {rob_scale:g}"
    return command


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

    fit["clean_acc"] = percent_correct(nonlinear_mix_log_probs(gl, hl, fit["alpha"], params_of(fit)), yl)
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
    # the crop defaults to the checkpoints' input size; the sizes used go into the config the results record
    cfg.image = cfg.image.fit(map(trained_input_shape, (first_info, rob_info)))
    calib = _calibration_data(cfg, dataset)
    for path, (_, info) in zip(cfg.mixnet, loaded):
        overlap = calibration_overlap(info.get("training") or {}, dataset, cfg.split, cfg.val_fraction, cfg.seed)
        if overlap:
            logger.warning("%s: %s", path, overlap)
    if len(calib) < MIN_CALIBRATION_EXAMPLES:
        raise InputError(f"only {len(calib)} calibration images ({dataset} {cfg.split}, from calib_offset "
                         f"{cfg.calib_offset}); need at least {MIN_CALIBRATION_EXAMPLES}")
    acc_g, acc_h = clean_accuracy(g, calib, cfg.batch_size, device), clean_accuracy(h, calib, cfg.batch_size, device)
    target = cfg.target_acc
    if cfg.target_between is not None:
        target = acc_h + cfg.target_between * (acc_g - acc_h)
    if target is not None:
        check_target(target, acc_g, acc_h, len(calib))
    results: dict[str, Any] = {"target_acc": target, "calibration": {"split": cfg.split, "examples": len(calib),
                                                                      "std_clean_acc": acc_g, "rob_clean_acc": acc_h},
                               "adaptive": []}
    fixed = None
    if target is not None:
        fixed = results["fixed"] = calibrate_fixed_alpha(g, h, calib, target, std_scale, rob_scale, cfg.batch_size)
    if loaded:
        eps, norm = _threat(cfg, first_info, rob_info, rob_path)
        attack = dict(eps=eps, norm=norm, apgd_steps=cfg.calib_apgd_steps, n_target_classes=cfg.calib_n_target_classes,
                      seed=cfg.seed, batch_size=cfg.batch_size, progress=cfg.progress)
        attack_set = calib.subset(cfg.attack_examples)
        fixed_model = fixed_alpha_classifier(g, h, fixed["alpha"], std_scale, rob_scale)
        fixed_correct = attacked_correct(fixed_model, attack_set, **attack)
    for path, (model, info) in zip(cfg.mixnet, loaded):
        adaptive_correct = None
        if cfg.param == "range":
            if cfg.scale is not None:
                model.mixing_net.set_eval_head(scale=cfg.scale)
            summary = calibrate_range(model, calib, target, cfg.range_widths, attack_examples=cfg.attack_examples,
                                      **attack)
            adaptive_correct = summary.pop("attacked_correct")
        else:
            summary = calibrate_adaptive(model, calib, target, cfg.param, cfg.scale,
                                         tuple(cfg.alpha_range) if cfg.alpha_range else None, cfg.range_width,
                                         batch_size=cfg.batch_size)
        summary["comparison"] = compare_adaptive_fixed(model, fixed_model, attack_set, adaptive_correct=adaptive_correct,
                                                       fixed_correct=fixed_correct, **attack)
        summary["comparison"]["use_instead"] = fixed_alpha_command(std_path, rob_path, fixed["alpha"], std_scale,
                                                                   rob_scale)
        out = calibrated_output(cfg, path)
        meta = {k: v for k, v in info.items() if k not in ("provenance", "eval_head", "mixing_net", "taps",
                                                           "std_scale", "rob_scale", "detach_features", "nonlinear",
                                                           "format_version", "kind", "num_classes")}
        meta["calibration"] = {**summary, "source": str(path), "split": cfg.split, "dataset": dataset}
        save_adaptive_classifier(model, out, meta)
        results["adaptive"].append({"checkpoint": str(path), "calibrated": out, "setting": info.get("setting"),
                                    **summary})
    nonlinear_model = None
    if cfg.rule == "nonlinear":
        eps, norm = _threat(cfg, first_info, rob_info, rob_path)
        nonlinear_model, summary = calibrate_nonlinear(cfg, g, h, calib, target, eps, norm)
        out = cfg.output or str(checkpoint_paths(rob_path)[0].with_suffix("")) + "-mixednuts"
        recorded = {**summary, "beta_fit": {k: v for k, v in summary["beta_fit"].items() if k != "objectives"}}
        save_fixed_mixture(nonlinear_model, out, {"std_checkpoint": std_path, "rob_checkpoint": rob_path,
                                                  "input_shape": list(calib.input_shape),
                                                  "dataset": dataset, "calibration": recorded})
        results["nonlinear"] = {**summary, "saved": str(checkpoint_paths(out)[1])}
    first_out = results["adaptive"][0]["calibrated"] if results["adaptive"] else out
    results["results_file"] = str(first_out) + ".calibration.json"
    if cfg.report:
        eps, norm = _threat(cfg, first_info, rob_info, rob_path)
        test = load_dataset(dataset, "test", cfg.data_dir, image=cfg.image, workers=cfg.workers)
        test = test.select(range(min(cfg.eval_offset, len(test)), min(cfg.eval_offset + cfg.eval_examples, len(test))))
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
