"""One contract per registry: every registered entry, built-in or added later, goes through the same
checks. A new entry is tested by registering it; no test lists the entries by hand.

(The attack registry's contract is ``test_attack_registry.test_every_registered_attack_builds_and_runs``.)
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from adasmooth.cli import build_parser
from adasmooth.core.errors import DataError
from adasmooth.data import DATASETS, dataset_info, describe_files, load_dataset
from adasmooth.cli.options import flag_name
from adasmooth.mixing import MIXING_RULES, MixedClassifier, build_rule, rule_params_class
from adasmooth.train.config import TrainConfig
from adasmooth.train.engine import TrainContext
from adasmooth.train.methods import TRAINING_METHODS
from adasmooth.train.methods.base import options_field


def _help_of(command: str) -> str:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return " ".join(sub.choices[command].format_help().split())


# ------------------------------------------------------------------ training methods


class _NoNorm(nn.Module):
    """Per-example forward (no batch norm), so a loss may not depend on how a batch is split."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(10, 10 + n)


def _method_config(name: str) -> TrainConfig:
    cfg = TrainConfig(method=name, attack_steps=2, eps=0.1, progress=False)
    block = options_field(name)
    if hasattr(cfg, block) and hasattr(getattr(cfg, block), "steps"):
        getattr(cfg, block).steps = 1  # a short inner search is enough for the contract
    return cfg


@pytest.mark.parametrize("name", TRAINING_METHODS.names())
def test_every_training_method_meets_the_contract(name):
    info = TRAINING_METHODS.info(name)
    assert info.get("description"), f"{name}: register a description (the --help list shows it)"
    assert name in _help_of("train-base")
    options = info.get("options")
    if options is not None:  # its own options: a block of TrainConfig, every field with help and a default
        assert dataclasses.is_dataclass(options)
        block = getattr(TrainConfig(), options_field(name))
        assert isinstance(block, options)
        for f in dataclasses.fields(options):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert f"--{options_field(name)}-" in _help_of("train-base")
    cfg = _method_config(name)
    cfg.validate()
    fn, model, (x, y, idx) = TRAINING_METHODS.get(name), _NoNorm(), _batch()

    def loss_of(rows):
        ctx = TrainContext(epoch=1, num_epochs=2, generator=torch.Generator().manual_seed(3), seed=7)
        return fn(model, (x[rows], y[rows], idx[rows]), cfg, ctx)

    everything = slice(None)
    loss = loss_of(everything)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    model.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss_of(everything).item() == loss.item(), f"{name}: the same batch and seed give another loss"
    if info.get("distributed", True):
        # under torchrun each process takes part of a batch: the parts' losses, weighted by their
        # sizes, must be the whole batch's (randomness drawn per example, not per batch)
        halves = (loss_of(slice(0, 2)) * 2 + loss_of(slice(2, None)) * 4) / 6
        assert halves.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), name


# ------------------------------------------------------------------ mixing rules


@pytest.mark.parametrize("name", MIXING_RULES.names())
def test_every_mixing_rule_meets_the_contract(name, bases):
    g, h = bases
    assert MIXING_RULES.info(name).get("label"), f"{name}: register a label (plots and tables show it)"
    assert name in _help_of("evaluate") and name in _help_of("sweep")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = MixedClassifier(g, h, 0.6, rule=name)
    out = model(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    # each input's output depends on that input alone (results never depend on batching)
    assert torch.allclose(model(x[:2]), out[:2], atol=1e-5) and torch.allclose(model(x[3:]), out[3:], atol=1e-5)
    # alpha = 0 is g's decision, alpha = 1 is h's
    assert torch.equal(MixedClassifier(g, h, 0.0, rule=name)(x).argmax(1), g(x).argmax(1))
    assert torch.equal(MixedClassifier(g, h, 1.0, rule=name)(x).argmax(1), h(x).argmax(1))
    params = rule_params_class(name)
    if params is not None:  # declared parameters: options of every command that builds a mixture
        for f in dataclasses.fields(params):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
            for command in ("evaluate", "sweep"):
                assert flag_name(f.name, name.replace("_", "-") + "-") in _help_of(command), (name, f.name, command)
        # the defaults the declaration shows are the registered rule's
        assert torch.allclose(MixedClassifier(g, h, 0.6, rule=build_rule(name, params()))(x), out)


# ------------------------------------------------------------------ data sets


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_data_set_meets_the_contract(name):
    info = dataset_info(name)
    assert name in _help_of("train-base") and name in _help_of("evaluate")
    classes, shape = info["num_classes"], info["input_shape"]
    if info.get("image_files"):  # read from image files: the files set the shape (and maybe the classes)
        assert shape is None and (classes is None or classes >= 2)
        channels = 3
    else:
        assert classes >= 2 and len(shape) == 3 and min(shape) >= 1
        channels = shape[0]
    assert len(info["mean"]) == len(info["std"]) == channels
    assert all(0 <= m <= 1 for m in info["mean"]) and all(0 < s <= 1 for s in info["std"])
    assert info.get("augment", "none") in ("none", "crop", "crop-flip", "resized-crop-flip")



@pytest.mark.parametrize("name", DATASETS.names())
def test_every_data_set_declares_the_files_its_loader_reads(name, tmp_path):
    info = dataset_info(name)
    files = info["files"]
    assert files or info.get("files_where"), f"{name}: declare its files, or where its data come from"
    # the --data-dir help is made from the declaration (wrapping may break lines anywhere, so compare
    # without whitespace)
    for command in ("train-base", "evaluate"):
        assert "".join(describe_files(name).split()) in "".join(_help_of(command).split()), (name, command)
    for split in ("train", "test"):
        if not files:  # reads no files: an empty folder is enough
            assert len(load_dataset(name, split, tmp_path)) > 0
            continue
        assert files[split] and all(isinstance(f, str) and f for f in files[split])
        with pytest.raises(DataError) as err:  # the loader looks for what the declaration says
            load_dataset(name, split, tmp_path)
        message = str(err.value)
        assert any(f in message for f in files[split]), (name, split, message)
        assert str(tmp_path) in message and len(message.splitlines()) == 1
