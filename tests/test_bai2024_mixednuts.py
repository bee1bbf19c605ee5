"""The authors' MixedNUTS model (RobustBench's Bai2024MixedNUTS) against RobustBench's own code.

The peer is RobustBench 1.1.1's ``comp_model.get_nonlin_mixed_classifier`` (with its
``optimal_spca.yaml``, ``output_maps.py``, ``mixing_net.NonLinMixedClassifier``, ``bit_rn_v2.py`` and
``dm_wide_resnet.py``), loaded by path under stand-in parent packages (its package import needs
torchvision), for both entries: CIFAR-100 (BiT-M-R152x2 + Wang2023Better's WRN-70-16) and CIFAR-10
(the same BiT + Peng2023Robust's RaWRN-70-16 from ``robustarch_wide_resnet.py``, whose torchvision
squeeze-excitation is stood in for by a transcription of torchvision's documented layer). The peer
builds the same wiring at reduced size (BiT with one unit per block and width 1, WRN-10-4, a RaWRN
with stem 16, depths 2-1-1, widths 24-32-48), with random weights saved as RobustBench's two files
and read back through ``load_mixture``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from adasmooth.core.errors import CheckpointError, ConfigError
from adasmooth.mixing.bai2024 import BAI2024_ENTRIES, bai2024_files, load_bai2024
from adasmooth.mixing.export import load_mixture, mixture_files
from adasmooth.mixing.fixed import MixedClassifier
from adasmooth.mixing.nonlinear import nonlinear_params_of

from robustbench_peer import TorchvisionSE, forget_peer_modules, randomize_normalisation, stand_in_packages

_SPEC = importlib.util.find_spec("robustbench")
needs_peer = pytest.mark.skipif(_SPEC is None, reason="robustbench==1.1.1 not installed (pip install --no-deps)")
SPEC = "robustbench:cifar100/Linf/Bai2024MixedNUTS"


@pytest.fixture
def peer(monkeypatch):
    """RobustBench's comp_model module, loaded by path, patched to build a reduced MixedNUTS model."""
    root = Path(_SPEC.submodule_search_locations[0])
    before = stand_in_packages(monkeypatch, root)
    stub = types.ModuleType("robustbench.model_zoo.architectures.convnext_v2")
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    # robustarch_wide_resnet.py imports torchvision (which does not import here) for two layers; RaWRN
    # uses only the squeeze-excitation, stood in for by torchvision's documented function
    misc = types.ModuleType("torchvision.ops.misc")
    misc.SqueezeExcitation, misc.Conv2dNormActivation = TorchvisionSE, None
    for name in ("torchvision", "torchvision.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, misc.__name__, misc)
    comp = importlib.import_module("robustbench.model_zoo.architectures.comp_model")
    ra = importlib.import_module("robustbench.model_zoo.architectures.robustarch_wide_resnet")
    monkeypatch.setattr(comp, "get_robustarch_model", lambda name: ra.NormalizedWideResNet(
        ra.CIFAR10_MEAN, ra.CIFAR10_STD, stem_width=16, depth=[2, 1, 1], stage_width=[24, 32, 48],
        groups=[1, 1, 1], activation_fn=torch.nn.SiLU, se_ratio=0.25, se_activation=torch.nn.ReLU,
        se_order=2, num_classes=10))
    v2 = comp.bit_rn_v2
    monkeypatch.setitem(v2.KNOWN_MODELS, "BiT-M-R152x2", lambda **kw: v2.ResNetV2([1, 1, 1, 1], 1, **kw))
    full_wrn = comp.DMWideResNet
    monkeypatch.setattr(comp, "DMWideResNet", lambda **kw: full_wrn(**{**kw, "depth": 10, "width": 4}))
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)  # the peer narrates every setting
    yield comp
    forget_peer_modules(before)


def _save_peer(comp, model_dir: Path, with_norm: bool, dataset: str = "cifar100"):
    """The peer's MixedNUTS model with random weights, saved as RobustBench's two files."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    peer = comp.get_nonlin_mixed_classifier(dataset)
    for part in (peer.std_model, peer.rob_model):
        randomize_normalisation(part, gen)
    # a few outlying classes in h, so the normalised logits pass the shift c and the power acts
    n = 5 if dataset == "cifar100" else 1
    peer.rob_model.logits.bias.data[:n] += 3 + torch.rand(n, generator=gen)
    std_state = dict(peer.std_model.state_dict())
    if with_norm:  # bit_rn_v2 keeps mean/std as parameters; a file that holds them must be honoured
        peer.std_model.mean.data = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)
        peer.std_model.std.data = torch.tensor([0.3, 0.5, 0.7]).view(3, 1, 1)
        std_state = dict(peer.std_model.state_dict())
    else:  # RobustBench loads such a file non-strictly and keeps 0.5
        std_state = {k: v for k, v in std_state.items() if k not in ("mean", "std")}
    files = bai2024_files("Bai2024MixedNUTS", dataset, model_dir)
    files[0].parent.mkdir(parents=True)
    torch.save(std_state, files[0])
    torch.save(peer.rob_model.state_dict(), files[1])
    return peer.eval()


def _mapped(model, h_logits):
    from adasmooth.mixing.nonlinear import nonlinear_map

    p = nonlinear_params_of(model)
    return nonlinear_map(h_logits, p.s, p.c, p.p, p.top_k, p.activation).float()


@needs_peer
@pytest.mark.parametrize("dataset,with_norm", [("cifar100", False), ("cifar100", True), ("cifar10", False)])
def test_mixednuts_matches_robustbench(peer, tmp_path, dataset, with_norm):
    ref = _save_peer(peer, tmp_path, with_norm, dataset)
    ours, info = load_mixture(f"robustbench:{dataset}/Linf/Bai2024MixedNUTS", model_dir=tmp_path)
    assert isinstance(ours, MixedClassifier) and info["rule"] == "nonlinear"
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
        g_ref, g_ours = ref.std_model(x), ours.std_model(x)
        h_ref, h_ours = ref.rob_model(x), ours.rob_model(x)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_ours, h_ref, rtol=0, atol=1e-5)
    # the mixture is not vacuous: g's hardmax moves some rows' top class away from h's
    assert got.shape == (6, 10 if dataset == "cifar10" else 100) and torch.isfinite(got).all()
    assert (g_ref.argmax(1) != h_ref.argmax(1)).any()
    err = (got - expected).abs().max().item()
    # float32 base models differ in the last bit (h by ~2e-7: another summation order); the map's
    # slope (s * p * a^(p-1) / row std, tens near the outlying classes) turns that into ~1e-5 here
    # on logits up to ~30. In float64 the two agree to float32 rounding of theirs.
    with torch.no_grad():
        err64 = (ours.double()(x.double()) - ref.double()(x.double())).abs().max().item()
    assert err64 < 1e-5, err64
    # not vacuous: the map makes h's rows peaked, and g's one-hot lifts its class above alpha * h's share
    assert expected.max() > -1.5
    h_only = torch.log_softmax(_mapped(ours, h_ours), dim=1) + torch.log(torch.tensor(ours.alpha))
    lift = (got - h_only).gather(1, g_ours.argmax(1, keepdim=True))
    assert (lift > 1e-3).all()
    assert err < 1e-4, err


@needs_peer
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_constants_are_those_of_optimal_spca(peer, dataset):
    ref = peer.get_nonlin_mixed_classifier(dataset)
    entry = BAI2024_ENTRIES[(dataset, "Bai2024MixedNUTS")]
    rob_map = ref.rob_map
    assert ref._alpha.item() == pytest.approx(entry.alpha, abs=1e-7)
    assert ref._alpha_diffable.item() == pytest.approx(entry.alpha_diffable, abs=1e-7)
    # theirs are float32 tensors made from the yaml's float64 values: equal to float32 rounding
    for ours, theirs in ((entry.s, rob_map.scale), (entry.p, rob_map.power), (entry.c, rob_map.clamp_bias)):
        assert torch.tensor(ours, dtype=torch.float32) == theirs
    assert rob_map.ln_k == entry.top_k and isinstance(rob_map.clamp_fn, torch.nn.GELU)
    assert rob_map.clamp_fn.approximate == "none"


def test_bad_files_and_unsupported_entries_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Bai2024MixedNUTS.pt_m0.pt"):
        load_mixture(SPEC, model_dir=tmp_path)
    assert [p.name for p in mixture_files(SPEC, tmp_path)] == ["Bai2024MixedNUTS.pt_m0.pt", "Bai2024MixedNUTS.pt_m1.pt"]
    with pytest.raises(ConfigError, match="known"):
        load_mixture("robustbench:cifar10/Linf/Bai2024Other", model_dir=tmp_path)
    with pytest.raises(ConfigError, match="known"):
        load_bai2024("Bai2024Nothing", "cifar100", tmp_path)
    files = bai2024_files("Bai2024MixedNUTS", "cifar100", tmp_path)
    files[0].parent.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(1)}, files[0])
    torch.save({"conv.weight": torch.zeros(1)}, files[1])
    with pytest.raises(CheckpointError, match="not a BiT"):
        load_mixture(SPEC, model_dir=tmp_path)


def test_loaded_model_carries_the_yaml_map():
    from adasmooth.mixing.bai2024 import build_bai2024

    model = build_bai2024("Bai2024MixedNUTS", "cifar100", {"units": (1, 1, 1, 1), "width_factor": 1},
                          {"depth": 10, "width": 1})
    params = nonlinear_params_of(model)
    assert (params.s, params.c, params.p, params.top_k, params.activation) == (
        0.6115753843212784, -2.142857142857143, 3.571428571428571, 250, "gelu")
    assert model.alpha == pytest.approx(0.9860300534207915)


def test_squeeze_excitation_by_hand():
    from adasmooth.models.ra_wide_resnet import SqueezeExcitation

    se = SqueezeExcitation(2, 1)
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        se.fc1.bias.fill_(0.5)
        se.fc2.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        se.fc2.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.stack([torch.ones(2, 2), torch.full((2, 2), 3.0)])[None]
    # channel means (1, 3): fc1 = 1 - 3 + 0.5 = -1.5, relu -> 0; fc2 -> biases (0, 1); gates sigmoid(0), sigmoid(1)
    out = se(x)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.5, 3 / (1 + torch.e ** -1)]))
    x.requires_grad_(True)
    se(x).sum().backward()  # differentiable through the gate
    assert torch.isfinite(x.grad).all()


def test_ra_wrn_sizes_are_read_back_from_its_state_dict():
    from adasmooth.models import create_model
    from adasmooth.models.ra_wide_resnet import ra_wrn_config_from_state_dict

    kw = {"stem_width": 8, "depths": (2, 1, 3), "stage_widths": (16, 24, 32), "se_ratio": 0.25}
    model = create_model("ra-wrn-70-16", 10, input_shape=(3, 32, 32), **kw)
    cfg = ra_wrn_config_from_state_dict(model.state_dict(), "m")
    assert cfg == {**kw, "num_classes": 10}
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="70-16"):
        create_model("ra-wrn-70-16", 10, depth=28)
    with pytest.raises(CheckpointError, match="not a RaWRN"):
        ra_wrn_config_from_state_dict({}, "m")
