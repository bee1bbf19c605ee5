"""Robustness evaluation: per-input outcomes of named attacks, the worst case over attacks.

The attacks are those of ``adasmooth.attacks`` (``list_attacks()``, ``attack_description(name)``,
``make_attack``): ``pgd``, ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``autoattack`` on any model, and the
settings ``A``, ``B``, ``C``, ``D``, ``std``, ``rob`` of paper Section 4.2 on mixed classifiers.

``evaluate_robustness`` runs each attack on the inputs the model classifies correctly, records for
every input whether it survived each attack, takes the worst case over attacks, and says which
attacks (and, for attacks made of parts, which part) broke which inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from ..core.progress import progress_bar

from ..attacks import Attack, attack_description, check_attack_requirements, list_attacks, make_attack
from ..attacks.base import AttackResult, check_attack_args, check_batch
from ..attacks.losses import check_logits
from ..core.errors import ConfigError
from ..core.io import format_table, write_result
from ..core.precision import check_precision, numerics, prepare_model

__all__ = [
    "evaluate_robustness",
    "EvaluationReport",
    "report_rows",
    "write_report",
    "format_report",
    "report_from_examples",
    "judge_fp32",
]


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
    # the example index of each input in the data set (None: 0, 1, 2, ...); set for a shard or a resumed run
    indices: list[int] | None = None
    precision: str = "fp32"  # of the attacks; every outcome is judged by an fp32 forward pass

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
            "precision": self.precision,
        }

    def examples(self) -> list[dict[str, Any]]:
        worst, broken = self.worst_case(), self.broken_by()
        indices = self.indices if self.indices is not None else range(self.n)
        rows = []
        for i, index in zip(range(self.n), indices):
            row = {
                "index": index,
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
            "attacks": {a: attack_description(a) for a in self.attacks},
            "eps": self.eps,
            "norm": self.norm,
            "precision": self.precision,
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
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    indices: Sequence[int] | None = None,
    done_before: int = 0,
) -> EvaluationReport:
    """Attack ``model`` on ``data`` (a Dataset or (x, y)) with each named attack; per-input outcomes.

    The attacks run at ``precision`` (``core.precision.PRECISIONS``), optionally on channels-last
    weights and a compiled model; whatever they ran at, an input counts as broken only if ``model``
    misclassifies the attack's final point in an fp32 forward pass (:func:`judge_fp32`), so a low
    precision can never report a robustness the fp32 model does not have.

    Every attack runs on the inputs classified correctly when clean (the others count as broken).
    With ``cascade=True`` an attack runs only on inputs that survived all earlier attacks (cheaper;
    the per-attack numbers are then cumulative and skipped inputs are recorded as None).
    ``on_batch`` receives the partial report after each batch (to save progress); ``done_before``
    counts the inputs an earlier run finished (the progress bar starts there).

    Each input's random draws (random starts, restarts) are seeded from (seed, its index): ``indices``
    gives the inputs' indices in their data set (default 0, 1, 2, ...), so its outcome is the same
    whatever the batch size, the shard of a multi-process run, or the point a run was resumed from.
    (The reference AutoAttack, ``autoattack``/``C``, draws from its own generator per call.)
    """
    attacks = list(attacks)
    if not attacks:
        raise ConfigError("give at least one attack")
    known = list_attacks()
    unknown = [a for a in attacks if a not in known]
    if unknown:
        raise ConfigError(f"unknown attack(s) {unknown}; known: {', '.join(known)}")
    if len(set(attacks)) != len(attacks):
        raise ConfigError(f"attack list has duplicates: {attacks}")
    check_attack_args(eps, norm)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    check_attack_requirements(attacks)
    x_all, y_all = _as_xy(data)
    check_batch(x_all, y_all)  # values checked once here, on the host, before any attack runs
    ids_all = torch.arange(len(y_all)) if indices is None else torch.as_tensor(list(indices), dtype=torch.int64)
    if ids_all.shape != (len(y_all),):
        raise ConfigError(f"indices must give one index per input ({len(y_all)}), got {tuple(ids_all.shape)}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    options = dict(attack_options or {})
    check_precision(precision)
    attacked = prepare_model(model, precision, channels_last, compile)

    def build(name: str, attack_seed: int) -> Attack:
        return make_attack(name, attacked, eps, norm, seed=attack_seed, batch_size=batch_size, **options)

    built = {a: build(a, seed) for a in attacks}

    report = EvaluationReport(attacks=attacks, eps=float(eps), norm=norm, seed=seed, cascade=cascade,
                              precision=precision, indices=None if indices is None else ids_all.tolist())
    judge = None if attacked is model else model
    for a in attacks:
        report.robust[a], report.adv_pred[a], report.seconds[a], report.flags[a] = [], [], 0.0, []
        if built[a].components:
            report.component_broken_by[a] = []

    n = x_all.shape[0]
    bar = progress_bar(total=(n + done_before) * len(attacks), initial=done_before * len(attacks),
                       disable=not progress, desc="evaluate", unit="attack-input")
    try:
        for start in range(0, n, batch_size):
            xb = x_all[start : start + batch_size].to(device)
            yb = y_all[start : start + batch_size].to(device)
            with torch.no_grad(), numerics("fp32"):
                logits = model(xb)
            check_logits(logits)
            pred = logits.argmax(1)
            alive = pred == yb
            report.labels += yb.tolist()
            report.clean_pred += pred.tolist()
            for a in attacks:
                with numerics(precision):
                    _run_on_batch(report, a, built[a], xb, yb, pred, alive, cascade, judge,
                                  ids_all[start : start + batch_size])
                bar.update(len(yb))
            if on_batch is not None:
                on_batch(report)
    finally:
        bar.close()
    report.complete = len(report.labels) == n
    return report


def judge_fp32(model: nn.Module, result: AttackResult, y: torch.Tensor) -> AttackResult:
    """``result`` judged again by an fp32 forward pass of ``model`` at its final points: ``fooled``,
    ``predicted`` and ``margin`` are fp32's; ``broken_by`` keeps only the inputs fp32 finds broken."""
    with torch.no_grad(), numerics("fp32"):
        logits = model(result.x_adv).float()
    judged = AttackResult.from_logits(result.x_adv, logits, y, flags=result.flags)
    judged.broken_by = [b if f else None for b, f in zip(result.broken_by, judged.fooled.tolist())]
    return judged


def _run_on_batch(report: EvaluationReport, name: str, attack: Attack, xb: torch.Tensor, yb: torch.Tensor,
                  pred: torch.Tensor, alive: torch.Tensor, cascade: bool, judge: nn.Module | None = None,
                  ids: torch.Tensor | None = None) -> None:
    """Attack the ``alive`` inputs of one batch and append their outcomes to ``report``.

    With ``cascade`` the inputs broken here leave ``alive`` (in place), and the inputs an earlier
    attack broke are recorded as None (not run). ``judge``: the fp32 model that decides the outcome
    when the attack ran on another form of it (low precision, compiled).
    """
    robust_b: list[bool | None] = [False] * len(yb)
    adv_b: list[int | None] = [None] * len(yb)
    comp_b: list[str | None] = [None] * len(yb)
    idx = alive.nonzero().squeeze(1)
    if cascade:
        for i in (~alive & (pred == yb)).nonzero().squeeze(1).tolist():
            robust_b[i] = None
    if idx.numel():
        t0 = time.perf_counter()
        result = attack.run(xb[idx], yb[idx], None if ids is None else ids[idx.cpu()])
        if judge is not None:
            result = judge_fp32(judge, result, yb[idx])
        ok = ~result.fooled.to(yb.device)
        ok_list, predicted = ok.tolist(), result.predicted.tolist()  # one read-back, after the device finished
        report.seconds[name] += time.perf_counter() - t0
        for j, i in enumerate(idx.tolist()):
            robust_b[i] = ok_list[j]
            adv_b[i] = predicted[j]
            comp_b[i] = result.broken_by[j]
        if cascade:
            alive[idx[~ok]] = False
        report.flags[name] += [f for f in result.flags if f not in report.flags[name]]
    if name in report.component_broken_by:
        report.component_broken_by[name] += comp_b
    report.robust[name] += robust_b
    report.adv_pred[name] += adv_b


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


def report_from_examples(examples: Sequence[dict[str, Any]], attacks: Sequence[str], eps: float, norm: str,
                         seed: int, cascade: bool = False, seconds: dict[str, float] | None = None,
                         flags: dict[str, list[str]] | None = None) -> EvaluationReport:
    """The report holding these per-example records (``EvaluationReport.examples()`` rows, from any
    number of batches, shards or resumed runs), in example-index order."""
    rows = sorted(examples, key=lambda r: int(r["index"]))
    report = EvaluationReport(attacks=list(attacks), eps=float(eps), norm=norm, seed=seed, cascade=cascade,
                              complete=True, indices=[int(r["index"]) for r in rows])
    report.labels = [int(r["label"]) for r in rows]
    report.clean_pred = [int(r["clean_pred"]) for r in rows]
    for a in attacks:
        report.robust[a] = [r["robust"][a] for r in rows]
        report.adv_pred[a] = [r["adv_pred"][a] for r in rows]
        report.seconds[a] = float((seconds or {}).get(a, 0.0))
        report.flags[a] = list((flags or {}).get(a, []))
    with_components = sorted({a for r in rows for a in r.get("component", {})})
    for a in with_components:
        report.component_broken_by[a] = [r.get("component", {}).get(a) for r in rows]
    return report
