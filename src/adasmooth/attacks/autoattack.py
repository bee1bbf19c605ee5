"""The reference AutoAttack (Croce & Hein 2020) through the PyPI package ``pyautoattack``.

``run_autoattack`` fixes and records the seed, adapts the number of target classes to the model
(k = min(9, C - 1)), captures the package's log, and reports its reliability flags. The package is
imported only when an AutoAttack runs. Its keyword names differ from the GitHub version:
``attacks=`` (not ``attacks_to_run``), ``batch_size=`` (not ``bs``).
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..core.errors import InputError, MissingDependencyError
from .adaptive import LogitsOnly
from .apgd import N_TARGET_CLASSES
from .base import Attack, AttackResult, is_mixed_model
from .losses import check_logits
from .registry import ATTACKS

__all__ = ["AutoAttackResult", "AutoAttackAttack", "run_autoattack", "AUTOATTACK_VERSIONS", "AUTOATTACK_ATTACKS"]

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# the package's check fires when Square lowers robust accuracy by more than 0.2 points
SQUARE_FLAG_POINTS = 0.2
_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


@dataclass
class AutoAttackResult:
    x_adv: torch.Tensor  # (N, ...) adversarial inputs (the clean input where every attack failed)
    robust: torch.Tensor  # (N,) bool: still correctly classified after every attack
    clean_correct: torch.Tensor  # (N,) bool
    broken_by: list[str | None]  # per input: "clean" (misclassified), "autoattack-<version>" or None
    robust_accuracy: dict[str, float]  # percent after "clean" and after each attack (cumulative)
    flags: list[str]  # reliability warnings: the package's, plus the Square check
    log: str  # everything the package logged
    seed: int
    version: str
    attacks: list[str]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def unreliable(self) -> bool:
        return any(f.startswith("square") for f in self.flags)


def _import_autoattack():
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "AutoAttack needs the PyPI package 'pyautoattack' (pip install pyautoattack)"
        ) from err
    return AutoAttack


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.stream = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.stream.write(f"{record.levelname.lower()}: {record.getMessage()}\n")


_ACC_LINE = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    n_target_classes: int | None = None,
    apgd_restarts: int | None = None,
    square_queries: int | None = None,
    verbose: bool = False,
) -> AutoAttackResult:
    """Run the reference AutoAttack on (x, y) and return x_adv, per-input outcomes, flags and log.

    ``version`` is standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand or custom (then give
    ``attacks``, names from ``AUTOATTACK_ATTACKS``). Attacks cascade: each runs only on the inputs
    still robust. ``apgd_restarts`` overrides the restarts of the untargeted APGD (the package's
    custom version defaults to 5, its standard version to 1); ``square_queries`` the query budget of
    Square (5000 in every version).
    """
    if norm not in _NORMS:
        raise InputError(f"unknown norm {norm!r}; use one of {tuple(_NORMS)}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise InputError(f"eps must be a number >= 0, got {eps!r}")
    if version not in AUTOATTACK_VERSIONS:
        raise InputError(f"unknown AutoAttack version {version!r}; use one of {AUTOATTACK_VERSIONS}")
    if version == "custom":
        if not attacks:
            raise InputError("version='custom' needs a list of attacks")
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown:
            raise InputError(f"unknown AutoAttack attack(s) {unknown}; known: {AUTOATTACK_ATTACKS}")
    elif attacks is not None:
        raise InputError(f"attacks can only be chosen with version='custom', not {version!r}")
    if seed is None:
        raise InputError("AutoAttack needs an explicit seed (None would seed from the clock)")
    if y.shape != (x.shape[0],):
        raise InputError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    device = torch.device(device) if device is not None else x.device
    AutoAttack = _import_autoattack()

    x = x.detach().to(device)
    y = y.to(device)
    with torch.no_grad():
        clean_logits = model(x[:batch_size])
    check_logits(clean_logits)
    n_classes = clean_logits.shape[1]
    k = min(n_target_classes or 9, n_classes - 1)

    adversary = AutoAttack(
        model, attacks=list(attacks) if attacks else None, device=device, eps=float(eps),
        norm=_NORMS[norm], seed=int(seed), version=version,
    )
    adversary.apgd_targeted.n_target_classes = k
    adversary.fab.n_target_classes = k
    if apgd_restarts is not None:
        adversary.apgd.n_restarts = int(apgd_restarts)
    if square_queries is not None:
        adversary.square.n_queries = int(square_queries)

    logger = logging.getLogger("auto-attack")
    handler = _ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    if verbose:
        echo = logging.StreamHandler()
        echo.setLevel(logging.DEBUG)
        logger.addHandler(echo)
    start = time.perf_counter()
    try:
        handler.stream.write(
            f"info: adasmooth run_autoattack version={version} attacks={adversary.attacks_to_run} "
            f"norm={norm} eps={eps} seed={seed} n={x.shape[0]} target_classes={k}\n"
        )
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(handler)
        if verbose:
            logger.removeHandler(echo)
        logger.setLevel(old_level)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        clean_pred = torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])
        adv_pred = torch.cat([model(xb).argmax(1) for xb in x_adv.split(batch_size)])
    clean_correct = clean_pred == y
    robust = clean_correct & (adv_pred == y)

    acc = {"clean": 100.0 * int(clean_correct.sum()) / max(x.shape[0], 1)}
    for line in handler.stream.getvalue().splitlines():
        m = _ACC_LINE.search(line)
        if m:
            acc[m.group(1).lower()] = float(m.group(2))
    flags = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    order = list(adversary.attacks_to_run)
    if "square" in acc and "square" in order:
        before = "clean"
        for name in order[: order.index("square")]:
            before = name if name in acc else before
        drop = acc[before] - acc["square"]
        if drop >= SQUARE_FLAG_POINTS:
            flags.append(
                f"square: Square lowered robust accuracy by {drop:.2f} points ({acc[before]:.2f}% -> "
                f"{acc['square']:.2f}%) after the gradient attacks: the gradient-based evaluation may be unreliable"
            )
    # AutoAttack only counts successes per attack, so a broken input is credited to AutoAttack as a whole
    name = f"autoattack-{version}"
    broken_by: list[str | None] = [None] * x.shape[0]
    for i in (~clean_correct).nonzero().squeeze(1).tolist():
        broken_by[i] = "clean"
    for i in (clean_correct & ~robust).nonzero().squeeze(1).tolist():
        broken_by[i] = name
    return AutoAttackResult(
        x_adv=x_adv.detach(), robust=robust.cpu(), clean_correct=clean_correct.cpu(), broken_by=broken_by,
        robust_accuracy=acc, flags=flags, log=handler.stream.getvalue(), seed=int(seed), version=version,
        attacks=order, seconds=seconds,
    )


class AutoAttackAttack(Attack):
    """The reference AutoAttack as an :class:`Attack`.

    ``run`` reports the package's reliability flags (and the Square check) in ``flags`` and credits
    every input AutoAttack broke to ``autoattack-<version>`` in ``broken_by``: the package counts
    successes per sub-attack but does not say which sub-attack broke which input. Further keyword
    arguments go to :func:`run_autoattack`.
    """

    def __init__(self, model: nn.Module, eps: float, norm: str = "linf", version: str = "standard",
                 attacks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 250, **kwargs):
        super().__init__(model, eps, norm, seed)
        self.kwargs = dict(eps=eps, norm=norm, version=version, attacks=attacks, seed=seed, batch_size=batch_size,
                           **kwargs)

    # ``ids`` are accepted for the common interface but cannot reach the reference package: it draws
    # from one global generator seeded per call, so its outcomes can depend on the batch.
    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return run_autoattack(self.model, x, y, **self.kwargs).x_adv

    def run(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> AttackResult:
        result = run_autoattack(self.model, x, y, **self.kwargs)
        return self.judge(result.x_adv, y, broken_by=result.broken_by, flags=result.flags)


@ATTACKS.register("C", description="white-box AutoAttack (pyautoattack standard) on the end-to-end mixture",
                  options=("n_target_classes",), requires="pyautoattack", mixed_only=True)
@ATTACKS.register("autoattack", description="reference AutoAttack (pyautoattack), standard version",
                  options=("n_target_classes",), requires="pyautoattack")
def build_autoattack(model, eps, norm, seed, batch_size, n_target_classes: int = N_TARGET_CLASSES) -> AutoAttackAttack:
    # AutoAttack expects a plain logits model; a mixed model is attacked end to end through alpha(x)
    target = LogitsOnly(model) if is_mixed_model(model) else model
    return AutoAttackAttack(target, eps=eps, norm=norm, version="standard", seed=seed, batch_size=batch_size,
                            n_target_classes=n_target_classes)
