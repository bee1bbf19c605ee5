"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising that KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...attacks.base import draw, per_sample, project
from ...core.distributed import unwrap
from .base import TRAINING_METHODS, craft_adversarial


@TRAINING_METHODS.register("trades", description="CE + trades_beta * KL to the clean prediction (Zhang et al.)")
def trades_loss(model, batch, cfg, ctx):
    x, y, idx = batch
    net = unwrap(model)  # the clean prediction is a fixed target: no gradient sync across processes
    with torch.no_grad():
        was_training = net.training
        net.eval()
        p_clean = F.softmax(net(x), 1)
        net.train(was_training)

    def kl_to_clean(m, x_adv, _y):
        return F.kl_div(F.log_softmax(m(x_adv), 1), p_clean, reduction="none").sum(1)

    # TRADES starts from a small Gaussian perturbation rather than a uniform one.
    x0 = (x + 0.001 * draw("normal", tuple(x.shape), ctx.generators(idx, x.device, "start"), x)).clamp(0, 1)
    x_adv = craft_adversarial(model, x0, y, cfg, loss=kl_to_clean, random_start=False)
    # PGD kept x' within eps of the noisy start x0; the threat model is the ball around x.
    x_adv = (x + project(x_adv - x, per_sample(cfg.eps, x), cfg.norm)).clamp(0, 1)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + cfg.trades_beta * robust
