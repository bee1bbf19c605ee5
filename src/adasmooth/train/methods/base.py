"""What a base-model training method is, and the registry that names them.

A method is a function ``(model, batch, cfg, ctx) -> scalar loss`` registered with

    @TRAINING_METHODS.register("name", description="...")
    def my_loss(model, batch, cfg, ctx): ...

``batch = (x, y, idx)``: inputs, labels and their indices in the training set (for methods that
cache per-example targets, and to seed each example's random draws: ``ctx.generators(idx, device,
"noise")`` gives one generator per example from (seed, epoch, purpose, index), so a batch split over
torchrun processes draws what one process would). ``cfg`` is the run's ``TrainConfig``; ``ctx`` the
engine's :class:`~adasmooth.train.engine.TrainContext`. With ``cfg`` bound, a method is a step
function of :func:`adasmooth.train.engine.run_training`.

Registration info a method may give:

- ``options=SomeOptions``: a dataclass of the method's own options. ``TrainConfig`` gets a block of
  them named after the method (``cat-rs`` -> ``catrs``; the CLI shows ``--catrs-m`` ...; YAML
  ``catrs: {m: 4}``), and only the block of the method in use enters a run's resume fingerprint.
- ``check=fn``: ``fn(cfg)`` raises a ConfigError when the config cannot run the method (called
  before training starts).
- ``smoothing=True``: the model is a base of randomized smoothing (its sigma is recorded).
- ``distributed=False``: the method cannot run on a share of the batch under torchrun.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from ...attacks import PGD
from ...core.distributed import unwrap
from ...core.registry import Registry
from ..engine import TrainContext

__all__ = ["TrainContext", "LossFn", "TRAINING_METHODS", "attack_step_size", "craft_adversarial",
           "options_field", "method_options"]


LossFn = Callable[[nn.Module, tuple, Any, TrainContext], torch.Tensor]  # (model, batch, TrainConfig, ctx)
TRAINING_METHODS: Registry[LossFn] = Registry("training method")


def options_field(method: str) -> str:
    """The config field of a method's own options: its name without non-alphanumerics (``cat-rs`` -> ``catrs``)."""
    return re.sub(r"[^0-9a-zA-Z]", "", method).lower()


def method_options() -> dict[str, tuple[str, type]]:
    """``{config field: (method, options dataclass)}`` of the registered methods that declare options."""
    return {options_field(name): (name, TRAINING_METHODS.info(name)["options"])
            for name in TRAINING_METHODS if TRAINING_METHODS.info(name).get("options") is not None}


def attack_step_size(cfg) -> float:
    """The training attack's step: ``attack_step_size`` if given, else 2.5 * eps / steps."""
    return cfg.attack_step_size if cfg.attack_step_size is not None else 2.5 * cfg.eps / cfg.attack_steps


def craft_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, loss="ce", *,
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
