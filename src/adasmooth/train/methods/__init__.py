"""Base-model training methods, one module each; importing this package registers them all.

Adding a method: a new module here with a function ``(model, batch, cfg, ctx) -> loss`` decorated
``@TRAINING_METHODS.register("name", description=...)``, and its import line below.
"""

from .base import TRAINING_METHODS, LossFn, TrainContext, attack_step_size, craft_adversarial
from . import standard, pgd, trades, gaussian, catrs  # noqa: F401,E401  (each registers itself)
from .catrs import CatrsOptions

__all__ = ["TRAINING_METHODS", "LossFn", "TrainContext", "attack_step_size", "craft_adversarial", "CatrsOptions"]
