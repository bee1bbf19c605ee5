"""Devices and seeds: the two pieces of run-time state every command sets up."""

from __future__ import annotations

import random

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["resolve_device", "seed_everything", "example_generator"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; an unknown or unavailable device is a ConfigError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch's global generators; return a fresh CPU generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def example_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one example, seeded from (seed, example index): results then do not depend on
    how inputs are batched, sharded or resumed."""
    gen = torch.Generator(device=device)
    # A fixed odd multiplier keeps (seed, index) pairs apart for any realistic seed and data-set size.
    gen.manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))
    return gen
