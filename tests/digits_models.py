"""Small digits models shared by the attack tests (a plain module, not a test file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adasmooth.attacks import PGD
from adasmooth.data.base import DATASET_STATS, load_dataset
from adasmooth.models.base import create_model

EPS = 0.1


def train_digits_model(adversarial: bool, epochs: int = 8, seed: int = 0, eps: float = EPS) -> nn.Module:
    """A small CNN on the 8x8 digits; PGD-5 adversarial training when ``adversarial``.

    Trained on one thread: multi-threaded reductions would make the weights, and so the exact
    robust counts, vary from run to run.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(adversarial, epochs, seed, eps)
    finally:
        torch.set_num_threads(threads)


def _train(adversarial: bool, epochs: int, seed: int, eps: float) -> nn.Module:
    torch.manual_seed(seed)
    data = load_dataset("digits", "train")
    mean, std = DATASET_STATS["digits"]
    model = create_model("small-cnn", 10, in_channels=1, mean=mean, std=std, width=8, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), 64):
            idx = perm[i : i + 64]
            x, y = data.x[idx], data.y[idx]
            if adversarial:
                model.eval()
                x = PGD(model, eps, steps=5, seed=epoch * 10_000 + i)(x, y)
                model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def robust_count(model, x_adv, y) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


def train_noisy_mlp(sigma: float, seed: int, steps: int = 150) -> nn.Module:
    """A small MLP on the 8x8 digits trained on Gaussian-noised inputs (sigma 0: clean), for smoothing."""
    torch.manual_seed(seed)
    data = load_dataset("digits", "train")
    mean, std = DATASET_STATS["digits"]
    model = create_model("mlp", 10, in_channels=1, mean=list(mean), std=list(std), input_size=8, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        idx = torch.randint(0, len(data), (128,))
        x = data.x[idx]
        loss = F.cross_entropy(model(x + sigma * torch.randn_like(x)), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_smoothing_checkpoints(root) -> dict[str, str]:
    """Checkpoints under ``root`` for certify: ``g`` (clean) and ``h25``, ``h50`` (sidecars record sigma)."""
    from adasmooth.models.checkpoint import save_checkpoint

    paths: dict[str, str] = {}
    for name, sigma in (("g", 0.0), ("h25", 0.25), ("h50", 0.5)):
        meta = {"dataset": "digits", **({"sigma": sigma} if sigma > 0 else {})}
        save_checkpoint(train_noisy_mlp(sigma, seed=len(paths)), root / name, meta)
        paths[name] = str(root / name)
    return paths
