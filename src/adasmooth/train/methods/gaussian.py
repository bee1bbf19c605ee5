"""Gaussian data augmentation (Cohen et al. 2019), the base of randomized smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TRAINING_METHODS


@TRAINING_METHODS.register("gaussian", description="cross-entropy on x + N(0, sigma^2) (Cohen et al.)",
                           smoothing=True)
def gaussian_loss(model, batch, cfg, ctx):
    """Cross-entropy on x + N(0, sigma^2), noise in [0, 1] pixel space (models normalise inside)."""
    x, y, _ = batch
    return F.cross_entropy(model(x + cfg.sigma * torch.randn_like(x)), y)
