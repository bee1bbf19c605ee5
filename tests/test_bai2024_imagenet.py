"""The ImageNet MixedNUTS (RobustBench ``imagenet/Linf/Bai2024MixedNUTS``: ConvNeXt V2-L + Liu2023's Swin-L)
against RobustBench's own ``comp_model.get_nonlin_mixed_classifier("imagenet")`` and ``convnext_v2.py``,
loaded by path. timm is the real library where it and torchvision import, else ``robustbench_peer``'s
stand-in (then h is a stand-in network on both sides and the check covers ConvNeXt V2, the files, the
normalisation and the map). The ConvNeXt V2 is reduced (1-1-2-1 blocks of 8-16-24-32 channels) unless
its full-size layout is what is checked.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from adasmooth.core.errors import CheckpointError
from adasmooth.mixing.bai2024 import BAI2024_ENTRIES, bai2024_files
from adasmooth.mixing.export import load_mixture
from adasmooth.models import create_model

from robustbench_peer import (forget_peer_modules, randomize_normalisation, real_libraries, stand_in_packages,
                              stand_in_timm, stand_in_torchvision)

_SPEC = importlib.util.find_spec("robustbench")
pytestmark = pytest.mark.skipif(_SPEC is None, reason="robustbench==1.1.1 not installed (pip install --no-deps)")
SPEC = "robustbench:imagenet/Linf/Bai2024MixedNUTS"
SMALL = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32]}


@pytest.fixture
def comp(monkeypatch):
    root = Path(_SPEC.submodule_search_locations[0])
    before = stand_in_packages(monkeypatch, root)
    if real_libraries():
        monkeypatch.setitem(sys.modules, "timm", importlib.import_module("timm"))
    else:
        timm = stand_in_timm()
        layers = types.ModuleType("timm.models.layers")
        layers.trunc_normal_, layers.DropPath = nn.init.trunc_normal_, None  # DropPath only for drop_path > 0
        timm.models.layers = layers
        tv = stand_in_torchvision()
        for module in (timm, timm.models, layers, tv, tv.models, tv.ops, tv.ops.misc):
            monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)  # the peer narrates every setting
    module = importlib.import_module("robustbench.model_zoo.architectures.comp_model")
    yield module
    forget_peer_modules(before)


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):  # GRN starts at zero, which would hide it
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    randomize_normalisation(model, gen)


def _save_peer(comp, model_dir: Path, monkeypatch):
    v2 = comp.convnext_v2
    monkeypatch.setattr(v2, "convnextv2_large", lambda **kw: v2.ConvNeXtV2(**SMALL, **kw))
    peer = comp.get_nonlin_mixed_classifier("imagenet")
    gen = torch.Generator().manual_seed(4)
    _randomize(peer.std_model, gen)
    _randomize(peer.rob_model, gen)
    files = bai2024_files("Bai2024MixedNUTS", "imagenet", model_dir)
    files[0].parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in peer.std_model.state_dict().items()}}, files[0])
    # RobustBench's Swin-L file: the network's own keys (its loader adds the wrapper's "model.")
    torch.save({k[len("model."):]: v for k, v in peer.rob_model.state_dict().items() if k.startswith("model.")},
               files[1])
    return peer.eval()


def test_convnext_v2_large_has_robustbench_layout_at_full_size(comp):
    theirs = comp.convnext_v2.convnextv2_large(num_classes=1000)  # its stochastic-depth rates need real tensors
    with torch.device("meta"):
        ours = create_model("convnext-v2", 1000, size="large")
    layout = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
    assert layout == {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k not in ("mean", "std")}


def test_imagenet_mixednuts_matches_robustbench(comp, tmp_path, monkeypatch):
    ref = _save_peer(comp, tmp_path, monkeypatch)
    ours, info = load_mixture(SPEC, model_dir=tmp_path)
    assert info["input_shape"] == [3, 224, 224] and info["threat"]["eps"] == pytest.approx(4 / 255)
    assert info["rule"] == "nonlinear" and ours.alpha == pytest.approx(BAI2024_ENTRIES[("imagenet", "Bai2024MixedNUTS")].alpha)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        g_ref, g_ours = ref.std_model(x), ours.std_model(x)
        h_ref, h_ours = ref.rob_model(x), ours.rob_model(x)
        expected, got = ref(x), ours(x)
    scale = max(1.0, g_ref.abs().max().item())
    assert (g_ours - g_ref).abs().max().item() <= 1e-5 * scale
    assert (h_ours - h_ref).abs().max().item() <= 1e-5 * max(1.0, h_ref.abs().max().item())
    assert got.shape == (3, 1000) and torch.isfinite(got).all()
    assert (got - expected).abs().max().item() < 1e-4


def test_a_swapped_file_is_a_one_line_error(comp, tmp_path, monkeypatch):
    _save_peer(comp, tmp_path, monkeypatch)
    files = bai2024_files("Bai2024MixedNUTS", "imagenet", tmp_path)
    files[0].write_bytes(files[1].read_bytes())  # h's file where g's belongs
    with pytest.raises(CheckpointError) as err:
        load_mixture(SPEC, model_dir=tmp_path)
    assert "\n" not in str(err.value) and "Bai2024MixedNUTS.pt_m0.pt" in str(err.value)
