"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising that KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...attacks.base import per_sample, project
from .base import TRAINING_METHODS, craft_adversarial


@TRAINING_METHODS.register("trades", description="CE + trades_beta * KL to the clean prediction (Zhang et al.)")
def trades_loss(model, batch, cfg, ctx):
    x, y, _ = batch
    with torch.no_grad():
        was_training = model.training
        model.eval()
        p_clean = F.softmax(model(x), 1)
        model.train(was_training)

    def kl_to_clean(m, x_adv, _y):
        return F.kl_div(F.log_softmax(m(x_adv), 1), p_clean, reduction="none").sum(1)

    # TRADES starts from a small Gaussian perturbation rather than a uniform one.
    x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    x_adv = craft_adversarial(model, x0, y, cfg, loss=kl_to_clean, random_start=False)
    # PGD kept x' within eps of the noisy start x0; the threat model is the ball around x.
    x_adv = (x + project(x_adv - x, per_sample(cfg.eps, x), cfg.norm)).clamp(0, 1)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + cfg.trades_beta * robust
