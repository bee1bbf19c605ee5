"""The named attacks: one registry, filled by the file that implements each attack.

    @ATTACKS.register("pgd", description="PGD-20, random start", options=("pgd_steps",))
    def build_pgd(model, eps, norm, seed, batch_size, pgd_steps=PGD_STEPS):
        return PGD(model, eps, norm, steps=pgd_steps, seed=seed)

A factory takes ``(model, eps, norm, seed, batch_size, **options)`` and returns an
:class:`~adasmooth.attacks.base.Attack`. What a registration may declare:

- ``description``: one line for ``--help`` and the report files.
- ``options``: the names of the keyword options the factory takes; ``make_attack`` hands each
  factory only its own, so one option set can serve a whole list of attacks.
- ``mixed_only=True``: the attack needs a mixed classifier (a model with ``mix(x, detach_alpha)``).
- ``requires="package"``: an optional package the attack imports when it runs.

Adding an attack: one file with the attack and its registration, and one import line in
``adasmooth/attacks/__init__.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterable

from torch import nn

from ..core.errors import ConfigError, MissingDependencyError
from ..core.registry import Registry
from .base import Attack, check_attack_args, is_mixed_model

__all__ = [
    "ATTACKS",
    "make_attack",
    "list_attacks",
    "attack_description",
    "check_attack_requirements",
    "ATTACK_NAMES",
    "ATTACK_DESCRIPTIONS",
]

AttackFactory = Callable[..., Attack]

ATTACKS: Registry[AttackFactory] = Registry("attack")


def list_attacks(model: nn.Module | None = None) -> list[str]:
    """The registered attack names, in registration order; with ``model``, those that can attack it."""
    if model is None or is_mixed_model(model):
        return ATTACKS.names()
    return [name for name in ATTACKS.names() if not ATTACKS.info(name).get("mixed_only", False)]


def attack_description(name: str) -> str:
    return ATTACKS.info(name).get("description", name)


def check_attack_requirements(names: Iterable[str]) -> None:
    """Raise MissingDependencyError, before any work, when an attack's optional package does not import."""
    for name in names:
        package = ATTACKS.info(name).get("requires")
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise MissingDependencyError(
                f"attack {name!r} needs the package {package!r} (pip install {package}): {err}"
            ) from None


def _known_options() -> set[str]:
    return {opt for name in ATTACKS.names() for opt in ATTACKS.info(name).get("options", ())}


def make_attack(name: str, model: nn.Module, eps: float, norm: str = "linf", seed: int = 0, batch_size: int = 250,
                **options: Any) -> Attack:
    """The attack called ``name`` (see :func:`list_attacks`) against ``model``.

    ``options`` may hold the options of any registered attack (e.g. ``pgd_steps``, ``apgd_steps``,
    ``n_target_classes``, ``adaptive_weight``); each attack takes the ones it declares.
    """
    factory = ATTACKS.get(name)
    info = ATTACKS.info(name)
    check_attack_args(eps, norm)
    if info.get("mixed_only", False) and not is_mixed_model(model):
        raise ConfigError(
            f"attack {name!r} needs a mixed classifier (a model with mix(x, detach_alpha) exposing alpha(x)); "
            f"{type(model).__name__} is not one. Use {', '.join(list_attacks(model))}."
        )
    unknown = sorted(set(options) - _known_options())
    if unknown:
        raise ConfigError(f"unknown attack option(s) {unknown}; known: {', '.join(sorted(_known_options()))}")
    check_attack_requirements([name])
    own = {key: value for key, value in options.items() if key in info.get("options", ())}
    return factory(model, eps, norm, seed, batch_size, **own)


class _NameView(Sequence):
    """The registered names, read afresh on every use (so later registrations show up)."""

    def __getitem__(self, i):
        return tuple(ATTACKS.names())[i]

    def __len__(self) -> int:
        return len(ATTACKS)

    def __contains__(self, name: object) -> bool:
        return name in ATTACKS

    def __iter__(self):
        return iter(ATTACKS.names())

    def __repr__(self) -> str:
        return repr(tuple(self))


class _DescriptionView(Mapping):
    """name -> description of every registered attack, read afresh on every use."""

    def __getitem__(self, name: str) -> str:
        if name not in ATTACKS:
            raise KeyError(name)
        return attack_description(name)

    def __len__(self) -> int:
        return len(ATTACKS)

    def __iter__(self):
        return iter(ATTACKS.names())

    def __repr__(self) -> str:
        return repr(dict(self))


# Live views for code written against the former fixed tables.
ATTACK_NAMES: Sequence[str] = _NameView()
ATTACK_DESCRIPTIONS: Mapping[str, str] = _DescriptionView()
