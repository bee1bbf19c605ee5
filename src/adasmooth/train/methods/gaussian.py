"""Gaussian data augmentation (Cohen et al. 2019), the base of randomized smoothing."""

from __future__ import annotations

import torch.nn.functional as F

from ...attacks.base import draw
from .base import TRAINING_METHODS


@TRAINING_METHODS.register("gaussian", description="cross-entropy on x + N(0, sigma^2) (Cohen et al.)",
                           smoothing=True)
def gaussian_loss(model, batch, cfg, ctx):
    """Cross-entropy on x + N(0, sigma^2), noise in [0, 1] pixel space (models normalise inside), each
    example's noise drawn from its own generator (``ctx.generators``)."""
    x, y, idx = batch
    noise = draw("normal", tuple(x.shape), ctx.generators(idx, x.device, "noise"), x)
    return F.cross_entropy(model(x + cfg.sigma * noise), y)
