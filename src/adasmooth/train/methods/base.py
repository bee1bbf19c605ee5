"""What a base-model training method is, and the registry that names them.

A method is a function ``(model, batch, cfg, ctx) -> scalar loss`` registered with

    @TRAINING_METHODS.register("name", description="...")
    def my_loss(model, batch, cfg, ctx): ...

``batch = (x, y, idx)``: inputs, labels and their indices in the training set (for methods that
cache per-example targets, and to seed each example's random draws: ``ctx.generators(idx, device,
"noise")`` gives one generator per example from (seed, epoch, purpose, index), so a batch split over
torchrun processes draws what one process would). ``cfg`` is the run's ``TrainConfig``; ``ctx`` a :class:`TrainContext`.
A method may also register ``check=fn``: ``fn(cfg)`` raises a ConfigError when the config cannot
run it (the loop calls it before training starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import zlib

import torch
from torch import nn

from ...attacks import PGD
from ...attacks.base import ExampleGenerators
from ...core.distributed import unwrap
from ...core.registry import Registry
from ...data.augment import derived_seed

if TYPE_CHECKING:  # the config type is only named in signatures; importing it here would be a cycle
    from ..loop import TrainConfig

__all__ = ["TrainContext", "LossFn", "TRAINING_METHODS", "attack_step_size", "craft_adversarial"]


@dataclass
class TrainContext:
    """Per-run state a training method may use (e.g. cached targets); methods keep their own in ``extras``."""

    epoch: int = 0
    num_epochs: int = 1
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def stream_seed(self, purpose: str) -> int:
        """A seed for one kind of draw (``purpose``: "noise", "pgd", ...) in this epoch."""
        return derived_seed(self.seed ^ zlib.crc32(purpose.encode()), self.epoch)

    def generators(self, idx: torch.Tensor, device: torch.device | str, purpose: str) -> ExampleGenerators:
        """One generator per example of the batch, seeded from (seed, epoch, purpose, example index)."""
        return ExampleGenerators.seeded(self.stream_seed(purpose), idx, torch.device(device))


LossFn = Callable[[nn.Module, tuple, "TrainConfig", TrainContext], torch.Tensor]
TRAINING_METHODS: Registry[LossFn] = Registry("training method")


def attack_step_size(cfg: "TrainConfig") -> float:
    """The training attack's step: ``attack_step_size`` if given, else 2.5 * eps / steps."""
    return cfg.attack_step_size if cfg.attack_step_size is not None else 2.5 * cfg.eps / cfg.attack_steps


def craft_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: "TrainConfig", loss="ce", *,
                      ctx: TrainContext | None = None, idx: torch.Tensor | None = None,
                      **pgd_options) -> torch.Tensor:
    """PGD inputs against ``model`` in eval mode (batch-norm statistics stay untouched); mode restored.

    With ``ctx`` and ``idx`` each example's random start comes from (seed, epoch, index). A
    DistributedDataParallel wrapper is bypassed: the attack's gradients are its own, not the training's.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    seeded = ctx is not None and idx is not None
    try:
        attack = PGD(model, cfg.eps, cfg.norm, cfg.attack_steps, attack_step_size(cfg), loss=loss,
                     seed=ctx.stream_seed("pgd") if seeded else None, **pgd_options)
        return attack(x, y, idx) if seeded else attack(x, y)
    finally:
        model.train(was_training)
