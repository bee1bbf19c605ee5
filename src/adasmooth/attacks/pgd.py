"""Projected gradient descent (Madry et al. 2018) for l_inf and l_2 threat models."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import InputError
from .base import (
    Attack,
    Norm,
    check_attack_args,
    check_batch,
    make_generator,
    normalized_step,
    per_sample,
    project,
    random_init,
)
from .losses import AttackLoss, check_logits, get_loss
from .registry import ATTACKS

__all__ = ["PGD", "PGD_STEPS"]

PGD_STEPS = 20  # the steps of every named PGD attack unless the ``pgd_steps`` option says otherwise


class PGD(Attack):
    """``PGD(model, eps, ...)(x, y) -> x_adv`` with x, x_adv in [0, 1].

    - ``eps`` is a float or a (N,) tensor (one radius per sample); ``step_size`` defaults to
      2.5 * eps / steps and scales with a per-sample eps.
    - ``loss`` is ``"ce"``, ``"margin"``, ``"dlr"`` or any callable (model, x, y) -> (N,) to maximise.
    - Across restarts, an example that misclassifies is kept; otherwise the one with the highest loss.
    - The model's parameters get no gradients and its train/eval mode is left as it was: put the
      model in eval mode first if it has batch-norm or dropout.
    - Transfer attacks are explicit: craft with ``PGD(source_model, ...)``, evaluate on another model.
    - ``momentum`` (a float or (N,) tensor in [0, 1)): steps follow v = momentum * v + grad / mean|grad|
      (MI-FGSM); 0 is plain PGD.
    """

    seeds_per_example = True

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor,
        norm: Norm = "linf",
        steps: int = 20,
        step_size: float | torch.Tensor | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str | AttackLoss = "ce",
        seed: int | None = None,
        momentum: float | torch.Tensor = 0.0,
    ):
        check_attack_args(eps, norm, steps)
        mu = torch.as_tensor(momentum)
        if torch.isnan(mu).any() or (mu < 0).any() or (mu >= 1).any():
            raise InputError(f"momentum must lie in [0, 1), got {momentum}")
        if restarts < 1:
            raise InputError(f"restarts must be >= 1, got {restarts}")
        super().__init__(model, eps, norm, seed)
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start
        self.restarts = restarts
        self.loss = get_loss(loss)
        self.momentum = momentum

    def _one_run(self, x, y, eps, step, generator):
        if self.random_start:
            delta = random_init(x, eps, self.norm, generator)
        else:
            delta = torch.zeros_like(x)
        mu = per_sample(self.momentum, x)
        velocity = torch.zeros_like(x)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = self.loss(self.model, x + delta, y)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                # the gradient scaled to unit mean magnitude, so that past steps weigh alike
                scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view_as(mu)
                velocity = mu * velocity + grad / scale
                delta = delta + step * normalized_step(velocity, self.norm)
                delta = project(delta, eps, self.norm)
                delta = (x + delta).clamp(0, 1) - x
        x_adv = (x + delta).detach()
        if self.restarts == 1:  # nothing to compare against: skip the two extra forward passes
            return x_adv, None, None
        with torch.no_grad():
            final_loss = self.loss(self.model, x_adv, y)
            fooled = self.model(x_adv).argmax(1) != y
        return x_adv, final_loss, fooled

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        check_batch(x, y)
        x = x.detach()
        eps = per_sample(self.eps, x)
        step_size = self.step_size if self.step_size is not None else 2.5 * torch.as_tensor(self.eps) / self.steps
        step = per_sample(step_size, x)
        generator = make_generator(self.seed, x.device, ids)
        with torch.no_grad():
            check_logits(self.model(x[:1]), y)
        best, best_loss, best_fooled = None, None, None
        for _ in range(self.restarts):
            x_adv, loss, fooled = self._one_run(x, y, eps, step, generator)
            if best is None:
                best, best_loss, best_fooled = x_adv, loss, fooled
                continue
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_loss = torch.where(better, loss, best_loss)
            best_fooled = best_fooled | fooled
        return best


@ATTACKS.register("pgd", description="PGD-20, random start, end-to-end gradient", options=("pgd_steps",))
def build_pgd(model, eps, norm, seed, batch_size, pgd_steps: int = PGD_STEPS) -> PGD:
    return PGD(model, eps, norm, steps=pgd_steps, seed=seed)
