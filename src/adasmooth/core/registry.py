"""One small registry type for everything users extend: models, data sets, attacks, mixing rules,
training methods.

    ATTACKS = Registry("attack")

    @ATTACKS.register("pgd", description="PGD-20")
    def build_pgd(model, ...): ...

    ATTACKS.get("pgd")          # the factory; an unknown name lists the known ones

Adding an entry is one decorated definition in one file; the package's ``__init__`` imports the
file so that the registration runs.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` with free-form ``info``."""

        def wrap(obj: T) -> T:
            self.add(name, obj, **info)
            return obj

        return wrap

    def add(self, name: str, obj: T, **info: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = obj
        self._info[name] = dict(info)

    def remove(self, name: str) -> None:
        """Take an entry out again (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)
        self._info.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def info(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._info[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
