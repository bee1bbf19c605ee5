"""Fixed-alpha mixing of a standard classifier g and a robust classifier h (paper Section 3, App. B).

With the default rule "prob", the mixed classifier returns the logits of Eq. 3.4,

    h_alpha(x) = log((1 - alpha) * softmax(s_g * g(x)) + alpha * softmax(s_h * h(x))),

and with the other rules of :data:`~adasmooth.mixing.rules.MIXING_RULES` the ablations of
Eqs. 3.1-3.3. The formulas live in :mod:`adasmooth.mixing.rules`; this module holds the module
that carries alpha and the two base models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError, InputError
from ..core.io import provenance, write_json
from ..models.checkpoint import checkpoint_paths
from .bases import load_bases, mixture_input_shape, relative_to
from .protocol import MixedModel, MixOutput
from .rules import MIXING_RULES, MixingRule, MixInputs

__all__ = ["MixOutput", "MixedModel", "MixedClassifier", "save_fixed_mixture", "load_fixed_mixture", "FIXED_KIND"]

FIXED_KIND = "fixed-mixture"
FORMAT_VERSION = 1


def _check_alpha(value: float) -> float:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise InputError(f"a fixed mixture takes one alpha, got a tensor of shape {tuple(value.shape)}; "
                         "for a per-input alpha(x) use AdaptiveMixedClassifier (or mix_log_probs directly)")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InputError(f"alpha must lie in [0, 1], got {value}")
    return value


class MixedClassifier(nn.Module):
    """A fixed-alpha mixture of a standard model g and a robust model h, returning logits.

    ``rule`` names an entry of :data:`~adasmooth.mixing.rules.MIXING_RULES` ("prob", Eq. 3.4, is the
    paper's choice) or is a rule function itself, e.g. an unregistered combination such as
    ``trust_weighted_rule("grad_g", "probability")``. ``norm`` is the threat model whose dual norm the
    gradient-based trust weights R_i use; R_i is a constant to the attacker unless
    ``differentiate_r=True`` (second-order, slower). The base models are used as given: their mode
    and ``requires_grad`` flags are the caller's.
    """

    def __init__(
        self,
        std_model: nn.Module,
        rob_model: nn.Module,
        alpha: float,
        std_scale: float = 1.0,
        rob_scale: float = 1.0,
        std_hardmax: bool = False,
        rule: str | MixingRule = "prob",
        norm: Literal["linf", "l2"] = "linf",
        differentiate_r: bool = False,
    ):
        super().__init__()
        alpha = _check_alpha(alpha)
        if isinstance(rule, str):
            self.rule_fn = MIXING_RULES.get(rule)
            self.rule = rule
        elif callable(rule):
            self.rule_fn = rule
            self.rule = getattr(rule, "__name__", repr(rule))
        else:
            raise ConfigError(f"rule must be a mixing rule name or function, got {rule!r}")
        if std_scale <= 0 or rob_scale <= 0:
            raise InputError(f"logit scales must be positive, got {std_scale} and {rob_scale}")
        if norm not in ("linf", "l2"):
            raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}")
        n_std = getattr(getattr(std_model, "spec", None), "num_classes", None)
        n_rob = getattr(getattr(rob_model, "spec", None), "num_classes", None)
        if n_std is not None and n_rob is not None and n_std != n_rob:
            raise InputError(f"base models disagree on the class count: g has {n_std}, h has {n_rob}")
        self.std_model = std_model
        self.rob_model = rob_model
        self.register_buffer("_alpha", torch.tensor(alpha))
        self.std_scale = float(std_scale)
        self.rob_scale = float(rob_scale)
        self.std_hardmax = std_hardmax
        self.norm = norm
        self.differentiate_r = differentiate_r
        # where the base models came from and the (C, H, W) it takes, recorded by save_fixed_mixture
        self.std_checkpoint: str | None = None
        self.rob_checkpoint: str | None = None
        self.input_shape: tuple[int, ...] | None = None

    @property
    def alpha(self) -> float:
        return float(self._alpha)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha.fill_(_check_alpha(value))

    def mix(self, x: torch.Tensor, detach_alpha: bool = False) -> MixOutput:
        if x.dim() != 4:
            raise InputError(f"expected input of shape (N, C, H, W), got {tuple(x.shape)}")
        n = x.shape[0]
        alpha = self._alpha.to(x.dtype).expand(n)
        # logit is exactly -inf / +inf at alpha = 0 / 1, so no branch on alpha's value (reading it
        # would synchronise with the device on every forward pass)
        alpha_logit = torch.logit(alpha.double()).to(x.dtype)
        inputs = MixInputs(x, self.std_model, self.rob_model, self.std_scale, self.rob_scale, self.std_hardmax,
                           self.norm, self.differentiate_r)
        return MixOutput(logits=self.rule_fn(inputs, alpha), alpha=alpha, alpha_logit=alpha_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).logits

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, rule={self.rule}, std_scale={self.std_scale}, rob_scale={self.rob_scale}, "
            f"std_hardmax={self.std_hardmax}"
        )


# ---------------------------------------------------------------------------- save / load


def save_fixed_mixture(model: MixedClassifier, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path.json`` (kind ``fixed-mixture``): alpha, rule, scales and the base models' checkpoints.

    A fixed mixture has no weights of its own, so the sidecar is the whole file. The base models are
    ``metadata["std_checkpoint"]``/``["rob_checkpoint"]``, else the classifier's ``std_checkpoint`` /
    ``rob_checkpoint`` attributes, recorded relative to the sidecar's folder so that folder can move.
    A rule with parameters (the MixedNUTS map, :mod:`.nonlinear`) stores them beside its name. The
    input shape is ``metadata["input_shape"]``, else :func:`~.bases.mixture_input_shape` (None if unknown).
    """
    from .nonlinear import nonlinear_params_of

    metadata = dict(metadata or {})
    std_ckpt = metadata.pop("std_checkpoint", None) or model.std_checkpoint
    rob_ckpt = metadata.pop("rob_checkpoint", None) or model.rob_checkpoint
    input_shape = metadata.pop("input_shape", None) or mixture_input_shape(model)
    params = nonlinear_params_of(model)
    registered = model.rule in MIXING_RULES and MIXING_RULES.get(model.rule) is model.rule_fn
    if params is None and not registered:
        raise ConfigError(f"only mixtures with a registered or nonlinear rule can be saved; {model.rule!r} is "
                          f"neither (known: {', '.join(MIXING_RULES.names())})")
    if not std_ckpt or not rob_ckpt:
        raise ConfigError("a fixed mixture is saved with its base models' checkpoint paths: set std_checkpoint "
                          "and rob_checkpoint (attributes or metadata)")
    _, sidecar = checkpoint_paths(path)
    info = {
        "format_version": FORMAT_VERSION,
        "kind": FIXED_KIND,
        "alpha": model.alpha,
        "rule": model.rule,
        "nonlinear": params.as_dict() if params is not None else None,
        "std_scale": model.std_scale,
        "rob_scale": model.rob_scale,
        "std_hardmax": model.std_hardmax,
        "norm": model.norm,
        "differentiate_r": model.differentiate_r,
        "std_checkpoint": relative_to(std_ckpt, sidecar.parent),
        "rob_checkpoint": relative_to(rob_ckpt, sidecar.parent),
        "input_shape": list(input_shape) if input_shape else None,
        **metadata,
        "provenance": provenance(),
    }
    return write_json(sidecar, info)


def load_fixed_mixture(path: str | Path, std_model: nn.Module | None = None, rob_model: nn.Module | None = None,
                       device: str | torch.device = "cpu") -> tuple[MixedClassifier, dict[str, Any]]:
    """Rebuild a saved fixed mixture in eval mode; base models from the recorded paths unless given.

    Returns (classifier, sidecar), the sidecar's base-model paths made absolute (where they were found).
    """
    _, sidecar = checkpoint_paths(path)
    if not sidecar.is_file():
        raise CheckpointError(f"fixed mixture file {sidecar} not found")
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sidecar} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("kind") != FIXED_KIND:
        kind = info.get("kind") if isinstance(info, dict) else None
        raise CheckpointError(f"{sidecar} is not a fixed mixture (kind {kind!r})")
    missing = [k for k in ("alpha", "rule", "std_scale", "rob_scale") if k not in info]
    if missing:
        raise CheckpointError(f"{sidecar} lacks {missing}")
    from .nonlinear import NonlinearParams, nonlinear_rule

    models, bases = load_bases(info, sidecar, {"std": std_model, "rob": rob_model}, device)
    rule = nonlinear_rule(NonlinearParams.from_dict(info["nonlinear"])) if info.get("nonlinear") else info["rule"]
    model = MixedClassifier(models["std"].to(device), models["rob"].to(device), info["alpha"],
                            std_scale=info["std_scale"], rob_scale=info["rob_scale"],
                            std_hardmax=info.get("std_hardmax", False), rule=rule,
                            norm=info.get("norm", "linf"), differentiate_r=info.get("differentiate_r", False))
    model.std_checkpoint, model.rob_checkpoint = bases["std"], bases["rob"]
    model.input_shape = tuple(info["input_shape"]) if info.get("input_shape") else None
    info["std_checkpoint"], info["rob_checkpoint"] = bases["std"], bases["rob"]
    return model.eval(), info
