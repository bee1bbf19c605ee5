"""Fixed-alpha mixing of a standard classifier g and a robust classifier h (paper Section 3, App. B).

The mixed classifier of Eq. 3.4 returns logits

    h_alpha(x) = log((1 - alpha) * softmax(s_g * g(x)) + alpha * softmax(s_h * h(x)))

computed as a logsumexp of log-softmaxes plus log-weights, so it is exact at alpha = 0 and 1 and
never takes the log of an underflowed probability.

Every mixed model in adasmooth (this fixed-alpha one and the adaptive one of ``adasmooth.mixnet``)
follows one small protocol that attacks rely on: ``forward(x)`` returns logits, and
``mix(x, detach_alpha=False)`` returns a :class:`MixOutput` with the logits, alpha(x) and its logit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MixOutput",
    "MixedModel",
    "mix_log_probs",
    "mix_logits",
    "MixedClassifier",
    "R_OPTIONS",
    "dual_norm",
]

R_OPTIONS = ("one", "grad_g", "grad_max_g", "grad_ratio")


@dataclass
class MixOutput:
    logits: torch.Tensor  # (N, C) mixed logits
    alpha: torch.Tensor  # (N,) weight of the robust model
    alpha_logit: torch.Tensor  # (N,) logit of alpha (may be +-inf for a fixed alpha of 0 or 1)


@runtime_checkable
class MixedModel(Protocol):
    """What attacks may assume of a mixed classifier (see ``adasmooth.attacks``)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput: ...


def _log_weights(alpha: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - alpha) and log(alpha) shaped (N, 1) for broadcasting against (N, C)."""
    alpha = alpha.to(device=like.device, dtype=like.dtype)
    if alpha.dim() == 0:
        alpha = alpha.expand(like.shape[0])
    alpha = alpha.reshape(-1, 1)
    return torch.log1p(-alpha), torch.log(alpha)


def mix_log_probs(log_p_std: torch.Tensor, log_p_rob: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """log((1 - alpha) * p_std + alpha * p_rob) from log-probabilities, alpha scalar or (N,)."""
    if log_p_std.shape != log_p_rob.shape:
        raise ValueError(f"base outputs differ in shape: {tuple(log_p_std.shape)} vs {tuple(log_p_rob.shape)}")
    alpha_t = torch.as_tensor(alpha)
    if alpha_t.dim() > 1 or (alpha_t.dim() == 1 and alpha_t.shape[0] != log_p_std.shape[0]):
        raise ValueError(f"alpha must be a scalar or shape ({log_p_std.shape[0]},), got {tuple(alpha_t.shape)}")
    # Outside [0, 1] the log-weights are NaN and the output silently NaN.
    if bool(((alpha_t < 0) | (alpha_t > 1) | torch.isnan(alpha_t)).any()):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha_t.detach().flatten()[:8].tolist()}")
    log_w_std, log_w_rob = _log_weights(alpha_t, log_p_std)
    stacked = torch.stack([log_w_std + log_p_std, log_w_rob + log_p_rob], dim=0)
    return torch.logsumexp(stacked, dim=0)


def _hardmax_log_probs(logits: torch.Tensor) -> torch.Tensor:
    one_hot = F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
    return torch.log(one_hot)  # 0 for the top class, -inf elsewhere


def mix_logits(
    std_logits: torch.Tensor,
    rob_logits: torch.Tensor,
    alpha: torch.Tensor | float,
    std_scale: float = 1.0,
    rob_scale: float = 1.0,
    std_hardmax: bool = False,
) -> torch.Tensor:
    """Eq. 3.4 on base-model logits, with logit scales and an optional hardmax (one-hot) g."""
    if std_logits.dim() != 2 or rob_logits.dim() != 2:
        raise ValueError("base-model outputs must be (N, C) logits")
    if std_logits.shape[1] != rob_logits.shape[1]:
        raise ValueError(
            f"base models disagree on the class count: {std_logits.shape[1]} vs {rob_logits.shape[1]}"
        )
    log_p_std = _hardmax_log_probs(std_logits) if std_hardmax else F.log_softmax(std_scale * std_logits, dim=1)
    log_p_rob = F.log_softmax(rob_scale * rob_logits, dim=1)
    return mix_log_probs(log_p_std, log_p_rob, alpha)


def dual_norm(grad: torch.Tensor, norm: Literal["linf", "l2"]) -> torch.Tensor:
    """||grad||_* per sample: l1 for an l_inf threat model, l2 for l2."""
    flat = grad.flatten(1)
    if norm == "linf":
        return flat.abs().sum(1)
    if norm == "l2":
        return flat.norm(dim=1)
    raise ValueError(f"unknown norm {norm!r}; use 'linf' or 'l2'")


def _per_class_grad_norms(fn, x: torch.Tensor, norm: str, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, C) of ``fn`` and the dual norms of d out_i / dx, one backward pass per class."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    out = fn(x)
    norms = []
    for i in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        norms.append(dual_norm(g, norm))
    return out, torch.stack(norms, dim=1)


class MixedClassifier(nn.Module):
    """A fixed-alpha mixture of a standard model g and a robust model h, returning logits.

    ``space="probability"`` and ``r_option="one"`` is Eq. 3.4 (the default and the paper's choice).
    The ablations of Eqs. 3.1-3.3 use per-class trust weights R_i(x): the weight on h for class i is
    alpha * R_i / ((1 - alpha) + alpha * R_i), applied to logits (``space="logit"``) or to
    probabilities. R_i is a gradient norm that the attacker sees as a constant unless
    ``differentiate_r=True`` (second-order, slower).
    """

    def __init__(
        self,
        std_model: nn.Module,
        rob_model: nn.Module,
        alpha: float,
        std_scale: float = 1.0,
        rob_scale: float = 1.0,
        std_hardmax: bool = False,
        space: Literal["probability", "logit"] = "probability",
        r_option: str = "one",
        norm: Literal["linf", "l2"] = "linf",
        differentiate_r: bool = False,
    ):
        super().__init__()
        alpha = float(alpha)
        if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if space not in ("probability", "logit"):
            raise ValueError(f"space must be 'probability' or 'logit', got {space!r}")
        if r_option not in R_OPTIONS:
            raise ValueError(f"r_option must be one of {R_OPTIONS}, got {r_option!r}")
        if std_scale <= 0 or rob_scale <= 0:
            raise ValueError("logit scales must be positive")
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        n_std = getattr(getattr(std_model, "spec", None), "num_classes", None)
        n_rob = getattr(getattr(rob_model, "spec", None), "num_classes", None)
        if n_std is not None and n_rob is not None and n_std != n_rob:
            raise ValueError(f"base models disagree on the class count: g has {n_std}, h has {n_rob}")
        self.std_model = std_model
        self.rob_model = rob_model
        self.register_buffer("_alpha", torch.tensor(alpha))
        self.std_scale = float(std_scale)
        self.rob_scale = float(rob_scale)
        self.std_hardmax = std_hardmax
        self.space = space
        self.r_option = r_option
        self.norm = norm
        self.differentiate_r = differentiate_r

    @property
    def alpha(self) -> float:
        return float(self._alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1], got {value}")
        self._alpha.fill_(value)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")

    def _trust_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base logits and R_i(x), per Eq. 3.3."""
        create = self.differentiate_r and torch.is_grad_enabled()
        with torch.enable_grad():
            if self.r_option == "grad_g":
                g, r = _per_class_grad_norms(self.std_model, x, self.norm, create)
            elif self.r_option == "grad_max_g":
                x_req = x if x.requires_grad else x.detach().requires_grad_(True)
                g = self.std_model(x_req)
                (grad,) = torch.autograd.grad(g.max(1).values.sum(), x_req, retain_graph=True, create_graph=create)
                r = dual_norm(grad, self.norm).unsqueeze(1).expand_as(g)
            else:  # grad_ratio
                g, r_g = _per_class_grad_norms(self.std_model, x, self.norm, create)
                _, r_h = _per_class_grad_norms(self.rob_model, x, self.norm, create)
                r = r_g / r_h.clamp_min(1e-12)
        if not create:
            r = r.detach()
        h = self.rob_model(x)
        if not torch.is_grad_enabled():
            g = g.detach()
        return g, h, r

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput:
        self._check_input(x)
        n = x.shape[0]
        alpha = self._alpha.to(x.dtype).expand(n)
        alpha_logit = torch.logit(alpha.double()).to(x.dtype) if 0 < self.alpha < 1 else (
            torch.full((n,), math.inf if self.alpha == 1 else -math.inf, dtype=x.dtype, device=x.device)
        )
        if self.r_option == "one":
            g, h = self.std_model(x), self.rob_model(x)
            if self.space == "probability":
                logits = mix_logits(g, h, alpha, self.std_scale, self.rob_scale, self.std_hardmax)
            else:
                g_in = F.one_hot(g.argmax(1), g.shape[1]).to(g.dtype) if self.std_hardmax else self.std_scale * g
                logits = (1 - self.alpha) * g_in + self.alpha * self.rob_scale * h
        else:
            g, h, r = self._trust_weights(x)
            if g.shape[1] != h.shape[1]:
                raise ValueError(f"base models disagree on the class count: {g.shape[1]} vs {h.shape[1]}")
            a = self.alpha
            w = (a * r) / ((1 - a) + a * r).clamp_min(1e-12)  # weight on h per class, in [0, 1]
            if self.space == "logit":
                logits = (1 - w) * self.std_scale * g + w * self.rob_scale * h
            else:
                p_g = F.softmax(self.std_scale * g, 1)
                p_h = F.softmax(self.rob_scale * h, 1)
                logits = torch.log(((1 - w) * p_g + w * p_h).clamp_min(torch.finfo(p_g.dtype).tiny))
        return MixOutput(logits=logits, alpha=alpha, alpha_logit=alpha_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).logits

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, std_scale={self.std_scale}, rob_scale={self.rob_scale}, "
            f"std_hardmax={self.std_hardmax}, space={self.space}, r_option={self.r_option}"
        )
