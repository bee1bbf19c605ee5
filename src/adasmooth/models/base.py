"""Models: the MODELS registry, ``create_model``, and the base class of models with named stages.

Every model takes inputs in [0, 1] and normalises them itself (``Normalize``), so attacks and
noise always live in pixel space. Every model lists its stages in ``stage_names``; each name is
an attribute holding an ``nn.Module`` whose output can be tapped with a forward hook.

Adding an architecture: one file with a ``StagedModel`` subclass decorated with
``@register_model("name")``, and one import line in ``models/__init__.py``. A family of sizes can
register a name pattern instead (see ``wideresnet.py``: ``wrn-<depth>-<width>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.registry import Registry

__all__ = [
    "Normalize",
    "ModelSpec",
    "MODELS",
    "StagedModel",
    "register_model",
    "create_model",
    "list_models",
    "default_taps",
    "count_classes",
]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with buffers, so it follows the model's device and dtype."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise InputError(f"expected {self.mean.shape[1]} input channels, got {x.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: what a checkpoint sidecar stores.

    ``input_shape`` (C, H, W) and ``dataset`` are None when the model was built without them; a
    model whose spec knows its input shape refuses inputs of another shape.
    """

    name: str
    num_classes: int
    in_channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, int, int] | None = None
    dataset: str | None = None


MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, pattern: str | None = None, shown_as: str | None = None, **info: Any):
    """Decorator: register a model class (or factory) taking ``num_classes``, ``in_channels`` and kwargs.

    With ``pattern`` (a regular expression with named integer groups), names that match it also
    build this model, the groups becoming keyword arguments: ``wrn-(?P<depth>\\d+)-(?P<widen_factor>\\d+)``
    makes ``wrn-34-10`` a WideResNet of depth 34 and width 10. ``shown_as`` is how
    :func:`list_models` shows the pattern.
    """
    if pattern is not None:
        info = {**info, "pattern": re.compile(pattern), "shown_as": shown_as or pattern}
    return MODELS.register(name, **info)


def list_models() -> list[str]:
    patterns = [MODELS.info(n)["shown_as"] for n in MODELS.names() if "pattern" in MODELS.info(n)]
    return sorted(MODELS.names()) + patterns


def _resolve(name: str) -> tuple[Callable[..., nn.Module], dict[str, int]]:
    """The factory for ``name`` and the keyword arguments its name pattern encodes."""
    if name in MODELS:
        return MODELS.get(name), {}
    for registered in MODELS.names():
        pattern = MODELS.info(registered).get("pattern")
        match = pattern.fullmatch(name) if pattern is not None else None
        if match:
            return MODELS.get(registered), {k: int(v) for k, v in match.groupdict().items()}
    raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}")


def _expand_channels(values: Sequence[float] | None, in_channels: int, default: float) -> list[float]:
    if values is None:
        return [default] * in_channels
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * in_channels
    if len(values) != in_channels:
        raise ConfigError(f"normalisation has {len(values)} values for {in_channels} channels")
    return values


def _check_input_shape(input_shape: Sequence[int] | None, in_channels: int) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if shape[0] != in_channels:
        raise ConfigError(f"input_shape {shape} has {shape[0]} channels but in_channels is {in_channels}")
    return shape  # type: ignore[return-value]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    dataset: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model. ``wrn-D-W`` (e.g. ``wrn-34-10``, ``wrn-70-16``) builds a WideResNet.

    ``input_shape`` (C, H, W), when given, is recorded in ``model.spec`` and enforced on every
    input; ``dataset`` is only recorded.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    shape = _check_input_shape(input_shape, in_channels)
    mean_l = _expand_channels(mean, in_channels, 0.0)
    std_l = _expand_channels(std, in_channels, 1.0)
    factory, from_name = _resolve(name)
    kwargs = {**from_name, **kwargs}
    model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.normalize = Normalize(mean_l, std_l)
    model.spec = ModelSpec(name, num_classes, in_channels, mean_l, std_l, dict(kwargs), shape, dataset)
    return model


class StagedModel(nn.Module):
    """Base: ``forward`` = check the input shape, normalise, then run ``stage_names`` in order.

    Architectures that keep a foreign state-dict layout (the RobustBench ones) override ``forward``
    and list dotted module paths (``layer.0``) in ``stage_names``: there the names only say where
    the mixing network may tap.
    """

    stage_names: tuple[str, ...] = ()
    spec: ModelSpec | None = None  # set by create_model

    def __init__(self):
        super().__init__()
        self.normalize: nn.Module = nn.Identity()

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked against the recorded input shape, then normalised: what the first stage sees."""
        if x.dim() != 4:
            raise InputError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        expected = self.spec.input_shape if self.spec is not None else None
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise InputError(f"{self.spec.name} expects inputs of shape (C, H, W) = {tuple(expected)}, "
                             f"got {tuple(x.shape[1:])}")
        return self.normalize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalized(x)
        for name in self.stage_names:
            out = getattr(self, name)(out)
        return out


def default_taps(model: nn.Module) -> tuple[str, str]:
    """The two stages the mixing network taps by default: the first two after the stem."""
    names = getattr(model, "stage_names", None)
    if not names or len(names) < 3:
        raise ConfigError("model has no stage_names; give the tap names explicitly")
    return names[1], names[2]


def count_classes(model: nn.Module) -> int | None:
    spec = getattr(model, "spec", None)
    return spec.num_classes if spec is not None else None
