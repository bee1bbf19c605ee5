"""Training the mixing network alpha(x) (paper Sec. 4.4, 5.2, App. C.2, D.1).

- :func:`composite_loss`: Eq. 4.2 per sample, c_CE*CE + c_BCE*BCE + c_prod*CE*BCE.
- :func:`train_mixnet`: the base models stay frozen; every batch holds clean inputs (pseudo-label 0)
  and inputs attacked on the fly against the current mixed model (pseudo-label 1) in setting A
  (gray-box PGD), B (white-box PGD) or C (APGD-CE + targeted APGD-DLR). Attacks are randomised:
  eps per sample = eps * U(0.4, 1.1), a chi-squared number of steps, and a w ~ U(0, w_max) weighted
  BCE(alpha, 1) term in the attacker's loss that pushes alpha down, and (PGD) a momentum decay
  ~ U(0, momentum_max) per batch. ``extra_clean`` adds more clean inputs per batch (the reference
  adds 9x) so that alpha learns the clean inputs well.
- ``rule="nonlinear"``: nonlinear + adaptive: the mixture mixes a hardmax g with the MixedNUTS map of
  h (:mod:`adasmooth.mixing.nonlinear`, parameters ``nonlinear``, e.g. from ``adasmooth calibrate
  --rule nonlinear``), and the training attacks take their gradients from the differentiable
  surrogate of :mod:`adasmooth.attacks.nonlinear` (the true mixture gives g no gradient).
- The loop is the training engine's (:func:`adasmooth.train.engine.run_training`): this module gives
  it a step function (:class:`_MixnetSteps`: the batch's attacks and Eq. 4.2) and an end-of-epoch
  measurement (batch-norm re-estimate of the EMA copy, the held-out attacked accuracy that picks the
  kept epoch); streaming, accumulation, clipping, EMA, precision, resume and history are the engine's.
- Under ``torchrun`` each rank takes its rows of every global batch (the same permutation and attack
  budgets on every rank, each row's attack seeded by its position in the global batch), the mixing
  network trains in DistributedDataParallel, and its batch norms are synchronised
  (:class:`adasmooth.core.distributed.SyncedBatchNorm`): training-mode statistics, and the
  re-estimated ones of the exported network, cover the whole global batch, as in one process.
  Rank 0 writes the checkpoints.

Calibration lives in :mod:`adasmooth.evaluate.calibrate`, the Table 2/3 report in
:mod:`adasmooth.evaluate.tables`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import APGD, PGD, APGDTargeted
from ..attacks.adaptive import DetachedAlpha, adaptive_alpha_loss, alpha_bce_loss
from ..attacks.losses import get_loss
from ..attacks.nonlinear import surrogate_for
from ..core.checks import check_counts, check_eps, check_finite
from ..core.config import CheckpointDataOptions, option
from ..core.distributed import init_distributed, restore_batchnorm, synchronise_batchnorm
from ..core.errors import ConfigError, InputError
from ..core.plotting import pyplot, save_figure
from ..core.precision import (Precision, channels_last_option, check_precision, compile_option, precision_option,
                              to_channels_last)
from ..core.runtime import resolve_device, seed_everything
from ..core.search import bisect_decreasing, percent_correct
from ..core.stats import roc_auc
from ..data import Dataset, ImageOptions, load_dataset
from ..data.images import image_options
from ..data.stream import epoch_permutation
from ..mixing.adaptive import AdaptiveMixedClassifier, build_adaptive_classifier, save_adaptive_classifier
from ..mixing.network import ranged_alpha
from ..mixing.nonlinear import NonlinearParams
from ..models.checkpoint import recorded_dataset, recorded_threat, trained_input_shape
from ..models.loader import load_model, model_dir_option, model_info
from .config import result_config
from .engine import EngineOptions, TrainContext, history_paths, optimizer_steps, resume_path, run_training
from .loop import clean_accuracy

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "with_recipe",
    "monitor_epoch",
    "lr_factor",
    "MixnetTrainConfig",
    "composite_loss",
    "attack_loss",
    "random_attack_budget",
    "craft_training_attack",
    "recalibrate_batchnorm",
    "build_from_config",
    "train_mixnet",
    "clean_accuracy",
    "SETTINGS",
]

SETTINGS = ("A", "B", "C")
WARMUPS = ("linear", "exponential")

# What an unset option of the training attack and optimisation means under each recipe. "paper" is the
# authors' setting C (App. D.1 and their code); "cheap" is this project's earlier default, kept for
# quick runs: it trains alpha against a far weaker adversary, which the attack at evaluation beats.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(setting="C", n_targets=9, attack_steps=75, extra_clean=9, ema_decay=0.95, warmup="exponential"),
    "cheap": dict(setting="B", n_targets=1, attack_steps=10, extra_clean=0, ema_decay=0.0, warmup="linear"),
}


def with_recipe(cfg: "MixnetTrainConfig") -> "MixnetTrainConfig":
    """``cfg`` with every unset recipe option filled in from ``cfg.recipe`` (explicit options win)."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {cfg.recipe!r}")
    unset = {k: v for k, v in RECIPES[cfg.recipe].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **unset)


# ---------------------------------------------------------------------------- the loss


def composite_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    alpha_logit: torch.Tensor,
    pseudo: torch.Tensor,
    c_ce: float = 0.0,
    c_bce: float = 1.5,
    c_prod: float = 0.2,
) -> torch.Tensor:
    """Eq. 4.2 per sample: c_CE * CE(h_alpha(x), y) + c_BCE * BCE(alpha, pseudo) + c_prod * CE * BCE.

    ``alpha_logit`` is the logit of alpha (BCE from logits is exact where alpha saturates);
    ``pseudo`` is 0 for clean inputs (favour g) and 1 for attacked ones (favour h). Returns (N,).
    """
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise ValueError(f"need (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(y.shape)}")
    if alpha_logit.shape != y.shape or pseudo.shape != y.shape:
        raise ValueError("alpha_logit and pseudo must have shape (N,)")
    ce = F.cross_entropy(logits, y, reduction="none")
    bce = F.binary_cross_entropy_with_logits(alpha_logit, pseudo.to(alpha_logit.dtype), reduction="none")
    return c_ce * ce + c_bce * bce + c_prod * ce * bce


# ---------------------------------------------------------------------------- the config


@dataclass
class MixnetTrainConfig(CheckpointDataOptions):
    std: str = option("", help="standard (accurate) base model g: a checkpoint path, robustbench:, python:, "
                               "timm: or torchvision: spec")
    rob: str = option("", help="robust base model h (any model spec)")
    model_dir: str | None = model_dir_option()
    taps: list[str] | None = option(None, help="two module names tapped on both models "
                                               "(default: each model's first two stages)")
    features: Literal["both", "rob", "std"] = option("both", help="whose tapped features the mixing network reads: "
                                                               "both base models (the paper's), or only h (rob) "
                                                               "or g (std)")
    widths: list[int] = option(help="three widths of the mixing network", default_factory=lambda: [256, 512, 1024])
    blocks: list[int] = option(help="residual blocks per group", default_factory=lambda: [2, 2, 2])
    std_scale: float = option(1.0, help="logit scale of g in the mixture")
    rob_scale: float = option(1.0, help="logit scale of h in the mixture")
    train_scale: float = option(2.0, help="sigmoid scale of the alpha head during training")
    train_shift: float = option(0.4, help="sigmoid shift of the alpha head during training")
    train_clamp_std: float | None = option(0.6, help="clamp of the normalised gamma during training, in standard "
                                                     "deviations (unset: no clamp)")
    bn_momentum: float = option(0.01, help="batch-norm momentum of the alpha head")
    rule: Literal["prob", "nonlinear"] = option("prob", help="mixture: prob (Eq. 3.4) or nonlinear (hardmax g, "
                                                            "MixedNUTS map of h with the nonlinear-* parameters)")
    nonlinear: NonlinearParams = option(help="the map of h for rule nonlinear", default_factory=NonlinearParams)
    # the training-time adversary
    recipe: Literal["paper", "cheap"] = option("paper", help="defaults of the options below that are left unset: "
                                               "paper (App. D.1: setting C with 1 APGD-CE + 9 targeted APGD-DLR "
                                               "copies of each input, chi-squared(75) steps, 9 extra clean batches, "
                                               "EMA 0.95, exponential warm-up) or cheap (setting B, one PGD copy, "
                                               "chi-squared(10) steps, no extra clean inputs, no EMA, linear warm-up: "
                                               "about 1/70 of the attack work)")
    setting: Literal["A", "B", "C"] | None = option(None, help="training-time attack: A gray-box PGD, B white-box "
                                                               "PGD, C APGD-CE + targeted APGD-DLR copies; none: the "
                                                               "recipe's")
    n_targets: int | None = option(None, help="setting C: targeted APGD-DLR copies of each input, one per target "
                                              "class (the highest other class, the next, ...), beside its APGD-CE "
                                              "copy; none: the recipe's")
    norm: Literal["linf", "l2"] | None = option(None, help="threat model; none: the robust checkpoint's")
    eps: float | None = option(None, help="attack radius in [0, 1] pixel units; none: the robust checkpoint's")
    eps_low: float = option(0.4, help="per-sample radius = eps * U(eps_low, eps_high)")
    eps_high: float = option(1.1, help="per-sample radius = eps * U(eps_low, eps_high)")
    attack_steps: int | None = option(None, help="mean number of attack steps (a chi-squared draw); none: the "
                                                 "recipe's")
    max_attack_steps: int | None = option(None, help="cap on the drawn number of steps; none: 3 * attack_steps")
    step_factor: float = option(5.0, help="PGD step = step_factor * eps / steps (the reference code's)")
    adaptive_weight_max: float = option(0.4, help="w ~ U(0, this) weighs the attacker's alpha term")
    momentum_max: float = option(0.9, help="PGD momentum decay ~ U(0, this) per batch (settings A, B; 0: none)")
    extra_clean: int | None = option(None, help="extra clean inputs per batch, in multiples of batch_size; none: "
                                                "the recipe's")
    # Eq. 4.2 weights, paper Table 6 best
    c_ce: float = option(0.0, help="weight of CE in Eq. 4.2")
    c_bce: float = option(1.5, help="weight of BCE in Eq. 4.2")
    c_prod: float = option(0.2, help="weight of CE*BCE in Eq. 4.2")
    clean_loss_scale: float = option(1.0, help="weight of the clean half of each batch in the loss")
    # optimisation
    lr: float = option(1e-4, help="learning rate (AdamW)")
    weight_decay: float = option(1e-5, help="weight decay")
    warmup_fraction: float = option(0.04, help="part of the steps with a learning-rate warm-up")
    warmup: Literal["linear", "exponential"] | None = option(None, help="warm-up shape: linear, or exponential "
                                                                       "(from 1/1000 of the lr); none: the recipe's")
    grad_clip: float | None = option(10.0, help="gradient-norm clip (unset: none)")
    ema_decay: float | None = option(None, help="EMA decay of the weights, in [0, 1) (0: off); none: the "
                                                "recipe's")
    bn_recalibration_batches: int = option(20, help="recent (clean + attacked) batches that re-estimate the "
                                                    "exported network's batch-norm statistics")
    precision: Precision = precision_option()
    channels_last: bool = channels_last_option()
    compile: bool = compile_option()
    accumulate: int = option(1, help="batches per optimizer step (gradient accumulation: one step on their joint "
                                     "mean loss)")
    epochs: int = option(5, help="training epochs")
    batch_size: int = option(128, help="training batch size (clean inputs; as many attacked ones join)")
    n_train: int | None = option(None, help="use only the first N training examples")
    val_fraction: float = option(0.1, help="hold out this part of the training set (the per-epoch measurement "
                                           "reads it; calibrate's default split val is the same images)")
    monitor_examples: int = option(256, help="held-out images measured after every epoch: clean and attacked "
                                             "accuracy at a fixed clean level, mean alpha clean vs attacked, "
                                             "detection AUC of alpha; 0: off")
    monitor_target_between: float = option(0.5, help="the fixed clean level of the per-epoch measurement: acc(h) + "
                                                     "this * (acc(g) - acc(h)) on the held-out images")
    keep_best: bool = option(True, help="export the epoch with the best attacked accuracy at the fixed clean "
                                        "level (else the last epoch)")
    eval_examples: int | None = option(500, help="test examples measured at the end (all if unset)")
    eval_pgd_steps: int = option(20, help="PGD steps of the final measurement")
    output: str = option("runs/mixnet", help="checkpoint path (writes OUTPUT.safetensors and OUTPUT.json)",
                         short="-o")
    resume: bool = option(True, help="continue from OUTPUT.resume.pt when it exists")
    save_every: int | None = option(None, help="also write the resume file every N steps inside an epoch; "
                                               "none: at the end of each epoch only")
    image: ImageOptions = image_options()
    workers: int = option(0, help="data-loading worker processes (0: load in the main process)")

    def validate(self) -> None:
        if not self.std or not self.rob:
            raise ConfigError("std and rob (the two base-model checkpoints) are required")
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        if self.setting is not None and self.setting not in SETTINGS:
            raise ConfigError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.warmup is not None and self.warmup not in WARMUPS:
            raise ConfigError(f"warmup must be one of {WARMUPS}, got {self.warmup!r}")
        check_eps(self.eps, self.norm)
        check_finite("eps_low", self.eps_low, 0, strict=True)
        check_finite("eps_high", self.eps_high, self.eps_low)
        if self.taps is not None and len(self.taps) != 2:
            raise ConfigError(f"taps must be two module names, got {self.taps}")
        check_counts(self, "epochs", "attack_steps", "eval_pgd_steps", "max_attack_steps", "n_train", "eval_examples",
                     "n_targets")
        check_counts(self, "monitor_examples", low=0)
        check_counts(self, "workers", low=0)
        check_counts(self, "accumulate", "save_every")
        check_precision(self.precision)
        self.image.validate()
        check_finite("monitor_target_between", self.monitor_target_between, 0, high=1)
        check_counts(self, "batch_size", low=2)  # batch-norm statistics need two inputs
        for name in ("std_scale", "rob_scale", "train_scale", "step_factor", "lr"):
            check_finite(name, getattr(self, name), 0, strict=True)
        check_finite("train_shift", self.train_shift)
        check_finite("train_clamp_std", self.train_clamp_std, 0, strict=True)
        check_finite("bn_momentum", self.bn_momentum, 0, below=1)
        check_finite("adaptive_weight_max", self.adaptive_weight_max, 0, below=1)
        check_finite("momentum_max", self.momentum_max, 0, below=1)
        check_counts(self, "extra_clean", low=0)
        self.nonlinear.validate()
        for name in ("c_ce", "c_bce", "c_prod", "clean_loss_scale", "weight_decay"):
            check_finite(name, getattr(self, name), 0)
        if self.c_ce + self.c_bce + self.c_prod == 0:
            raise ConfigError("loss weights c_ce, c_bce, c_prod must not all be zero")
        check_finite("grad_clip", self.grad_clip, 0, strict=True)
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        check_finite("warmup_fraction", self.warmup_fraction, 0, below=1)
        check_finite("val_fraction", self.val_fraction, 0, below=1)
        check_counts(self, "bn_recalibration_batches", low=0)


# ---------------------------------------------------------------------------- training-time attacks


def attack_loss(setting: str, weight: torch.Tensor | float = 0.0, base: str = "ce") -> Callable:
    """The attacker's objective (model, x, y) -> (N,) to maximise, for a mixed model.

    A: the base loss through ``mix(x, detach_alpha=True)`` (no gradient through alpha).
    B/C: ``adaptive_alpha_loss(weight, base)``: (1 - w) * base + w * BCE(alpha_logit, 1); maximising
    BCE(alpha, 1) = -log(alpha) drives alpha down, towards the non-robust g.
    """
    if setting not in SETTINGS:
        raise InputError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if setting == "A":
        base_loss = get_loss(base)
        return lambda model, x, y: base_loss(DetachedAlpha(model), x, y)
    return adaptive_alpha_loss(weight, base)


def random_attack_budget(n: int, cfg: MixnetTrainConfig, rng: np.random.Generator, device, dtype=torch.float32):
    """Per-sample eps (eps * U(low, high)), a chi-squared number of steps, per-sample weights w."""
    eps = cfg.eps * rng.uniform(cfg.eps_low, cfg.eps_high, size=n)
    cap = cfg.max_attack_steps or 3 * cfg.attack_steps
    steps = int(min(cap, max(1, round(rng.chisquare(cfg.attack_steps)))))
    w = rng.uniform(0.0, cfg.adaptive_weight_max, size=n)
    return (torch.as_tensor(eps, device=device, dtype=dtype), steps,
            torch.as_tensor(w, device=device, dtype=dtype))


def full_attack_budget(n: int, cfg: MixnetTrainConfig, device, dtype=torch.float32):
    """The strongest budget of the training attack, the same every time: the full eps, the mean number
    of steps and the largest alpha weight (the per-epoch measurement uses it)."""
    return (torch.full((n,), float(cfg.eps), device=device, dtype=dtype), int(cfg.attack_steps),
            torch.full((n,), float(cfg.adaptive_weight_max), device=device, dtype=dtype))


def attack_copies(cfg: MixnetTrainConfig, num_classes: int | None = None) -> int:
    """Attacked copies of each clean input: one for settings A and B; for C one APGD-CE copy and one
    targeted copy per target class that exists."""
    if cfg.setting != "C":
        return 1
    n_targets = cfg.n_targets if num_classes is None else min(cfg.n_targets, num_classes - 1)
    return 1 + n_targets


def craft_training_attack(model: AdaptiveMixedClassifier, x: torch.Tensor, y: torch.Tensor,
                          cfg: MixnetTrainConfig, rng: np.random.Generator,
                          rows: torch.Tensor | None = None, batch_rows: int | None = None,
                          budget: tuple | None = None) -> torch.Tensor:
    """Attacked copies of ``x`` against the current mixed model (mixing network in eval mode while
    crafting), ``attack_copies`` of them, copy-major: (copies * N, ...).

    A, B: one PGD copy. C: one APGD-CE copy and one targeted APGD-DLR copy per target class, all with
    the randomly weighted alpha term; misclassified inputs are attacked too (they still teach alpha).
    ``rows`` are the positions of ``x``'s inputs in a global batch of ``batch_rows`` (a torchrun rank's
    share; default: all of it). The budget (default: drawn at random, :func:`random_attack_budget`) is
    for the global batch and each input's random start is seeded by its position, so a share is
    attacked as it would be inside the whole batch.
    """
    batch_rows = x.shape[0] if batch_rows is None else batch_rows
    rows = torch.arange(batch_rows) if rows is None else rows.cpu()
    if rows.shape != (x.shape[0],):
        raise InputError(f"{x.shape[0]} inputs but {tuple(rows.shape)} row positions")
    eps, steps, w = budget if budget is not None else random_attack_budget(batch_rows, cfg, rng, x.device, x.dtype)
    eps, w = eps[rows.to(eps.device)], w[rows.to(w.device)]
    seed = int(rng.integers(2**31))
    momentum = float(rng.uniform(0.0, cfg.momentum_max)) if cfg.momentum_max > 0 else 0.0
    was_training = model.training
    model.eval()
    # a nonlinear mixture gives no useful gradient through g's hardmax: craft on its surrogate
    target = surrogate_for(model)
    try:
        if cfg.setting in ("A", "B"):
            attack = PGD(target, eps, cfg.norm, steps, step_size=cfg.step_factor * eps / steps,
                         loss=attack_loss(cfg.setting, w), seed=seed, momentum=momentum)
            return attack(x, y, rows)
        copies = [APGD(target, eps, cfg.norm, steps, loss=adaptive_alpha_loss(w, "ce"), seed=seed,
                       attack_misclassified=True)(x, y, rows)]
        with torch.no_grad():
            num_classes = target(x[:1]).shape[1]
        for rank in range(attack_copies(cfg, num_classes) - 1):
            # each copy its own random starts: row ids offset by whole global batches
            attack = APGDTargeted(target, eps, cfg.norm, steps, n_target_classes=cfg.n_targets, seed=seed,
                                  extra_loss=alpha_bce_loss, extra_weight=w, attack_misclassified=True,
                                  target_ranks=[rank])
            copies.append(attack(x, y, rows + (rank + 1) * batch_rows))
        return torch.cat(copies)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- training


WARMUP_START = 1e-3  # the exponential warm-up's first learning rate, as a fraction of lr


def lr_factor(step: int, total: int, warmup: int, shape: str = "linear") -> float:
    """The learning rate at ``step`` as a fraction of lr: a warm-up over ``warmup`` steps, linear from
    1/warmup or exponential (geometric) from WARMUP_START, reaching 1 at its last step; then cosine decay
    to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        t = (step + 1) / warmup
        return t if shape == "linear" else WARMUP_START ** (1 - t)
    t = min(step - warmup, total - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def recalibrate_batchnorm(model: AdaptiveMixedClassifier, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate every batch-norm statistic of the mixing network as a plain average over ``batches``.

    Running averages with a small momentum (0.01 for the alpha head) lag far behind the weights in
    short runs, and EMA weights never had statistics of their own; either way the evaluation-mode
    alpha would not match what training saw. Batches are run in training mode (batch statistics,
    the gamma clamp) without gradients; the model is left in eval mode.
    """
    if not batches:
        return
    norms = [m for m in model.mixing_net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for x in batches:
            g, h, first, second = model.base_outputs(x)
            model.mixing_net(first, second)
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.eval()


def monitor_epoch(model: AdaptiveMixedClassifier, data: Dataset, cfg: MixnetTrainConfig, device,
                  batch_size: int = 256) -> dict[str, float]:
    """The per-epoch measurement on held-out images, of the network as it would be exported.

    The sigmoid shift is set (bisection, as ``calibrate --param shift`` does) so that the clean accuracy
    is ``acc(h) + monitor_target_between * (acc(g) - acc(h))`` on these images; then every image is
    attacked with the training attack at its strongest fixed budget (:func:`full_attack_budget`, the
    same draws every epoch) against that calibrated model. Attacked accuracy counts an image correct
    only if every attacked copy is; the detection AUC says how well alpha separates attacked copies
    (higher alpha) from clean images. The stored head is left as it was.
    """
    model.eval()
    net = model.mixing_net
    x, y = (torch.cat(t).to(device) for t in zip(*data.batches(batch_size)))
    g, h, z = (torch.cat(p) for p in zip(*(model.head_inputs(x[i:i + batch_size])
                                          for i in range(0, x.shape[0], batch_size))))
    acc_g, acc_h = percent_correct(g, y), percent_correct(h, y)
    target = acc_h + cfg.monitor_target_between * (acc_g - acc_h)
    head = net.eval_head()
    scale = head["scale"]

    def clean_acc(shift: float) -> float:
        alpha, _ = ranged_alpha(z * scale + shift, head["alpha_min"], head["alpha_max"])
        return percent_correct(model.mix_from_logits(g, h, alpha), y)

    shift, reached_acc, reached = bisect_decreasing(clean_acc, -20.0, 20.0, target)
    net.set_eval_head(shift=shift)
    rng = np.random.default_rng([cfg.seed, 104729])  # the same attack draws every epoch
    alpha_clean, alpha_adv, robust = [], [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = craft_training_attack(model, xb, yb, cfg, rng, budget=full_attack_budget(len(xb), cfg, device))
            with torch.no_grad():
                alpha_clean.append(model.mix(xb).alpha)
                out = model.mix(x_adv)
            copies = x_adv.shape[0] // xb.shape[0]
            alpha_adv.append(out.alpha)
            correct = (out.logits.argmax(1) == yb.repeat(copies)).view(copies, -1)
            robust.append(correct.all(0).float())
    finally:
        net.set_eval_head(shift=head["shift"])
    alpha_clean, alpha_adv = torch.cat(alpha_clean), torch.cat(alpha_adv)
    return {"examples": int(x.shape[0]), "std_clean_acc": acc_g, "rob_clean_acc": acc_h, "target_clean_acc": target,
            "shift": shift, "clean_acc": reached_acc, "target_reached": reached,
            "attacked_acc": 100.0 * torch.cat(robust).mean().item(),
            "alpha_clean": alpha_clean.mean().item(), "alpha_attacked": alpha_adv.mean().item(),
            "detection_auc": roc_auc(alpha_clean, alpha_adv)}


def plot_training_curve(history: list[dict], path, title: str) -> None:
    """Per-epoch PNG: the monitor's clean and attacked accuracy, mean alpha clean vs attacked, AUC."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    mon = [r.get("monitor") for r in history]
    if all(m is not None for m in mon):
        left.plot(epochs, [m["clean_acc"] for m in mon], "o-", label="clean (calibrated to the fixed level)")
        left.plot(epochs, [m["attacked_acc"] for m in mon], "s-", label="attacked (training attack, full eps)")
        left.set_ylabel("held-out accuracy (%)")
        right.plot(epochs, [m["alpha_clean"] for m in mon], "o-", label="mean alpha, clean")
        right.plot(epochs, [m["alpha_attacked"] for m in mon], "s-", label="mean alpha, attacked")
        right.plot(epochs, [m["detection_auc"] for m in mon], "^--", label="detection AUC of alpha")
        right.set_ylim(0, 1.02)
    else:
        left.plot(epochs, [r["train_loss"] for r in history], "o-", label="training loss")
        right.plot(epochs, [r["alpha_clean"] for r in history], "o-", label="mean alpha, clean (training)")
        right.plot(epochs, [r["alpha_adv"] for r in history], "s-", label="mean alpha, attacked (training)")
    best = next((r["epoch"] for r in history if r.get("best")), None)
    for ax in (left, right):
        if best is not None:
            ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"kept: epoch {best}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def curve_path(output: str):
    from pathlib import Path

    return Path(str(output) + ".curve.png")


def _assert_frozen(model: AdaptiveMixedClassifier, reference: dict[str, torch.Tensor]) -> None:
    for name, tensor in list(model.std_model.state_dict().items()) + [
        ("rob." + k, v) for k, v in model.rob_model.state_dict().items()
    ]:
        if not torch.equal(tensor, reference[name]):
            raise RuntimeError(f"base model tensor {name} changed during mixing-network training")


def _base_snapshot(model: AdaptiveMixedClassifier) -> dict[str, torch.Tensor]:
    snap = {k: v.detach().clone() for k, v in model.std_model.state_dict().items()}
    snap.update({"rob." + k: v.detach().clone() for k, v in model.rob_model.state_dict().items()})
    return snap


def build_from_config(cfg: MixnetTrainConfig, input_shape: Sequence[int], device) -> AdaptiveMixedClassifier:
    std_model, std_info = load_model(cfg.std, device, model_dir=cfg.model_dir)
    rob_model, rob_info = load_model(cfg.rob, device, model_dir=cfg.model_dir)
    if None not in (std_info["num_classes"], rob_info["num_classes"]) and std_info["num_classes"] != rob_info["num_classes"]:
        raise ValueError(f"base models disagree on the class count: g has {std_info['num_classes']}, "
                         f"h has {rob_info['num_classes']}")
    model = build_adaptive_classifier(
        std_model, rob_model, input_shape, widths=cfg.widths, blocks=cfg.blocks,
        taps=tuple(cfg.taps) if cfg.taps else None, std_scale=cfg.std_scale, rob_scale=cfg.rob_scale,
        bn_momentum=cfg.bn_momentum, train_scale=cfg.train_scale, train_shift=cfg.train_shift,
        train_clamp_std=cfg.train_clamp_std, features=cfg.features,
    )
    model.std_checkpoint, model.rob_checkpoint = cfg.std, cfg.rob
    if cfg.rule == "nonlinear":
        model.nonlinear = cfg.nonlinear
    return model.to(device)


def resolve_recorded(cfg: MixnetTrainConfig) -> MixnetTrainConfig:
    """The config with data set, eps and norm taken from the base models' sidecars where not given."""
    cfg = with_recipe(cfg)
    cfg.validate()
    infos = _base_infos(cfg)
    dataset = recorded_dataset(cfg.dataset, infos, cfg.force_dataset)
    eps, norm = recorded_threat(cfg.eps, cfg.norm, infos[cfg.rob], cfg.rob)
    resolved = dataclasses.replace(cfg, dataset=dataset, eps=eps, norm=norm)
    resolved.validate()
    return resolved


def _monitor_data(cfg: MixnetTrainConfig, given: Dataset | None, image: Any = None) -> Dataset | None:
    """The held-out images of the per-epoch measurement: ``given``, else the first ``monitor_examples`` of
    the training set's val split (None: measurement off)."""
    if cfg.monitor_examples == 0:
        return None
    if given is None:
        if cfg.val_fraction == 0:
            logger.warning("no per-epoch measurement: val_fraction is 0, so no training images are held out")
            return None
        given = load_dataset(cfg.dataset, "val", cfg.data_dir, cfg.val_fraction, cfg.seed, image=image)
    return given.subset(cfg.monitor_examples)


class _MixnetSteps:
    """What is special to the mixing network, as the training engine's step function and per-epoch
    ``evaluate``: the attacked and extra clean inputs of each batch, the composite loss, the statistics of
    the epoch, and the export at its end (re-estimated batch norm, the held-out measurement, the checkpoint
    of the epoch)."""

    def __init__(self, model: AdaptiveMixedClassifier, cfg: MixnetTrainConfig, data: Dataset, dist, device,
                 monitor_data: Dataset | None):
        self.model, self.cfg, self.data, self.dist, self.device = model, cfg, data, dist, device
        self.monitor_data = monitor_data
        self.base_snapshot = _base_snapshot(model)
        self.recent: collections.deque = collections.deque(maxlen=max(1, cfg.bn_recalibration_batches))
        self.epoch: int | None = None
        self.sums: dict[str, float] = {}
        self.count = 0
        self.extra_order: torch.Tensor | None = None

    def _start_epoch(self, ctx: TrainContext) -> None:
        self.epoch = ctx.epoch
        self.recent.clear()
        self.sums = {"alpha_clean": 0.0, "alpha_adv": 0.0, "acc_clean": 0.0, "acc_adv": 0.0}
        self.count = 0
        if self.cfg.extra_clean:
            self.extra_order = epoch_permutation(len(self.data), ctx.stream_seed("extra-clean"), ctx.epoch)

    def _extra_clean(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``extra_clean`` more clean inputs per row: example i takes positions i*E ... i*E+E-1 of the epoch's
        extra order, so an epoch shows every image E more times whatever the batching or sharding."""
        e = self.cfg.extra_clean
        positions = (idx.view(-1, 1) * e + torch.arange(e)).view(-1) % len(self.data)
        x, y = self.data.load(self.extra_order[positions])
        return x.to(self.device), y.to(self.device)

    def step(self, trained: nn.Module, batch: tuple, ctx: TrainContext) -> torch.Tensor:
        if ctx.epoch != self.epoch:
            self._start_epoch(ctx)
        cfg, model, device = self.cfg, self.model, self.device
        x, y, idx = batch
        # the batch's attack budget: the same on every rank and after a resume; each row's random start is
        # seeded by its position in the global batch
        rng = np.random.default_rng([cfg.seed, ctx.epoch, ctx.batch])
        rows = torch.arange(self.dist.rank, cfg.batch_size, self.dist.world_size)
        x_adv = craft_training_attack(model, x, y, cfg, rng, rows=rows, batch_rows=cfg.batch_size)
        n, n_adv = x.shape[0], x_adv.shape[0]
        inputs, labels = torch.cat([x, x_adv]), torch.cat([y, y.repeat(n_adv // n)])
        pseudo = torch.cat([torch.zeros(n, device=device), torch.ones(n_adv, device=device)])
        sample_w = torch.cat([torch.full((n,), cfg.clean_loss_scale, device=device), torch.ones(n_adv, device=device)])
        if cfg.extra_clean:
            x_extra, y_extra = self._extra_clean(idx)
            m = x_extra.shape[0]
            inputs, labels = torch.cat([inputs, x_extra]), torch.cat([labels, y_extra])
            pseudo = torch.cat([pseudo, torch.zeros(m, device=device)])
            sample_w = torch.cat([sample_w, torch.full((m,), cfg.clean_loss_scale, device=device)])
        if cfg.bn_recalibration_batches > 0:
            self.recent.append(inputs.detach())
        model.train()
        with _mixing_through(model, trained):
            out = model.mix(inputs)
        per_sample = composite_loss(out.logits.float(), labels, out.alpha_logit.float(), pseudo,
                                    cfg.c_ce, cfg.c_bce, cfg.c_prod)
        with torch.no_grad():
            correct = (out.logits.argmax(1) == labels).float()
            self.sums["alpha_clean"] += out.alpha[:n].sum().item()
            self.sums["alpha_adv"] += out.alpha[n:n + n_adv].sum().item() * n / n_adv  # per clean input
            self.sums["acc_clean"] += correct[:n].sum().item()
            self.sums["acc_adv"] += correct[n:n + n_adv].sum().item() * n / n_adv
            self.count += n
        # every row carries the same weight, so this rank's weighted mean, weighted by its share of the
        # global batch (the engine), is the global weighted mean
        return (sample_w * per_sample).sum() / sample_w.sum()

    def end_epoch(self, network: nn.Module) -> dict[str, Any]:
        """The engine's ``evaluate``: ``network`` (the EMA copy of the mixing network) becomes the exported
        network of the epoch (batch norm re-estimated on the epoch's last batches), which is measured on the
        held-out images and written as the incomplete checkpoint of the run."""
        cfg, model, dist = self.cfg, self.model, self.dist
        _assert_frozen(model, self.base_snapshot)
        totals = dist.sum([*self.sums.values(), self.count])
        record: dict[str, Any] = {k: v / max(1, totals[-1]) for k, v in zip(self.sums, totals)}
        with _mixing_through(model, network):
            recalibrate_batchnorm(model, list(self.recent))  # every torchrun rank: the statistics are synchronised
            if self.monitor_data is not None:
                # evaluation mode has no collectives: rank 0 measures, the others take its numbers
                measured = monitor_epoch(model, self.monitor_data, cfg, self.device) if dist.is_main else None
                record["monitor"] = dist.broadcast(measured) if dist.active else measured
                record["held_out_attacked_acc"] = record["monitor"]["attacked_acc"]
            if dist.is_main:
                save_adaptive_classifier(model, cfg.output, {
                    "dataset": cfg.dataset, "setting": cfg.setting,
                    "training": {"config": asdict(cfg), "epoch": self.epoch + 1, "complete": False}})
        return record

    def export_last(self, net: nn.Module) -> None:
        """The network of the last epoch as exported (the engine left the EMA weights in ``net``)."""
        with _mixing_through(self.model, net):
            recalibrate_batchnorm(self.model, list(self.recent))


def train_mixnet(cfg: MixnetTrainConfig, train_data: Dataset | None = None,
                 eval_data: Dataset | None = None, monitor_data: Dataset | None = None) -> dict[str, Any]:
    """Train the mixing network per ``cfg`` on the training engine; measure every epoch; return the sidecar.

    ``monitor_data``: the held-out images of the per-epoch measurement (default: the val split).
    """
    cfg = resolve_recorded(cfg)
    dist = init_distributed(cfg.device)
    if cfg.batch_size < dist.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is smaller than the {dist.world_size} processes: "
                          f"every process needs inputs of each batch")
    device = resolve_device(dist.device(cfg.device))
    seed_everything(cfg.seed)
    given_train = train_data is not None
    image = cfg.image.fit(map(trained_input_shape, _base_infos(cfg).values()))
    if train_data is None:
        train_data = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.val_fraction, cfg.seed, image=image)
    train_data = train_data.subset(cfg.n_train)
    if eval_data is None:
        eval_data = load_dataset(cfg.dataset, "test", cfg.data_dir, image=image)
    eval_data = eval_data.subset(cfg.eval_examples)
    if monitor_data is not None or not given_train:
        monitor_data = _monitor_data(cfg, monitor_data, image)
    model = build_from_config(cfg, train_data.input_shape, device)
    if cfg.channels_last:
        to_channels_last(model)
    net = model.mixing_net
    if dist.active:  # before the engine copies it for the EMA: the copy's re-estimated statistics are global too
        synchronise_batchnorm(net)
    # full batches only (batch norm); the engine refuses a run that makes none
    total = optimizer_steps(len(train_data), cfg.batch_size, cfg.epochs, cfg.accumulate, drop_last=True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_fraction * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, cfg.warmup))
    steps = _MixnetSteps(model, cfg, train_data, dist, device, monitor_data)
    # always averaged (decay 0 copies the live weights): the engine then hands every epoch's end a copy
    # whose batch norm can be re-estimated without touching the network that trains on
    opts = EngineOptions(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers,
                         drop_last=True, precision=cfg.precision, channels_last=cfg.channels_last,
                         compile=cfg.compile, accumulate=cfg.accumulate, clip_grad_norm=cfg.grad_clip,
                         ema_decay=cfg.ema_decay or 0.0, save_every=cfg.save_every, progress=cfg.progress,
                         label=f"mixnet {cfg.setting}", run_name=cfg.output)
    generator = torch.Generator().manual_seed(cfg.seed)
    select = ("held_out_attacked_acc", "max") if (monitor_data is not None and cfg.keep_best) else None
    result = run_training(
        net, steps.step, train_data, opt, sched, opts, device=device, dist=dist,
        ctx=TrainContext(num_epochs=cfg.epochs, generator=generator, seed=cfg.seed), generator=generator,
        resume_file=resume_path(cfg.output), fingerprint=result_config(cfg), resume=cfg.resume,
        evaluate=steps.end_epoch, select=select, select_warn_drop=1.0, history_path=history_paths(cfg.output),
        history_config=cfg, plot=lambda history, _: plot_training_curve(
            history, curve_path(cfg.output), _curve_title(cfg, monitor_data)))
    if select is None:
        steps.export_last(net)
    restore_batchnorm(net)
    model.eval()
    kept = result.best_epoch or len(result.history)
    for r in result.history:
        r["best"] = r["epoch"] == kept
    if not dist.is_main:  # rank 0 measures and writes the checkpoint; the others take its record
        dist.barrier()
        return dist.broadcast(None)
    if result.history:  # again, now with the kept epoch marked
        plot_training_curve(result.history, curve_path(cfg.output), _curve_title(cfg, monitor_data))
    metrics = _quick_eval(model, eval_data, cfg, device)
    meta = {"dataset": cfg.dataset, "setting": cfg.setting,
            "training": {"config": asdict(cfg), "history": result.history, "seconds": result.seconds,
                         "images": _training_images(cfg, given_train), "kept_epoch": kept,
                         "input_shape": list(train_data.input_shape), "image": asdict(image)},
            "metrics": metrics}
    if dist.active:
        meta["training"]["processes"] = dist.world_size
    save_adaptive_classifier(model, cfg.output, meta)
    resume_path(cfg.output).unlink(missing_ok=True)
    dist.barrier()
    return dist.broadcast(meta)


def _base_infos(cfg: MixnetTrainConfig) -> dict[str, dict]:
    return {cfg.std: model_info(cfg.std, model_dir=cfg.model_dir), cfg.rob: model_info(cfg.rob, model_dir=cfg.model_dir)}


def _training_images(cfg: MixnetTrainConfig, given: bool) -> dict[str, Any] | None:
    """Which images trained the network, so that calibration can tell whether its split overlaps them."""
    if given:
        return None
    return {"dataset": cfg.dataset, "split": "train", "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "n_train": cfg.n_train}


def _curve_title(cfg: MixnetTrainConfig, monitor_data: Dataset | None) -> str:
    held_out = (f"{len(monitor_data)} held-out images, clean level acc(h) + {cfg.monitor_target_between:g} * "
                f"(acc(g) - acc(h))" if monitor_data is not None else "training batches (no held-out measurement)")
    attack = (f"setting C: APGD-CE + {cfg.n_targets} targeted APGD-DLR copies" if cfg.setting == "C"
              else f"setting {cfg.setting}: PGD")
    return (f"mixing network, recipe {cfg.recipe}: {attack}, {cfg.norm} eps={cfg.eps:g}, "
            f"{cfg.attack_steps} steps, alpha weight {cfg.adaptive_weight_max:g}\n{held_out}")


@contextlib.contextmanager
def _mixing_through(model: AdaptiveMixedClassifier, network: nn.Module):
    """``model`` mixes through ``network`` (the DDP wrapper of the mixing network in the training forward,
    or its EMA copy at the end of an epoch) for the duration of the block."""
    plain = model.mixing_net
    if network is plain:
        yield
        return
    model.mixing_net = network
    try:
        yield
    finally:
        model.mixing_net = plain


@torch.no_grad()
def _alpha_and_acc(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.mix(x)
    return out.alpha, (out.logits.argmax(1) == y).float()


def _quick_eval(model: AdaptiveMixedClassifier, data: Dataset, cfg: MixnetTrainConfig, device) -> dict:
    """Clean and white-box PGD accuracy (setting B, plain CE) with the mean alpha on each."""
    accs, alphas = {"clean": [], "pgd": []}, {"clean": [], "pgd": []}
    for x, y in data.batches(256):
        x, y = x.to(device), y.to(device)
        a, c = _alpha_and_acc(model, x, y)
        alphas["clean"].append(a)
        accs["clean"].append(c)
        x_adv = PGD(model, cfg.eps, cfg.norm, cfg.eval_pgd_steps, 2.5 * cfg.eps / cfg.eval_pgd_steps,
                    seed=cfg.seed)(x, y)
        a, c = _alpha_and_acc(model, x_adv, y)
        alphas["pgd"].append(a)
        accs["pgd"].append(c)
    s = cfg.eval_pgd_steps
    return {"clean_acc": 100 * torch.cat(accs["clean"]).mean().item(),
            f"pgd{s}_acc": 100 * torch.cat(accs["pgd"]).mean().item(),
            "alpha_clean_mean": torch.cat(alphas["clean"]).mean().item(),
            f"alpha_pgd{s}_mean": torch.cat(alphas["pgd"]).mean().item(),
            "eval_examples": len(data), "eval_eps": cfg.eps, "eval_norm": cfg.norm}
