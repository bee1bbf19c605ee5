"""Every saved mixture records its input shape, so ``export`` right after ``train-mixnet`` (or on a saved
fixed mixture) needs no --input-shape, also when the base models record none (python: specs); and a
model that torch.export cannot trace is written as TorchScript, with the reason logged and recorded."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from adasmooth.cli import main
from adasmooth.mixing import MixedClassifier
from adasmooth.mixing.export import export_mixture, load_exported
from adasmooth.mixing.fixed import load_fixed_mixture, save_fixed_mixture
from adasmooth.train.mixnet import MixnetTrainConfig, train_mixnet

FACTORIES = """
from torch import nn

def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
"""


@pytest.fixture
def python_bases(tmp_path, monkeypatch):
    """Two python: specs with weights; the models record no input shape and no data set."""
    (tmp_path / "user_nets_export.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("user_nets_export")
    specs = []
    for seed, name in ((0, "g"), (1, "h")):
        torch.manual_seed(seed)
        save_file({k: v.contiguous() for k, v in module.cnn().state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
        specs.append(f"python:user_nets_export:cnn@{tmp_path / f'{name}.safetensors'}")
    return specs


def test_export_right_after_train_mixnet_needs_no_input_shape(python_bases, tmp_path, capsys):
    std, rob = python_bases
    cfg = MixnetTrainConfig(std=std, rob=rob, dataset="digits", taps=["1", "3"], widths=[4, 4, 4], blocks=[1, 1, 1],
                            setting="A", eps=0.3, norm="linf", attack_steps=1, epochs=1, batch_size=16, n_train=32,
                            eval_examples=8, eval_pgd_steps=1, output=str(tmp_path / "mix"), progress=False,
                            device="cpu")
    train_mixnet(cfg)
    assert json.loads((tmp_path / "mix.json").read_text())["input_shape"] == [1, 8, 8]
    assert main(["export", "--mixnet", str(tmp_path / "mix"), "--output", str(tmp_path / "mix.pt2")]) == 0
    assert "input (1, 8, 8)" in capsys.readouterr().out
    module, record = load_exported(tmp_path / "mix.pt2")
    assert record["format"] == "export" and record["input_shape"] == [1, 8, 8]
    assert module(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_saved_fixed_mixtures_record_the_shape_they_are_given(python_bases, tmp_path, capsys):
    std, rob = python_bases
    from adasmooth.models import load_model

    g, _ = load_model(std)
    h, _ = load_model(rob)
    mixed = MixedClassifier(g, h, 0.4)
    mixed.std_checkpoint, mixed.rob_checkpoint = std, rob
    save_fixed_mixture(mixed, tmp_path / "fixed", {"input_shape": (1, 8, 8)})
    loaded, info = load_fixed_mixture(tmp_path / "fixed")
    assert info["input_shape"] == [1, 8, 8] and loaded.input_shape == (1, 8, 8)
    save_fixed_mixture(loaded, tmp_path / "again")  # the loaded mixture keeps it
    assert json.loads((tmp_path / "again.json").read_text())["input_shape"] == [1, 8, 8]
    assert main(["export", "--mixnet", str(tmp_path / "again.json"), "--output", str(tmp_path / "f.pt2")]) == 0
    # without a record, the command asks for the shape in one line
    mixed_bare = MixedClassifier(g, h, 0.4)
    mixed_bare.std_checkpoint, mixed_bare.rob_checkpoint = std, rob
    save_fixed_mixture(mixed_bare, tmp_path / "bare")
    capsys.readouterr()
    assert main(["export", "--mixnet", str(tmp_path / "bare.json"), "--output", str(tmp_path / "b.pt2")]) == 2
    assert "give --input-shape C H W" in capsys.readouterr().err


class ChecksItsInput(nn.Module):
    """A base model that checks its input's values in Python: torch.export cannot keep such a guard,
    tracing runs it once (and the result does not depend on it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("non-finite input")
        return self.fc(x.flatten(1))


def test_torchscript_fallback_is_logged_and_recorded(tmp_path, caplog):
    torch.manual_seed(0)
    mixed = MixedClassifier(ChecksItsInput(), ChecksItsInput(), 0.3).eval()
    with caplog.at_level(logging.WARNING, logger="adasmooth"):
        info = export_mixture(mixed, tmp_path / "m.pt2", (1, 8, 8))
    assert info["format"] == "torchscript" and "data-dependent" in info["fallback"].lower()
    assert any("writing TorchScript instead" in r.getMessage() for r in caplog.records)
    module, record = load_exported(tmp_path / "m.pt2")
    assert record["format"] == "torchscript" and record["fallback"] == info["fallback"]
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module(x), mixed(x), atol=1e-5, rtol=0)
