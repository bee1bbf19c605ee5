"""Shared pieces of every attack: the :class:`Attack` interface and its :class:`AttackResult`,
threat-model geometry, argument checks, seeded generators."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..core.errors import InputError
from ..core.runtime import example_generator
from .losses import margin_from_logits

Norm = Literal["linf", "l2"]
NORMS = ("linf", "l2")

__all__ = [
    "Attack",
    "AttackResult",
    "is_mixed_model",
    "Norm",
    "NORMS",
    "per_sample",
    "project",
    "random_init",
    "normalized_step",
    "check_attack_args",
    "check_batch",
    "make_generator",
    "tensor_like",
]


@dataclass
class AttackResult:
    """What one attack did to a batch, judged by one forward pass of the model at the final points.

    - ``x_adv``: (N, ...) the points the attack returns, in [0, 1] and inside the eps-ball.
    - ``predicted``: (N,) long, the model's class at ``x_adv``.
    - ``fooled``: (N,) bool, ``predicted != y``.
    - ``margin``: (N,) float, the CW margin ``max_{j != y} z_j - z_y`` of the logits at ``x_adv``;
      > 0 iff misclassified (up to ties).
    - ``broken_by``: per input, the component that broke it (ensembles: a component's name, or
      "clean" for an input misclassified before any attack; AutoAttack: ``autoattack-<version>``);
      None where nothing broke it or the attack has no components.
    - ``flags``: reliability warnings, e.g. AutoAttack's check that Square did not find much more
      than the gradient attacks (a sign of gradient masking).
    """

    x_adv: torch.Tensor
    predicted: torch.Tensor
    fooled: torch.Tensor
    margin: torch.Tensor
    broken_by: list[str | None]
    flags: list[str] = field(default_factory=list)

    @classmethod
    def from_logits(cls, x_adv: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                    broken_by: list[str | None] | None = None, flags: list[str] | None = None) -> "AttackResult":
        y = y.to(logits.device)
        predicted = logits.argmax(1)
        return cls(
            x_adv=x_adv,
            predicted=predicted,
            fooled=predicted != y,
            margin=margin_from_logits(logits, y),
            broken_by=list(broken_by) if broken_by is not None else [None] * x_adv.shape[0],
            flags=list(flags or []),
        )


class Attack:
    """The interface of every attack: ``attack(x, y) -> x_adv`` and ``attack.run(x, y) -> AttackResult``.

    An attack holds the ``model`` whose outcome is judged, the radius ``eps`` (a float or an (N,)
    tensor), the ``norm`` of the threat model and a ``seed`` (None: torch's global generator).
    ``ids`` (optional, (N,) integers: each input's index in its data set) seed each input's random
    draws from (seed, index) alone, so its outcome does not depend on the batch it came in, on how a
    run was sharded over processes, or on where it was resumed; without ``ids`` the draws come from one
    generator per call.
    Subclasses implement ``__call__``; the default ``run`` calls it and evaluates the model once on
    the result. Attacks made of parts override ``run`` to fill ``AttackResult.broken_by`` and list
    the parts' names in ``components`` (empty for a single attack), and attacks with reliability
    checks fill ``AttackResult.flags``.
    """

    components: tuple[str, ...] = ()
    # Whether __call__ takes ``ids`` (per-input seeding); an attack written without it still works,
    # its draws then depend on the batch.
    seeds_per_example: bool = False

    def __init__(self, model: nn.Module, eps: float | torch.Tensor, norm: Norm = "linf", seed: int | None = None):
        check_attack_args(eps, norm)
        self.model = model
        self.eps = eps
        self.norm = norm
        self.seed = seed

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(x, y, ids=None) -> x_adv")

    def run(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> AttackResult:
        return self.judge(self.craft(x, y, ids), y)

    def craft(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``self(x, y, ids)``, or ``self(x, y)`` for an attack that does not seed per example."""
        return self(x, y, ids) if ids is not None and self.seeds_per_example else self(x, y)

    def judge(self, x_adv: torch.Tensor, y: torch.Tensor, broken_by: list[str | None] | None = None,
              flags: list[str] | None = None) -> AttackResult:
        """The :class:`AttackResult` of ``x_adv`` from one forward pass of ``self.model``."""
        with torch.no_grad():
            logits = self.model(x_adv)
        return AttackResult.from_logits(x_adv, logits, y, broken_by, flags)


def is_mixed_model(model) -> bool:
    """Whether ``model`` follows the mixed-model protocol (``mix(x, detach_alpha)`` -> MixOutput)."""
    return callable(getattr(model, "mix", None))


def per_sample(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (N,) value as an (N, 1, ..., 1) tensor on x's device and dtype."""
    t = torch.as_tensor(value, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise InputError(f"per-sample value must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.dim() - 1)))


def tensor_like(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a number or tensor) as a tensor on ``like``'s device and dtype. A number is filled
    on the device: ``torch.as_tensor`` would copy it from the host, a synchronisation on a GPU."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.full((), value, device=like.device, dtype=like.dtype)


def project(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Project a perturbation onto the eps-ball (eps shaped (N, 1, ..., 1))."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    norms = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    factor = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
    return delta * factor


class ExampleGenerators:
    """One random generator per input, seeded from (seed, the input's index in its data set): what an
    input draws never depends on the other inputs of its batch."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    @classmethod
    def seeded(cls, seed: int, ids: torch.Tensor, device: torch.device) -> "ExampleGenerators":
        return cls([example_generator(seed, int(i), device) for i in torch.as_tensor(ids).tolist()])

    def rows(self, index: torch.Tensor) -> "ExampleGenerators":
        """The generators of the rows ``index`` (a subset of the batch, e.g. the inputs not yet broken)."""
        return ExampleGenerators([self.generators[i] for i in index.tolist()])


Generator = torch.Generator | ExampleGenerators | None


def draw(kind: Literal["uniform", "normal"], shape: tuple[int, ...], generator: Generator, like: torch.Tensor):
    """``torch.rand`` / ``torch.randn`` of ``shape`` on ``like``'s device and dtype; with
    :class:`ExampleGenerators`, row i comes from generator i."""
    fn = torch.rand if kind == "uniform" else torch.randn
    if isinstance(generator, ExampleGenerators):
        if len(generator.generators) != shape[0]:
            raise InputError(f"{len(generator.generators)} example ids for a batch of {shape[0]}")
        return torch.stack([fn(shape[1:], generator=g, device=like.device, dtype=like.dtype)
                            for g in generator.generators]) if shape[0] else fn(shape, device=like.device,
                                                                                  dtype=like.dtype)
    return fn(shape, generator=generator, device=like.device, dtype=like.dtype)


def random_init(x: torch.Tensor, eps: torch.Tensor, norm: Norm, generator: Generator) -> torch.Tensor:
    """A uniformly random start inside the ball, clipped so x + delta stays in [0, 1]."""
    if norm == "linf":
        u = draw("uniform", tuple(x.shape), generator, x)
        delta = (2 * u - 1) * eps
    else:
        d = draw("normal", tuple(x.shape), generator, x)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        n = x[0].numel()
        r = draw("uniform", (x.shape[0], 1), generator, x).view(-1) ** (1.0 / n)
        delta = d * r.view(-1, *([1] * (x.dim() - 1))) * eps
    return (x + delta).clamp(0, 1) - x


def normalized_step(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit size in the threat model's norm."""
    if norm == "linf":
        return grad.sign()
    g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return grad / g_norm


def check_attack_args(eps, norm: str, steps: int | None = None) -> None:
    """Radius and norm of a threat model; runs once per attack object, never inside its iterations."""
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; use one of {NORMS}")
    e = torch.as_tensor(eps, dtype=torch.float64)
    if not torch.isfinite(e).all() or (e < 0).any():
        raise InputError(f"eps must be a finite number >= 0, got {eps}")
    # inputs live in [0, 1]: an l_inf radius above 1 covers the whole input space
    if norm == "linf" and (e > 1).any():
        raise InputError(f"an l_inf eps is in [0, 1] pixel units, got {eps}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """A batch of inputs (N, ...) in [0, 1] with one integer label >= 0 each.

    The value checks synchronise with the device once: call this at an attack's entry, never inside
    its iterations. (Labels beyond the class count are caught by ``check_logits(logits, y)``.)
    """
    if x.dim() < 2:
        raise InputError(f"expected a batch of inputs, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"inputs must be floating point in [0, 1], got dtype {x.dtype}")
    if y.shape != (x.shape[0],):
        raise InputError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"labels must be integers, got dtype {y.dtype}")
    if x.numel():
        if not torch.isfinite(x).all():
            raise InputError("inputs contain NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise InputError(f"inputs must lie in [0, 1] (normalisation belongs inside the model), got values "
                             f"in [{low:.4g}, {high:.4g}]")
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"labels must be >= 0, got {int(y.min())}")


def make_generator(seed: int | None, device: torch.device, ids: torch.Tensor | None = None) -> Generator:
    """None (torch's global generator) without a seed; per-input generators with ``ids``; else one."""
    if seed is None:
        return None
    if ids is not None:
        return ExampleGenerators.seeded(seed, ids, device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
