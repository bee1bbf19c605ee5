"""The paper's Table 2/3: clean and attacked accuracy of base, adaptive and fixed-alpha classifiers
under the attack settings A-D, one row per model."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from ..data import Dataset
from .robustness import evaluate_robustness

__all__ = ["REPORT_SETTINGS", "report_table", "report_attacks"]

REPORT_SETTINGS = ("A", "B", "C", "D")

# Which attacks of :mod:`adasmooth.evaluate.robustness` fill each column. A base model has no alpha(x): its A
# and B columns are PGD-20, C the reference AutoAttack, and D the APGD-CE + APGD-T pair that
# adaptive AutoAttack is built on (without the alpha term, which has nothing to act on).
_BASE_ATTACKS = {"A": ["pgd"], "B": ["pgd"], "C": ["autoattack"], "D": ["apgd-ce", "apgd-t"]}


def report_attacks(settings: Sequence[str]) -> list[str]:
    """Every attack name a report with these columns runs (on base models and on mixtures)."""
    return list(dict.fromkeys([*settings, *(a for s in settings for a in _BASE_ATTACKS.get(s, ()))]))


def report_table(models: dict[str, nn.Module], data: Dataset, eps: float, norm: str = "linf",
                 settings: Sequence[str] = ("A", "B", "C", "D"), batch_size: int = 250, seed: int = 0,
                 progress: bool = True, attack_options: dict | None = None) -> list[dict[str, Any]]:
    """Table 2/3 rows: per model its clean accuracy and its accuracy (%) under each setting.

    A gray-box PGD-20, B white-box PGD-20, C AutoAttack, D adaptive AutoAttack (the alpha term), as
    defined by ``adasmooth.evaluate.robustness.make_attack``; mixed models also report their mean alpha.
    """
    bad = [s for s in settings if s not in _BASE_ATTACKS]
    if bad:
        raise ConfigError(f"unknown setting(s) {bad}; use A, B, C, D")
    rows = []
    for name, model in models.items():
        model.eval()
        mixed = hasattr(model, "mix")
        columns = {s: ([s] if mixed else _BASE_ATTACKS[s]) for s in settings}
        attacks = list(dict.fromkeys(a for names in columns.values() for a in names))
        rep = evaluate_robustness(model, data, attacks=attacks, eps=eps, norm=norm, batch_size=batch_size,
                                  seed=seed, progress=progress, attack_options=attack_options)
        row: dict[str, Any] = {"model": name, "clean": rep.accuracy()}
        for s, names in columns.items():
            ok = [c and all(rep.robust[a][i] is not False for a in names) for i, c in enumerate(rep.clean_correct)]
            row[s] = 100.0 * sum(ok) / max(1, len(ok))
        if mixed:
            device = next(model.parameters()).device
            with torch.no_grad():
                alphas = [model.mix(x.to(device)).alpha.reshape(-1) for x, _ in data.batches(batch_size)]
            row["alpha_mean"] = float(torch.cat(alphas).float().mean())
        row["seconds"] = sum(rep.seconds.values())
        rows.append(row)
    return rows


