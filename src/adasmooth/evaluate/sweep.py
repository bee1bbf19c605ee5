"""The fixed-alpha sweep (paper Section 5.1.1, Figures 1, 4 and 5).

For each alpha, the mixed classifier h_alpha of a standard model g and a robust model h is measured
clean and under three PGD attacks:

- STD attack: crafted on g alone, then fed to h_alpha (a transfer attack);
- ROB attack: crafted on h alone, then fed to h_alpha (a transfer attack);
- MIX attack: crafted end to end on h_alpha itself (white box).

A variant whose rule declares parameters uses ``rule_params[variant]`` (``--nonlinear-s`` ...); the
nonlinear (MixedNUTS) variant's MIX attack takes its
gradients from the differentiable surrogate of :mod:`adasmooth.attacks.nonlinear` (the true mixture
gives g's hardmax no gradient) and is judged on the true mixture.

STD and ROB examples do not depend on alpha, so they are crafted once and reused for every alpha
and every mixing variant; only the MIX attack is crafted per (alpha, variant). g and h alone are
measured too (clean, and under the attack crafted on themselves) as the reference lines of Figure 4.

Each PGD call on batch ``b`` is seeded with ``seed + b``, for every model, so the MIX attack at
alpha = 0 (alpha = 1) replays the STD (ROB) attack exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn
from ..core.progress import progress_bar

from ..attacks import PGD
from ..core.checks import check_eps, check_finite
from ..core.config import (CheckpointDataOptions, DataLoadingOptions, batch_size_option, n_examples_option, option,
                           output_option, rule_params_option)
from ..core.errors import ConfigError, InputError
from ..data import DATASETS, Dataset
from ..data.images import ImageOptions, image_options
from ..mixing import MIXING_RULES, MixedClassifier, build_rule, check_rule_params
from ..models.loader import model_dir_option
from ..attacks.nonlinear import surrogate_for
from ..mixing.nonlinear import NonlinearParams

__all__ = ["SweepConfig", "SweepResult", "alpha_sweep", "craft_adversarial", "variant_classifier",
           "variant_labels"]

# The mixing variants are the entries of adasmooth.mixing.MIXING_RULES: "prob" is the paper's Eq. 3.4,
# the built-in others are the ablations of Figure 1. A newly registered rule is a variant at once.


def variant_labels() -> dict[str, str]:
    """Legend label of every mixing variant (a rule's ``label``, else its name)."""
    return {name: MIXING_RULES.info(name).get("label", name) for name in MIXING_RULES.names()}


ROW_KEYS = ("variant", "alpha", "clean_acc", "std_attack_acc", "rob_attack_acc", "mix_attack_acc", "worst_attack_acc")


def _default_alphas() -> list[float]:
    return [round(0.1 * i, 10) for i in range(11)]


@dataclass
class SweepConfig(CheckpointDataOptions, DataLoadingOptions):
    """Everything ``adasmooth sweep`` needs; keys of a ``--config`` YAML file are these fields."""

    std: str | None = option(None, help="standard model g: a checkpoint path, robustbench:, python:, timm: "
                                        "or torchvision: spec")
    rob: str | None = option(None, help="robust model h (any model spec, as --std)")
    model_dir: str | None = model_dir_option()
    alphas: list[float] = option(default_factory=_default_alphas,
                                 help="mixing weights of h, as 0,0.5,1 or start:stop:step")
    eps: float | None = option(None, help="attack radius; none: the robust checkpoint's")
    norm: Literal["linf", "l2"] | None = option(None, help="threat model; none: the robust checkpoint's")
    steps: int = option(20, help="PGD steps of the STD, ROB and MIX attacks")
    step_size: float | None = option(None, help="PGD step size; none: 2.5 * eps / steps")
    variants: list[str] = option(default_factory=lambda: ["prob"],
                                 help="mixing rules to sweep", registry="adasmooth.mixing:MIXING_RULES")
    image: ImageOptions = image_options()
    n_examples: int | None = n_examples_option(1000)
    batch_size: int = batch_size_option(256)
    std_scale: float = option(1.0, help="logit scale s_g of the standard model")
    rob_scale: float = option(1.0, help="logit scale s_h of the robust model")
    rule_params: dict[str, Any] = rule_params_option()
    output: str = output_option("runs/sweep", "output folder: sweep.json, sweep.csv and two PNGs")

    def validate(self) -> None:
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ConfigError(f"unknown data set {self.dataset!r}; known: {', '.join(DATASETS)}")
        check_alphas(self.alphas)
        check_variants(self.variants)
        check_eps(self.eps, self.norm)
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ConfigError(f"n_examples must be >= 1, got {self.n_examples}")
        check_finite("std_scale", self.std_scale, 0, strict=True)
        check_finite("rob_scale", self.rob_scale, 0, strict=True)
        check_rule_params(self.rule_params, self.variants)


def check_alphas(alphas: Sequence[float]) -> list[float]:
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("no alphas given")
    bad = [a for a in alphas if math.isnan(a) or not 0.0 <= a <= 1.0]
    if bad:
        raise ConfigError(f"every alpha must lie in [0, 1]; got {bad}")
    return alphas


def check_variants(variants: Sequence[str]) -> list[str]:
    variants = list(variants)
    if not variants:
        raise ConfigError("no mixing variants given")
    unknown = [v for v in variants if v not in MIXING_RULES]
    if unknown:
        raise ConfigError(f"unknown mixing variant(s) {unknown}; known: {MIXING_RULES.names()}")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"mixing variants repeat: {variants}")
    return variants


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per (alpha, variant), keys ROW_KEYS, accuracies in %
    reference: dict[str, float]  # g and h alone, accuracies in %
    n_examples: int


def variant_classifier(std_model: nn.Module, rob_model: nn.Module, alpha: float, variant: str, norm: str = "linf",
                       std_scale: float = 1.0, rob_scale: float = 1.0,
                       nonlinear: NonlinearParams | None = None,
                       rule_params: Any = None) -> MixedClassifier:
    """The fixed-alpha mixed classifier of one named variant (a ``MIXING_RULES`` entry) with the rule's
    parameters ``rule_params`` (its dataclass or a mapping; default: the registered rule's); ``nonlinear``
    is the nonlinear variant's map."""
    check_variants([variant])
    if variant == "nonlinear" and nonlinear is not None:
        rule_params = nonlinear
    rule = variant if rule_params is None else build_rule(variant, rule_params)
    return MixedClassifier(std_model, rob_model, alpha, std_scale=std_scale, rob_scale=rob_scale,
                           rule=rule, norm=norm).eval()


def _batches(data: Dataset, batch_size: int, device: torch.device):
    for b, (x, y) in enumerate(data.batches(batch_size)):
        yield b, x.to(device), y.to(device)


def craft_adversarial(model: nn.Module, data: Dataset, eps: float, norm: str, steps: int, step_size: float | None,
                      batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """PGD examples crafted on ``model`` for the whole of ``data``, batch b seeded with seed + b."""
    out = []
    for b, x, y in _batches(data, batch_size, device):
        out.append(PGD(model, eps, norm, steps, step_size, seed=seed + b)(x, y).detach())
    return torch.cat(out)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-example correctness (bool, (N,)) of ``model`` on x (already on the model's device)."""
    hits = []
    for i in range(0, len(x), batch_size):
        hits.append(model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size])
    return torch.cat(hits)


def _pct(mask: torch.Tensor) -> float:
    return 100.0 * mask.float().mean().item()


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def alpha_sweep(
    std_model: nn.Module,
    rob_model: nn.Module,
    data: Dataset,
    alphas: Sequence[float],
    eps: float,
    *,
    norm: Literal["linf", "l2"] = "linf",
    steps: int = 20,
    step_size: float | None = None,
    variants: Sequence[str] = ("prob",),
    batch_size: int = 256,
    seed: int = 0,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
    progress: bool = True,
    on_alpha: Callable[[SweepResult], None] | None = None,
    nonlinear: NonlinearParams | None = None,
    rule_params: dict[str, Any] | None = None,
) -> SweepResult:
    """Accuracy (%) of fixed-alpha mixtures of g = ``std_model`` and h = ``rob_model`` on ``data``.

    Everything after ``eps`` is keyword-only. Rows come in the order of ``alphas``, each alpha once per variant. ``on_alpha`` is called with
    the result so far after each alpha (write partial results from it). Both models are put in
    eval mode; the data is moved to the device of ``std_model``. ``rule_params``: {variant: its rule's
    parameters} (:func:`~adasmooth.mixing.rules.build_rule`); ``nonlinear``: the nonlinear variant's.
    """
    alphas = check_alphas(alphas)
    variants = check_variants(variants)
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    if len(data) == 0:
        raise InputError("the data set is empty")
    std_model.eval()
    rob_model.eval()
    device = _model_device(std_model)
    x = data.x.to(device)
    y = data.y.to(device)

    def craft(model: nn.Module) -> torch.Tensor:
        return craft_adversarial(model, data, eps, norm, steps, step_size, batch_size, seed, device)

    # The transfer attacks do not depend on alpha: craft them once.
    x_std = craft(std_model)
    x_rob = craft(rob_model)
    g_clean, h_clean = _correct(std_model, x, y, batch_size), _correct(rob_model, x, y, batch_size)
    reference = {
        "g_clean_acc": _pct(g_clean),
        "g_std_attack_acc": _pct(_correct(std_model, x_std, y, batch_size)),
        "g_rob_attack_acc": _pct(_correct(std_model, x_rob, y, batch_size)),
        "h_clean_acc": _pct(h_clean),
        "h_rob_attack_acc": _pct(_correct(rob_model, x_rob, y, batch_size)),
        "h_std_attack_acc": _pct(_correct(rob_model, x_std, y, batch_size)),
    }
    result = SweepResult(rows=[], reference=reference, n_examples=len(data))
    bar = progress_bar(total=len(alphas) * len(variants), desc="alpha sweep", disable=not progress, leave=False)
    for alpha in alphas:
        for variant in variants:
            mixed = variant_classifier(std_model, rob_model, alpha, variant, norm, std_scale, rob_scale, nonlinear,
                                       (rule_params or {}).get(variant))
            clean = _correct(mixed, x, y, batch_size)
            on_std = _correct(mixed, x_std, y, batch_size)
            on_rob = _correct(mixed, x_rob, y, batch_size)
            x_mix = craft(surrogate_for(mixed))  # the model itself unless its gradients are useless
            on_mix = _correct(mixed, x_mix, y, batch_size)
            result.rows.append({
                "variant": variant,
                "alpha": alpha,
                "clean_acc": _pct(clean),
                "std_attack_acc": _pct(on_std),
                "rob_attack_acc": _pct(on_rob),
                "mix_attack_acc": _pct(on_mix),
                # an example counts only if it survives all three attacks
                "worst_attack_acc": _pct(on_std & on_rob & on_mix),
            })
            bar.update(1)
            bar.set_postfix(alpha=alpha, variant=variant)
        if on_alpha is not None:
            on_alpha(result)
    bar.close()
    return result
