"""Saved fixed mixtures (``kind: fixed-mixture``): base models by relative path, so a moved folder still loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adasmooth.core.errors import CheckpointError, ConfigError
from adasmooth.mixing import MixedClassifier
from adasmooth.mixing.export import load_mixture
from adasmooth.mixing.fixed import load_fixed_mixture, save_fixed_mixture
from adasmooth.mixing.rules import trust_weighted_rule
from adasmooth.models import create_model
from adasmooth.models.checkpoint import save_checkpoint


def _saved(root):
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=8, hidden=32, input_shape=(1, 8, 8)).eval()
    h = create_model("small-cnn", 10, in_channels=1, width=8, hidden=32, input_shape=(1, 8, 8)).eval()
    save_checkpoint(g, root / "models" / "g")
    save_checkpoint(h, root / "models" / "h")
    model = MixedClassifier(g, h, 0.35, std_scale=1.5, rob_scale=0.5, rule="logit").eval()
    model.std_checkpoint, model.rob_checkpoint = str(root / "models" / "g"), str(root / "models" / "h")
    save_fixed_mixture(model, root / "mixtures" / "fixed", {"note": "moved"})
    return model


def test_moved_folder_still_loads_a_fixed_mixture(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    model = _saved(a)
    info = json.loads((a / "mixtures" / "fixed.json").read_text())
    assert info["kind"] == "fixed-mixture"
    assert (info["std_checkpoint"], info["rob_checkpoint"]) == ("../models/g", "../models/h")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    shutil.move(str(a), str(b))
    for loaded, info in (load_fixed_mixture(b / "mixtures" / "fixed"), load_mixture(b / "mixtures" / "fixed.json")):
        assert isinstance(loaded, MixedClassifier) and not loaded.training
        assert (loaded.alpha, loaded.rule, loaded.std_scale, loaded.rob_scale) == (pytest.approx(0.35), "logit", 1.5, 0.5)
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
        assert info["note"] == "moved" and loaded.std_checkpoint == str((b / "models" / "g").resolve())
    # saved again from elsewhere, the records are relative to the new place
    save_fixed_mixture(loaded, b / "deeper" / "again" / "fixed2")
    again = json.loads((b / "deeper" / "again" / "fixed2.json").read_text())
    assert again["rob_checkpoint"] == "../../models/h"


def test_fixed_mixture_errors_name_the_file(tmp_path):
    model = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="nothere.json not found"):
        load_fixed_mixture(tmp_path / "nothere")
    with pytest.raises(CheckpointError, match="is not a fixed mixture"):
        load_fixed_mixture(tmp_path / "models" / "g")
    (tmp_path / "models" / "g.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"std base model checkpoint .*g\.safetensors"):
        load_fixed_mixture(tmp_path / "mixtures" / "fixed")
    custom = MixedClassifier(model.std_model, model.rob_model, 0.5, rule=trust_weighted_rule("one", "probability"))
    custom.std_checkpoint = custom.rob_checkpoint = "x"
    with pytest.raises(ConfigError, match="registered or nonlinear rule"):
        save_fixed_mixture(custom, tmp_path / "custom")
    with pytest.raises(ConfigError, match="checkpoint paths"):
        save_fixed_mixture(MixedClassifier(model.std_model, model.rob_model, 0.5), tmp_path / "nobases")
