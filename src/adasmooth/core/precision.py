"""Numeric precision, memory layout, compilation and batch sizing of a run: the GPU fast paths.

- :data:`PRECISIONS`: ``fp32`` (true fp32: TF32 off on CUDA), ``tf32`` (fp32 storage, TF32 matmuls
  and convolutions on CUDA), ``bf16`` and ``fp16`` (autocast).
- :func:`numerics`: a context that sets the TF32 switches a precision implies and restores them.
- :func:`with_precision`: a model that runs its forward (and ``mix``) under autocast and returns
  fp32 outputs, so attack losses, margins and projections stay in fp32. With ``fp16`` it scales
  the gradient flowing into the half-precision region by a constant (:data:`FP16_GRAD_SCALE`) and
  unscales it at the input, so small input gradients do not underflow; a constant scale needs no
  overflow check and hence no host-device synchronisation. fp32 and tf32 without channels-last
  return the model itself (nothing changes in fp32).
- :func:`compile_model`: ``torch.compile`` with a clear fallback to eager where compilation fails.
- :func:`find_batch_size`: the largest batch a job fits in device memory, found once.

Whether an attack broke an input is decided by an fp32 forward pass elsewhere
(``evaluate.robustness``); nothing here judges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from .config import option
from .errors import ConfigError

_log = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "Precision",
    "FP16_GRAD_SCALE",
    "check_precision",
    "autocast_dtype",
    "numerics",
    "autocast",
    "precision_option",
    "channels_last_option",
    "compile_option",
    "auto_batch_size",
    "PrecisionModel",
    "PrecisionMixedModel",
    "with_precision",
    "to_channels_last",
    "compile_model",
    "grad_scaler",
    "find_batch_size",
    "largest_fitting",
    "parse_batch_size",
    "prepare_model",
]

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# A power of two (exact to apply and undo). Attack losses are sums of per-example losses whose
# gradient w.r.t. the logits is at most ~1 per entry, so 2**12 keeps fp16 gradients far above the
# subnormal range while leaving a factor of 16 below fp16's maximum of 65504.
FP16_GRAD_SCALE = 2.0**12


def precision_option() -> Any:
    return option("fp32", help="numeric precision: fp32, tf32 (CUDA TF32 matmuls), bf16 or fp16 (autocast)")


def channels_last_option() -> Any:
    return option(False, help="channels-last memory layout (faster convolutions on tensor-core GPUs)")


def compile_option() -> Any:
    return option(False, help="torch.compile the models (falls back to eager, with a message, where it fails)")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32 and tf32, which keep fp32 storage)."""
    return _AUTOCAST.get(check_precision(precision))


@contextlib.contextmanager
def numerics(precision: str) -> Iterator[None]:
    """Set CUDA's TF32 switches as ``precision`` implies (off for fp32, on for tf32; bf16 and fp16
    leave them) and restore them on exit. On the CPU these switches change nothing."""
    check_precision(precision)
    if precision not in ("fp32", "tf32"):
        yield
        return
    allow = precision == "tf32"
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def autocast(precision: str, device_type: str) -> Iterator[None]:
    """Run the enclosed code at ``precision``: :func:`numerics` for fp32/tf32, torch's autocast for
    bf16/fp16 (where training and attacks keep fp32 weights and take fp32 gradients)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        with numerics(precision):
            yield
    else:
        with torch.autocast(device_type, dtype=dtype):
            yield


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` and zeroes non-finite entries
    (an fp16 overflow then costs one step's direction for that entry instead of NaN everywhere)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.scale
        return torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad)), None


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGrad.apply(x, scale)


class PrecisionModel(nn.Module):
    """``model`` run under ``precision`` (autocast for bf16/fp16, TF32 switches for fp32/tf32),
    optionally on channels-last inputs; outputs are fp32. Other attributes read through to ``model``."""

    def __init__(self, model: nn.Module, precision: str = "bf16", channels_last: bool = False):
        super().__init__()
        self.model = model
        self.precision = check_precision(precision)
        self.channels_last = bool(channels_last)
        self.grad_scale = FP16_GRAD_SCALE if precision == "fp16" else 1.0

    def _context(self, x: torch.Tensor):
        return autocast(self.precision, x.device.type)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        x = _scale_grad(x, 1.0 / self.grad_scale)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _leave(self, out: torch.Tensor) -> torch.Tensor:
        return _scale_grad(out.float(), self.grad_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._context(x):
            out = self.model(self._enter(x))
        return self._leave(out)

    def rewrap(self, model: nn.Module) -> nn.Module:
        """``model`` under this wrapper's settings."""
        return with_precision(model, self.precision, self.channels_last)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        inner = super().__getattr__("model")
        value = getattr(inner, name)
        # a mixture's base models (transfer attacks craft on them) run at the same precision
        if name in ("std_model", "rob_model") and isinstance(value, nn.Module):
            return self.rewrap(value)
        return value

    def extra_repr(self) -> str:
        return f"precision={self.precision}, channels_last={self.channels_last}"


class PrecisionMixedModel(PrecisionModel):
    """:class:`PrecisionModel` of a mixed model: ``mix`` too runs under autocast, with fp32 outputs."""

    def mix(self, x: torch.Tensor, detach_alpha: bool = False):
        with self._context(x):
            out = self.model.mix(self._enter(x), detach_alpha=detach_alpha)
        changes = {f.name: self._leave(getattr(out, f.name)) for f in dataclasses.fields(out)
                   if isinstance(getattr(out, f.name), torch.Tensor) and getattr(out, f.name).is_floating_point()}
        return dataclasses.replace(out, **changes)


def with_precision(model: nn.Module, precision: str = "fp32", channels_last: bool = False) -> nn.Module:
    """``model`` itself for fp32/tf32 without channels-last (callers set :func:`numerics` around the
    run), else a :class:`PrecisionModel` (:class:`PrecisionMixedModel` for models with ``mix``)."""
    check_precision(precision)
    if precision in ("fp32", "tf32") and not channels_last:
        return model
    if isinstance(model, PrecisionModel):
        model = model.model
    cls = PrecisionMixedModel if callable(getattr(model, "mix", None)) else PrecisionModel
    return cls(model, precision, channels_last)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model``'s 4-d parameters and buffers to channels-last, in place (faster convolutions
    on tensor-core GPUs); returns it."""
    return model.to(memory_format=torch.channels_last)


class _Compiled(nn.Module):
    """A ``torch.compile``d forward that falls back to eager, once and with a message, where it fails."""

    def __init__(self, model: nn.Module, **compile_kwargs):
        super().__init__()
        self.model = model
        self._compiled = torch.compile(model, **compile_kwargs)
        self.failed: str | None = None

    def forward(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure must fall back, not end the run
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                _log.warning("torch.compile failed (%s); running %s uncompiled", self.failed, type(self.model).__name__)
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``model`` with a compiled forward; a compilation error prints one line and runs eagerly.

    Mixed models keep their ``mix``: their base models are compiled instead (a shallow copy of the
    mixture holds the compiled bases; the caller's mixture is not changed).
    """
    import copy

    if callable(getattr(model, "mix", None)):
        if isinstance(model, PrecisionModel):
            return model.rewrap(compile_model(model.model, **compile_kwargs))
        bases = [n for n in ("std_model", "rob_model") if isinstance(getattr(model, n, None), nn.Module)]
        if not bases:
            _log.warning("--compile: %s has no base models to compile; running it uncompiled", type(model).__name__)
            return model
        mixed = copy.copy(model)
        mixed._modules = dict(model._modules)  # copy.copy shares the module dict: keep the caller's intact
        for name in bases:
            setattr(mixed, name, _Compiled(getattr(model, name), **compile_kwargs))
        return mixed
    return _Compiled(model, **compile_kwargs)


def prepare_model(model: nn.Module, precision: str = "fp32", channels_last: bool = False,
                  compile: bool = False) -> nn.Module:
    """The model a run attacks or certifies: channels-last weights (in place), compiled, then under
    ``precision`` (see :func:`with_precision`).

    Compiling freezes the parameters (``requires_grad=False``, in place): a compiled graph decides
    once which gradients it computes, and attacks and certification never need the weights'.
    """
    if channels_last:
        to_channels_last(model)
    if compile:
        model.requires_grad_(False)
        model = compile_model(model)
    return with_precision(model, precision, channels_last)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler for training: enabled only for fp16 (bf16 has fp32's exponent range)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=check_precision(precision) == "fp16")


def parse_batch_size(value: int | str, name: str = "batch_size") -> int | str:
    """A positive integer or ``"auto"`` (a digit string from the command line becomes an int)."""
    if isinstance(value, str):
        if value == "auto":
            return value
        if value.strip().isdigit():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return value


def find_batch_size(probe: Callable[[int], Any], device: torch.device | str, *, start: int = 64,
                    limit: int = 65536, cpu_default: int = 256, headroom: float = 0.8) -> int:
    """The largest power-of-two batch in [1, ``limit``] that ``probe(batch)`` runs without running out
    of device memory, times ``headroom`` (room for the job's own state). On a CPU there is no device
    memory to fill: ``cpu_default``.

    ``probe`` should do the job's heaviest step once (an attack: forward and input gradient; certify:
    a forward pass under inference mode).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_default

    def attempt(size: int) -> None:
        try:
            probe(size)
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.empty_cache()

    return largest_fitting(attempt, start, limit, headroom)


def largest_fitting(attempt: Callable[[int], Any], start: int, limit: int, headroom: float = 0.8) -> int:
    """Double from ``start`` while ``attempt(size)`` runs without ``torch.OutOfMemoryError`` (from
    1 when ``start`` already fails), up to ``limit``; the largest size that ran, times ``headroom``."""
    fits, size = 0, max(1, min(start, limit))
    while size <= limit:
        try:
            attempt(size)
        except torch.OutOfMemoryError:
            break
        fits, size = size, size * 2
    if fits == 0:
        if size == 1:
            raise ConfigError("not even a batch of 1 fits in device memory")
        return largest_fitting(attempt, 1, size // 2, headroom)
    return max(1, int(fits * headroom))


def auto_batch_size(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str, *,
                    gradients: bool, precision: str = "fp32", cpu_default: int = 256) -> int:
    """:func:`find_batch_size` for a model on inputs of ``input_shape``: with ``gradients`` one
    forward pass and input gradient (an attack step), else one forward pass under inference mode
    (certification). ``model`` should be the form the job runs (see :func:`prepare_model`)."""
    device = torch.device(device)

    def probe(size: int) -> None:
        x = torch.rand(size, *input_shape, device=device)
        with numerics(precision):
            if gradients:
                x.requires_grad_(True)
                torch.autograd.grad(model(x).float().sum(), x)
            else:
                with torch.inference_mode():
                    model(x)

    return find_batch_size(probe, device, cpu_default=cpu_default)
