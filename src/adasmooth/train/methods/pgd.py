"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD inputs of radius ``eps``."""

from __future__ import annotations

import torch.nn.functional as F

from .base import TRAINING_METHODS, craft_adversarial


@TRAINING_METHODS.register("pgd", description="cross-entropy on PGD-attacked inputs (Madry et al.)")
def pgd_loss(model, batch, cfg, ctx):
    x, y, idx = batch
    return F.cross_entropy(model(craft_adversarial(model, x, y, cfg, ctx=ctx, idx=idx)), y)
