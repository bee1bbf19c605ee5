"""Fixtures shared by the test suite: the offline data sets and a small standard model trained once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adasmooth.data.base import DATASET_STATS, load_dataset
from adasmooth.models.base import create_model


def pytest_configure(config):
    # The tests use tiny models: intra-op threads only add overhead, and on a shared 2-core machine
    # oversubscribed threads made single small forward passes hundreds of times slower.
    torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    """Where the real MNIST / Fashion-MNIST files are: $ADASMOOTH_DATA, else <repo>/../shared/data."""
    candidates = []
    if os.environ.get("ADASMOOTH_DATA"):
        candidates.append(Path(os.environ["ADASMOOTH_DATA"]))
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for folder in candidates:
        if (folder / "mnist").is_dir() or (folder / "fashion-mnist").is_dir():
            return folder
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("real MNIST/Fashion-MNIST files not found: set $ADASMOOTH_DATA or put them in ../shared/data")
    return folder


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")


def train_small_cnn(data, epochs: int = 8, seed: int = 0, width: int = 16) -> torch.nn.Module:
    """A plain (non-robust) small CNN on digits: Adam, full passes, a few seconds on one core."""
    torch.manual_seed(seed)
    mean, std = DATASET_STATS["digits"]
    model = create_model("small-cnn", data.num_classes, in_channels=1, mean=mean, std=std, width=width, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def std_digits_model(digits_train):
    """Trained once per session; tests must not modify it (PGD leaves parameters untouched)."""
    return train_small_cnn(digits_train, seed=0)


@pytest.fixture(scope="session")
def robust_model():
    """A PGD-trained digits CNN, trained once per session; attack tests must not modify it."""
    from digits_models import train_digits_model

    return train_digits_model(adversarial=True)


@pytest.fixture(scope="session")
def test_data():
    data = load_dataset("digits", "test")
    return data.x, data.y


@pytest.fixture(scope="module")
def bases():
    """Two tiny untrained small CNNs (g, h) on 1x8x8 inputs, in eval mode, for mixing-rule checks."""
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    h = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    return g, h
