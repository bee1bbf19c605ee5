"""Checkpoints: safetensors + JSON sidecar round trips, atomic writes, foreign .pt files without pickled code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from adasmooth.models.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_foreign_state_dict,
    read_sidecar,
    save_checkpoint,
)
from adasmooth.models.base import create_model

META = {
    "dataset": "cifar10",
    "training": {"method": "trades", "config": {"eps": 0.031, "trades_beta": 6.0, "epochs": 3}},
    "metrics": {"clean_acc": 81.25, "pgd20_acc": 50.5},
    "sigma": 0.25,
}


def _model_with_state(name="resnet18", **kwargs):
    torch.manual_seed(0)
    model = create_model(name, 7, 3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], **kwargs)
    # Non-default batch-norm statistics: eval outputs depend on buffers as well as parameters.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_round_trip_outputs_and_sidecar(tmp_path):
    model = _model_with_state(width=4)
    weights = save_checkpoint(model, tmp_path / "runs" / "rob", META)
    assert weights == tmp_path / "runs" / "rob.safetensors"
    assert weights.is_file() and (tmp_path / "runs" / "rob.json").is_file()
    loaded, info = load_checkpoint(tmp_path / "runs" / "rob", torch.device("cpu"))
    assert not loaded.training
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info["architecture"] == "resnet18" and info["num_classes"] == 7 and info["in_channels"] == 3
    assert info["normalization"] == {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    assert info["model_kwargs"] == {"width": 4}
    assert info["dataset"] == "cifar10" and info["sigma"] == 0.25
    assert info["training"]["method"] == "trades" and info["training"]["config"]["trades_beta"] == 6.0
    assert info["metrics"] == {"clean_acc": 81.25, "pgd20_acc": 50.5}
    assert torch.__version__.startswith(info["provenance"]["versions"]["torch"])
    # The sidecar is plain JSON, readable without torch.
    assert json.loads((tmp_path / "runs" / "rob.json").read_text())["num_classes"] == 7
    assert read_sidecar(tmp_path / "runs" / "rob.safetensors") == info
    assert loaded.spec == model.spec


def test_wideresnet_kwargs_survive_round_trip(tmp_path):
    model = _model_with_state("wrn-10-2", dropout=0.1)
    save_checkpoint(model, tmp_path / "wrn.safetensors")
    loaded, info = load_checkpoint(tmp_path / "wrn.json")
    assert info["architecture"] == "wrn-10-2"
    assert len(loaded.block1) == 1 and loaded.block1[0].conv1.out_channels == 32
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_atomic_write_leaves_no_temporary_files_and_overwrites(tmp_path):
    first = _model_with_state("small-cnn", width=4, hidden=8)
    save_checkpoint(first, tmp_path / "m", {"metrics": {"clean_acc": 1.0}})
    second = create_model("small-cnn", 7, 3, width=4, hidden=8)
    save_checkpoint(second, tmp_path / "m", {"metrics": {"clean_acc": 2.0}})
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]
    loaded, info = load_checkpoint(tmp_path / "m")
    assert info["metrics"]["clean_acc"] == 2.0
    assert torch.equal(loaded.head[1].weight, second.head[1].weight)


def test_checkpoint_paths():
    for p in ("a/b", "a/b.safetensors", "a/b.json"):
        w, s = checkpoint_paths(p)
        assert (str(w), str(s)) == ("a/b.safetensors", "a/b.json")
    w, _ = checkpoint_paths("runs/model.v2")  # a dot in the name is not an extension
    assert str(w) == "runs/model.v2.safetensors"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="spec"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="x.safetensors"):
        load_checkpoint(tmp_path / "x")
    save_checkpoint(create_model("mlp", 3, 1, input_size=4, hidden=4), tmp_path / "y")
    (tmp_path / "y.json").unlink()
    with pytest.raises(FileNotFoundError, match="y.json"):
        load_checkpoint(tmp_path / "y")


# ------------------------------------------------------------------ foreign .pt files


def test_foreign_state_dict_prefixes_and_wrappers(tmp_path):
    model = _model_with_state("small-cnn", width=4, hidden=8)
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 99}, tmp_path / "dp.pt")
    torch.save({f"model.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pth")
    torch.save({"model": dict(state)}, tmp_path / "container.pt")
    for name in ("dp.pt", "wrapped.pth", "container.pt"):
        loaded_state = load_foreign_state_dict(tmp_path / name)
        assert set(loaded_state) == set(state)
        fresh = create_model("small-cnn", 7, 3, width=4, hidden=8)
        fresh.load_state_dict(loaded_state, strict=True)
        x = torch.rand(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), model(x))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = create_model("mlp", 3, 1, input_size=4, hidden=4).state_dict()
    torch.save({"state_dict": state, "extra": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_foreign_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_foreign_file_without_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_foreign_state_dict(tmp_path / "list.pt")
