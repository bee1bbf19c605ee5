"""Standard training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch.nn.functional as F

from .base import TRAINING_METHODS


@TRAINING_METHODS.register("standard", description="cross-entropy on clean inputs")
def standard_loss(model, batch, cfg, ctx):
    x, y, _ = batch
    return F.cross_entropy(model(x), y)
