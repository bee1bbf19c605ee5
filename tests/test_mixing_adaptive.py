"""The adaptive mixed classifier leaves the caller's base models alone, and its checkpoint survives
a moved results folder and names the file it cannot use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adasmooth.core.errors import CheckpointError
from adasmooth.mixing.adaptive import (
    build_adaptive_classifier,
    frozen,
    load_adaptive_classifier,
    save_adaptive_classifier,
)
from adasmooth.models.base import create_model
from adasmooth.models.checkpoint import save_checkpoint


def _bases(seed=0):
    torch.manual_seed(seed)
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8)
    h = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8)
    return g, h


def _flags(*models):
    return [(m.training, [p.requires_grad for p in m.parameters()], [s.training for s in m.modules()])
            for m in models]


def _build(g, h):
    torch.manual_seed(1)
    return build_adaptive_classifier(g, h, (1, 8, 8), widths=(8, 8, 8), blocks=(1, 1, 1))


def test_caller_base_models_keep_their_flags_and_weights():
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8)
    h = create_model("resnet18", 10, in_channels=1, width=4)  # batch norm: statistics that could move
    g.train()  # the caller's choice: both in training mode, one of h's parameters frozen
    h.train()
    next(h.parameters()).requires_grad_(False)
    before = _flags(g, h)
    weights = {k: v.clone() for k, v in list(g.state_dict().items()) + [("h." + k, v) for k, v in h.state_dict().items()]}

    torch.manual_seed(1)
    model = build_adaptive_classifier(g, h, (1, 16, 16), widths=(8, 8, 8), blocks=(1, 1, 1))
    assert _flags(g, h) == before  # construction
    x = torch.rand(8, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert _flags(g, h) == before  # forward, eval()
    model.train()
    assert _flags(g, h) == before  # train()

    opt = torch.optim.SGD(model.mixing_net.parameters(), lr=0.1)
    for _ in range(3):
        out = model.mix(x)
        loss = out.logits.logsumexp(1).mean() + out.alpha_logit.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _flags(g, h) == before  # training the mixing network
    for m in (g, h):
        assert all(p.grad is None for p in m.parameters())
    after = {k: v for k, v in list(g.state_dict().items()) + [("h." + k, v) for k, v in h.state_dict().items()]}
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # weights and BN statistics bit-identical
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mixing_net.parameters())
    # the bases ran in eval mode throughout: the same input gives the same g and h logits as before
    model.eval()
    with torch.no_grad():
        g_out, h_out, _, _ = model.base_outputs(x)
        g.eval()
        h.eval()
        assert torch.equal(g_out, g(x)) and torch.equal(h_out, h(x))
    assert not torch.equal(model(x), ref)  # the mixing network did train


def test_frozen_restores_flags_after_an_error():
    g, _ = _bases()
    g.train()
    before = _flags(g)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(g):
            assert not g.training and not any(p.requires_grad for p in g.parameters())
            raise RuntimeError("boom")
    assert _flags(g) == before


def _saved_mixture(root):
    g, h = _bases()
    save_checkpoint(g, root / "models" / "g")
    save_checkpoint(h, root / "models" / "h")
    model = _build(g, h).eval()
    model.std_checkpoint, model.rob_checkpoint = str(root / "models" / "g"), str(root / "models" / "h")
    save_adaptive_classifier(model, root / "mixnets" / "mix", {"note": "moved"})
    return model


def test_moved_results_folder_still_loads(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    model = _saved_mixture(a)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    info = json.loads((a / "mixnets" / "mix.json").read_text())
    assert info["std_checkpoint"] == "../models/g" and info["rob_checkpoint"] == "../models/h"
    assert sorted(p.name for p in (a / "mixnets").iterdir()) == ["mix.json", "mix.safetensors"]  # no temp files

    shutil.move(str(a), str(b))
    loaded, info = load_adaptive_classifier(b / "mixnets" / "mix")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert info["note"] == "moved"
    # the returned paths are usable from here, and saving elsewhere records them relative to there
    assert info["std_checkpoint"] == str((b / "models" / "g").resolve()) == loaded.std_checkpoint
    save_adaptive_classifier(loaded, b / "calibrated" / "deeper" / "mix2", {"note": "again"})
    again = json.loads((b / "calibrated" / "deeper" / "mix2.json").read_text())
    assert again["rob_checkpoint"] == "../../models/h"
    with torch.no_grad():
        assert torch.equal(load_adaptive_classifier(b / "calibrated" / "deeper" / "mix2")[0](x), ref)


def test_older_absolute_base_paths_still_load(tmp_path):
    _saved_mixture(tmp_path)
    sidecar = tmp_path / "mixnets" / "mix.json"
    info = json.loads(sidecar.read_text())
    info["std_checkpoint"] = str((tmp_path / "models" / "g").resolve())
    info["rob_checkpoint"] = str((tmp_path / "models" / "h").resolve())
    sidecar.write_text(json.dumps(info))
    loaded, info = load_adaptive_classifier(tmp_path / "mixnets" / "mix")
    assert loaded.rob_checkpoint == str((tmp_path / "models" / "h").resolve())


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load_adaptive_classifier(tmp_path / "missing")
    _saved_mixture(tmp_path)
    # a base-model checkpoint is not a mixture
    with pytest.raises(CheckpointError, match=r"g\.json is not an adaptive mixed classifier"):
        load_adaptive_classifier(tmp_path / "models" / "g")
    (tmp_path / "models" / "h.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rob base model checkpoint .*h\.safetensors"):
        load_adaptive_classifier(tmp_path / "mixnets" / "mix")
    sidecar = tmp_path / "mixnets" / "mix.json"
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="mix.json is not valid JSON"):
        load_adaptive_classifier(tmp_path / "mixnets" / "mix")
