"""Robustness evaluation: named attacks, per-input outcomes, the worst case over attacks.

Attack names (``make_attack``):

- ``pgd``: PGD-20 with a random start, end to end. ``apgd-ce``, ``apgd-dlr``, ``apgd-t``: our APGD.
- ``autoattack``: the reference AutoAttack (pyautoattack, standard version), end to end.
- On mixed classifiers (paper Section 4.2): ``A`` gray-box PGD-20 (no gradient through alpha(x)),
  ``B`` white-box PGD-20 (end to end), ``C`` white-box AutoAttack, ``D`` adaptive AutoAttack (APGD-CE
  and APGD-T with the alpha term, and a minimum-margin adaptive APGD-DLR taking gradients through a
  differentiable surrogate), ``std`` / ``rob`` transfer PGD-20 crafted on g / h alone.

``evaluate_robustness`` runs each attack on the inputs the model classifies correctly, records for
every input whether it survived each attack, takes the worst case over attacks, and says which
attacks broke which inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.adaptive import (
    DetachedAlpha,
    LogitsOnly,
    adaptive_alpha_loss,
    alpha_bce_loss,
    differentiable_surrogate,
    is_mixed_model,
)
from ..attacks.apgd import APGD, APGDTargeted
from ..attacks.autoattack import AutoAttackAttack
from ..attacks.base import check_attack_args
from ..attacks.losses import check_logits
from ..attacks.pgd import PGD
from ..core.io import format_table, write_result

__all__ = [
    "ATTACK_NAMES",
    "MIXED_ONLY_ATTACKS",
    "make_attack",
    "EnsembleAttack",
    "evaluate_robustness",
    "EvaluationReport",
    "report_rows",
    "write_report",
    "format_report",
]

ATTACK_NAMES = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "autoattack", "A", "B", "C", "D", "std", "rob")
MIXED_ONLY_ATTACKS = ("A", "B", "C", "D", "std", "rob")
ATTACK_DESCRIPTIONS = {
    "pgd": "PGD-20, random start, end-to-end gradient",
    "apgd-ce": "APGD on cross-entropy (100 steps, 1 restart)",
    "apgd-dlr": "APGD on the DLR loss (100 steps, 1 restart)",
    "apgd-t": "targeted APGD-DLR over the top-9 other classes (100 steps each)",
    "autoattack": "reference AutoAttack (pyautoattack), standard version",
    "A": "gray-box PGD-20: gradients of g and h, none through alpha(x); fixed (zero) start",
    "B": "white-box PGD-20: end-to-end gradient through alpha(x); fixed (zero) start",
    "C": "white-box AutoAttack (pyautoattack standard) on the end-to-end mixture",
    "D": "adaptive AutoAttack: APGD-CE and APGD-T with the alpha term (1-w)*loss + w*BCE(alpha_logit, 1), "
         "plus minimum-margin adaptive APGD-DLR through a differentiable surrogate",
    "std": "transfer PGD-20 crafted on the standard model g alone",
    "rob": "transfer PGD-20 crafted on the robust model h alone",
}


class _TransferAttack:
    """Craft on a source model; the evaluation measures the target model on the result."""

    def __init__(self, source: nn.Module, **pgd_kwargs):
        self.attack = PGD(source, **pgd_kwargs)

    def __call__(self, x, y):
        return self.attack(x, y)


class _SurrogateLoss:
    """An attack loss evaluated on a surrogate model (its gradient), whatever model APGD holds."""

    def __init__(self, loss, surrogate: nn.Module):
        self.loss = loss
        self.surrogate = surrogate

    def __call__(self, _model, x, y):
        return self.loss(self.surrogate, x, y)

    def select(self, index):
        inner = self.loss.select(index) if hasattr(self.loss, "select") else self.loss
        return _SurrogateLoss(inner, self.surrogate)


class EnsembleAttack:
    """Several attacks in turn, each on the inputs the previous ones left correctly classified.

    Returns, per input, the first misclassified point found (else the last attack's output);
    ``last_broken_by`` names the component that broke each input of the last call (None: none did).
    """

    def __init__(self, model: nn.Module, attacks: Sequence[tuple[str, Callable]]):
        if not attacks:
            raise ValueError("an ensemble needs at least one attack")
        self.model = model
        self.attacks = list(attacks)
        self.last_broken_by: list[str | None] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        result = x.clone()
        with torch.no_grad():
            robust = self.model(x).argmax(1) == y
        broken_by: list[str | None] = [None if r else "clean" for r in robust.tolist()]
        for name, attack in self.attacks:
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_adv = attack(x[idx], y[idx])
            with torch.no_grad():
                fooled = self.model(x_adv).argmax(1) != y[idx]
            result[idx] = x_adv
            robust[idx[fooled]] = False
            for i in idx[fooled].tolist():
                broken_by[i] = name
        self.last_broken_by = broken_by
        return result


def make_attack(
    name: str,
    model: nn.Module,
    eps: float,
    norm: str = "linf",
    seed: int = 0,
    batch_size: int = 250,
    adaptive_weight: float = 0.25,
    pgd_steps: int = 20,
    apgd_steps: int = 100,
    n_target_classes: int = 9,
):
    """The attack called ``name`` (see ``ATTACK_NAMES``) against ``model``: a callable (x, y) -> x_adv."""
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACK_NAMES)}")
    check_attack_args(eps, norm)
    mixed = is_mixed_model(model)
    if name in MIXED_ONLY_ATTACKS and not mixed:
        raise ValueError(
            f"attack {name!r} needs a mixed classifier (a model with mix(x, detach_alpha) exposing alpha(x)); "
            f"{type(model).__name__} is not one. Use pgd, apgd-ce, apgd-dlr, apgd-t or autoattack."
        )
    pgd = dict(eps=eps, norm=norm, steps=pgd_steps, seed=seed)
    apgd = dict(eps=eps, norm=norm, steps=apgd_steps, seed=seed)
    if name == "pgd":
        return PGD(model, **pgd)
    if name == "apgd-ce":
        return APGD(model, loss="ce", **apgd)
    if name == "apgd-dlr":
        return APGD(model, loss="dlr", **apgd)
    if name == "apgd-t":
        return APGDTargeted(model, n_target_classes=n_target_classes, **apgd)
    if name in ("autoattack", "C"):
        target = LogitsOnly(model) if mixed else model
        return AutoAttackAttack(target, eps=eps, norm=norm, version="standard", seed=seed, batch_size=batch_size,
                                n_target_classes=n_target_classes)
    if name == "A":
        return PGD(DetachedAlpha(model), random_start=False, **pgd)
    if name == "B":
        return PGD(LogitsOnly(model), random_start=False, **pgd)
    if name == "D":
        surrogate = differentiable_surrogate(model)
        return EnsembleAttack(model, [
            ("apgd-ce+alpha", APGD(model, loss=adaptive_alpha_loss(adaptive_weight, "ce"), **apgd)),
            ("apgd-t+alpha", APGDTargeted(model, n_target_classes=n_target_classes, extra_loss=alpha_bce_loss,
                                          extra_weight=adaptive_weight, **apgd)),
            ("apgd-dlr+alpha-min-margin", APGD(
                model, loss=_SurrogateLoss(adaptive_alpha_loss(adaptive_weight, "dlr"), surrogate),
                minimum_margin=True, **apgd)),
        ])
    source = model.std_model if name == "std" else model.rob_model
    return _TransferAttack(source, **pgd)


# ---------------------------------------------------------------------------- evaluation


@dataclass
class EvaluationReport:
    attacks: list[str]
    eps: float
    norm: str
    seed: int
    labels: list[int] = field(default_factory=list)
    clean_pred: list[int] = field(default_factory=list)
    # per attack, per input: True robust, False broken (or misclassified clean), None not run
    robust: dict[str, list[bool | None]] = field(default_factory=dict)
    adv_pred: dict[str, list[int | None]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)
    component_broken_by: dict[str, list[str | None]] = field(default_factory=dict)
    cascade: bool = False
    complete: bool = False

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> list[bool]:
        return [p == t for p, t in zip(self.clean_pred, self.labels)]

    def worst_case(self) -> list[bool]:
        """Per input: correct on the clean input and on every attack that ran on it."""
        out = []
        for i, ok in enumerate(self.clean_correct):
            out.append(ok and all(self.robust[a][i] is not False for a in self.attacks))
        return out

    def broken_by(self) -> list[list[str]]:
        """Per input: ``["clean"]`` when misclassified, else the attacks that broke it (empty: robust)."""
        out = []
        for i, ok in enumerate(self.clean_correct):
            out.append(["clean"] if not ok else [a for a in self.attacks if self.robust[a][i] is False])
        return out

    def accuracy(self, attack: str | None = None) -> float:
        """Percent correct: clean (attack None), after one attack, or "worst" (all attacks)."""
        if self.n == 0:
            return float("nan")
        if attack is None:
            vals = self.clean_correct
        elif attack == "worst":
            vals = self.worst_case()
        else:
            vals = [bool(v) for v in self.robust[attack]]
        return 100.0 * sum(vals) / self.n

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "clean_accuracy": self.accuracy(),
            "robust_accuracy": {a: self.accuracy(a) for a in self.attacks},
            "worst_case_accuracy": self.accuracy("worst"),
            "broken_only_by": {a: sum(1 for b in self.broken_by() if b == [a]) for a in self.attacks},
            "seconds": dict(self.seconds),
            "flags": {k: v for k, v in self.flags.items() if v},
            "cascade": self.cascade,
            "complete": self.complete,
        }

    def examples(self) -> list[dict[str, Any]]:
        worst, broken = self.worst_case(), self.broken_by()
        rows = []
        for i in range(self.n):
            row = {
                "index": i,
                "label": self.labels[i],
                "clean_pred": self.clean_pred[i],
                "clean_correct": self.clean_pred[i] == self.labels[i],
                "robust": {a: self.robust[a][i] for a in self.attacks},
                "adv_pred": {a: self.adv_pred[a][i] for a in self.attacks},
                "worst_case_robust": worst[i],
                "broken_by": broken[i],
            }
            comps = {a: c[i] for a, c in self.component_broken_by.items() if c[i] not in (None, "clean")}
            if comps:
                row["component"] = comps
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "attacks": {a: ATTACK_DESCRIPTIONS.get(a, a) for a in self.attacks},
            "eps": self.eps,
            "norm": self.norm,
            "summary": self.summary(),
            "examples": self.examples(),
        }


def _as_xy(data) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    x, y = data
    return x, y


def evaluate_robustness(
    model: nn.Module,
    data,
    attacks: Sequence[str] = ("apgd-ce", "apgd-t"),
    eps: float = 0.1,
    norm: str = "linf",
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    cascade: bool = False,
    attack_options: dict | None = None,
    on_batch: Callable[[EvaluationReport], None] | None = None,
) -> EvaluationReport:
    """Attack ``model`` on ``data`` (a Dataset or (x, y)) with each named attack; per-input outcomes.

    Every attack runs on the inputs classified correctly when clean (the others count as broken).
    With ``cascade=True`` an attack runs only on inputs that survived all earlier attacks (cheaper;
    the per-attack numbers are then cumulative and skipped inputs are recorded as None).
    ``on_batch`` receives the partial report after each batch (to save progress).
    """
    attacks = list(attacks)
    if not attacks:
        raise ValueError("give at least one attack")
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(ATTACK_NAMES)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack list has duplicates: {attacks}")
    check_attack_args(eps, norm)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_all, y_all = _as_xy(data)
    if x_all.shape[0] != y_all.shape[0]:
        raise ValueError(f"{x_all.shape[0]} inputs but {y_all.shape[0]} labels")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    options = dict(attack_options or {})
    built = {a: make_attack(a, model, eps, norm, seed=seed, batch_size=batch_size, **options) for a in attacks}

    report = EvaluationReport(attacks=attacks, eps=float(eps), norm=norm, seed=seed, cascade=cascade)
    for a in attacks:
        report.robust[a], report.adv_pred[a], report.seconds[a], report.flags[a] = [], [], 0.0, []
        if isinstance(built[a], EnsembleAttack):
            report.component_broken_by[a] = []

    n = x_all.shape[0]
    bar = tqdm(total=n * len(attacks), disable=not progress, desc="evaluate", unit="attack-input")
    try:
        for start in range(0, n, batch_size):
            xb = x_all[start : start + batch_size].to(device)
            yb = y_all[start : start + batch_size].to(device)
            with torch.no_grad():
                logits = model(xb)
            check_logits(logits)
            pred = logits.argmax(1)
            alive = pred == yb
            report.labels += yb.tolist()
            report.clean_pred += pred.tolist()
            for a in attacks:
                robust_b: list[bool | None] = [False] * len(yb)
                adv_b: list[int | None] = [None] * len(yb)
                idx = alive.nonzero().squeeze(1)
                if cascade:
                    for i in (~alive & (pred == yb)).nonzero().squeeze(1).tolist():
                        robust_b[i] = None
                if idx.numel():
                    t0 = time.perf_counter()
                    x_adv = built[a](xb[idx], yb[idx])
                    report.seconds[a] += time.perf_counter() - t0
                    with torch.no_grad():
                        adv_pred = model(x_adv).argmax(1)
                    ok = adv_pred == yb[idx]
                    for j, i in enumerate(idx.tolist()):
                        robust_b[i] = bool(ok[j])
                        adv_b[i] = int(adv_pred[j])
                    if cascade:
                        alive[idx[~ok]] = False
                    last = getattr(built[a], "last", None)
                    if last is not None:
                        report.flags[a] += [f for f in last.flags if f not in report.flags[a]]
                if a in report.component_broken_by:
                    comp: list[str | None] = [None] * len(yb)
                    for j, i in enumerate(idx.tolist()):
                        comp[i] = built[a].last_broken_by[j]
                    report.component_broken_by[a] += comp
                report.robust[a] += robust_b
                report.adv_pred[a] += adv_b
                bar.update(len(yb))
            if on_batch is not None:
                on_batch(report)
    finally:
        bar.close()
    report.complete = len(report.labels) == n
    return report


def report_rows(report: EvaluationReport) -> list[dict[str, Any]]:
    """Table rows: clean, each attack, worst case (accuracy in %, inputs broken, seconds)."""
    clean = report.accuracy()
    rows = [{"attack": "clean", "accuracy %": clean, "broken": report.n - sum(report.clean_correct), "seconds": None}]
    for a in report.attacks:
        broken = sum(1 for ok, r in zip(report.clean_correct, report.robust[a]) if ok and r is False)
        rows.append({"attack": a, "accuracy %": report.accuracy(a), "broken": broken,
                     "seconds": report.seconds.get(a)})
    worst = report.accuracy("worst")
    rows.append({"attack": "worst case", "accuracy %": worst,
                 "broken": sum(report.clean_correct) - sum(report.worst_case()), "seconds": sum(report.seconds.values())})
    return rows


def write_report(path: str | Path, report: EvaluationReport, config: Any = None) -> Path:
    """JSON with the summary and per-example outcomes (``reporting.write_result``)."""
    return write_result(path, report.to_dict(), config=config, seed=report.seed)


def format_report(report: EvaluationReport) -> str:
    text = format_table(report_rows(report))
    flags = report.summary()["flags"]
    for attack, msgs in flags.items():
        for msg in msgs:
            text += f"\n[{attack}] flag: {msg}"
    return text
