"""The authors' composites (RobustBench's Bai2023Improving_*) against RobustBench's own code.

RobustBench 1.1.1 (``pip install robustbench==1.1.1 --no-deps``) is the peer: its package import needs
torchvision, so its architecture files are loaded by path under stand-in parent packages; its
``comp_model.py`` imports timm (ConvNeXt only) and ``robustarch_wide_resnet`` (torchvision), which
stand-ins satisfy. The real composite is a BiT-R152x2 + WRN-70-16 (about 500M parameters), too big
for CI: the peer's own ``get_composite_model`` builds it here at reduced size (BiT R?x1 with one unit
per block, WRN-10-4, the mixing network for tap widths 256 + 64: the smallest its size table allows),
with every constant of comp_model.py as RobustBench sets it.
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
from adasmooth.mixing.adaptive import AdaptiveMixedClassifier
from adasmooth.mixing.export import export_mixture
from adasmooth.mixing.bai2023 import BAI2023_ENTRIES, Bai2023MixingNet, bai2023_files, build_bai2023, load_bai2023

from robustbench_peer import forget_peer_modules, randomize_normalisation, stand_in_packages

_SPEC = importlib.util.find_spec("robustbench")
needs_peer = pytest.mark.skipif(_SPEC is None, reason="robustbench==1.1.1 not installed (pip install --no-deps)")


@pytest.fixture
def peer(monkeypatch):
    """RobustBench's comp_model module, loaded by path, patched to build a reduced composite."""
    root = Path(_SPEC.submodule_search_locations[0])
    before = stand_in_packages(monkeypatch, root)
    for stub in ("convnext_v2", "robustarch_wide_resnet"):
        mod = types.ModuleType(f"robustbench.model_zoo.architectures.{stub}")
        mod.get_model = None
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    comp = importlib.import_module("robustbench.model_zoo.architectures.comp_model")
    bit_rn, dm_rn = comp.bit_rn, comp.dm_rn

    # reduced sizes; everything else (constants, wiring, forward) is the peer's own code
    monkeypatch.setitem(bit_rn.KNOWN_MODELS, "BiT-M-R152x2", lambda **kw: bit_rn.ResNetV2([1, 1, 1, 1], 1, **kw))
    full_wrn, full_mixnet = dm_rn.WideResNet, comp.MixingNetV4
    monkeypatch.setattr(dm_rn, "WideResNet", lambda **kw: full_wrn(**{**kw, "depth": 10, "width": 4}))
    monkeypatch.setattr(comp, "MixingNetV4", lambda fs: full_mixnet({**fs, "in_planes": (256, 64)}))
    # bit_rn.ResNetV2 puts its constants on CUDA unconditionally; these machines have none
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)  # the peer narrates every setting
    yield comp
    forget_peer_modules(before)


def _save_peer_composite(comp, name: str, dataset: str, model_dir: Path, x: torch.Tensor):
    """Build the peer's composite, give it random weights, save RobustBench's three files; (peer, x)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    wrapper = comp.get_composite_model(name.split("_")[1], dataset)
    peer = wrapper.comp_model
    for m in (*peer.models, peer.policy_net):
        randomize_normalisation(m, gen)
    with torch.no_grad():  # put gamma's BatchNorm where these inputs' gammas are, so alpha varies
        _, (s1, s2) = peer.models[0](torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear"))
        _, (r1, r2) = peer.models[1](x)
        gammas = peer.policy_net([s1, r1], [s2, r2])
        peer.bn.running_mean.fill_(gammas.mean().item())
        peer.bn.running_var.fill_(gammas.var().item())
    wrapper.eval()
    files = bai2023_files(name, dataset, model_dir)
    files[0].parent.mkdir(parents=True)
    torch.save(peer.models[0].state_dict(), files[0])
    # one part in the {"state_dict": {"module.*": ...}} form RobustBench also accepts
    torch.save({"state_dict": {f"module.{k}": v for k, v in peer.models[1].state_dict().items()}}, files[1])
    torch.save({"model": peer.policy_net.state_dict(), "bn": peer.bn.state_dict()}, files[2])
    return wrapper


@needs_peer
@pytest.mark.parametrize("dataset,name", [("cifar10", "Bai2023Improving_edm"), ("cifar100", "Bai2023Improving_trades")])
def test_composite_matches_robustbench(peer, tmp_path, dataset, name):
    """Logits and alpha in eval mode; then, in training mode, the clamp-then-BatchNorm path and full range."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    wrapper = _save_peer_composite(peer, name, dataset, tmp_path, x)
    model = load_bai2023(name, dataset, tmp_path)
    assert isinstance(model, AdaptiveMixedClassifier) and isinstance(model.mixing_net, Bai2023MixingNet)
    c = wrapper.comp_model
    with torch.no_grad():
        ref_logits, ref_gamma = c(x)
        out = model.mix(x)
    ref_alpha = torch.sigmoid(ref_gamma) * c.alpha_scale + c.alpha_bias
    assert out.logits.shape == (3, 10 if dataset == "cifar10" else 100)
    assert float(ref_alpha.std()) > 1e-3  # alpha really varies across inputs: not a vacuous match
    assert torch.allclose(out.alpha, ref_alpha, atol=1e-5, rtol=0)
    assert torch.allclose(out.logits, ref_logits, atol=1e-4, rtol=0), (out.logits - ref_logits).abs().max()

    wrapper.train()
    model.train()
    with torch.no_grad():
        ref_logits, ref_gamma = c(x)
        out = model.mix(x)
    assert torch.allclose(out.alpha_logit, ref_gamma, atol=1e-5, rtol=0)
    assert torch.allclose(out.logits, ref_logits, atol=1e-4, rtol=0)
    assert torch.allclose(model.mixing_net.bn.running_mean, c.bn.running_mean, atol=1e-6)


@needs_peer
@pytest.mark.parametrize("dataset,name", sorted(BAI2023_ENTRIES))
def test_constants_are_those_of_comp_model(peer, monkeypatch, dataset, name):
    """Every entry's logit scales, gamma scale/shift, alpha range and activation, read off the peer's object."""
    monkeypatch.setattr(peer, "MixingNetV4", lambda fs: torch.nn.Linear(1, 1))  # sizes do not matter here
    c = peer.get_composite_model(name.split("_")[1], dataset).comp_model
    model = build_bai2023(name, dataset, {"units": (1, 1, 1, 1), "width_factor": 1}, {"depth": 10, "width": 4},
                          {"widths": [8, 8, 8], "blocks": 1})
    assert (model.std_scale, model.rob_scale) == pytest.approx((float(c.std_scale), float(c.rob_scale)))
    head = model.mixing_net.eval_head()
    assert (head["scale"], head["shift"]) == pytest.approx((float(c.gamma_scale), float(c.gamma_bias)))
    assert (head["alpha_min"], head["alpha_max"]) == pytest.approx(
        (float(c.alpha_bias), float(c.alpha_bias + c.alpha_scale)))
    assert c.bn.momentum == model.mixing_net.bn.momentum
    # their Swish and nn.SiLU are one function: the robust model's activation must be it, never ReLU
    z = torch.linspace(-4, 4, 9)
    peer_act = next(m for m in c.models[1].modules() if type(m).__name__ in ("SiLU", "Swish", "ReLU"))
    our_act = model.rob_model.layer[0].block[0].relu_0
    assert torch.allclose(peer_act(z.clone()), our_act(z), atol=1e-7)
    assert model.std_model.input_size == 128 and model.rob_model.logits.out_features == c.models[1].logits.out_features


def test_missing_files_unknown_entries_and_pickles_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="known: cifar10/Linf/Bai2023Improving_edm"):
        load_bai2023("Bai2023Improving_trades", "cifar10", tmp_path)
    with pytest.raises(CheckpointError, match=r"Bai2023Improving_edm\.pt_m0\.pt not found"):
        load_bai2023("Bai2023Improving_edm", "cifar10", tmp_path)
    files = bai2023_files("Bai2023Improving_edm", "cifar10", tmp_path)
    files[0].parent.mkdir(parents=True)
    torch.save({"root.conv.weight": torch.zeros(64, 3, 7, 7), "head.conv.weight": torch.zeros(10, 2048, 1, 1),
                "not_a_tensor": types.SimpleNamespace()}, files[0])
    with pytest.raises(CheckpointError, match="pickled code"):
        load_bai2023("Bai2023Improving_edm", "cifar10", tmp_path)
    torch.save({"root.conv.weight": torch.zeros(64, 3, 7, 7)}, files[0])
    torch.save({"logits.weight": torch.zeros(10, 4)}, files[1])
    torch.save({"model": {}}, files[2])
    with pytest.raises(CheckpointError, match="expected keys 'model' and 'bn'"):
        load_bai2023("Bai2023Improving_edm", "cifar10", tmp_path)
    torch.save({"model": {}, "bn": {}}, files[2])
    with pytest.raises(CheckpointError, match=r"m0\.pt is not a BiT ResNet-v2 state dict \(no head.conv.weight\)"):
        load_bai2023("Bai2023Improving_edm", "cifar10", tmp_path)


def test_a_composite_exports_and_runs_as_a_torch_export_program(tmp_path):
    """The composite's parts (weight-standardised convs, the 128x128 resize, hand padding) export faithfully."""
    torch.manual_seed(0)
    model = build_bai2023("Bai2023Improving_edm", "cifar100", {"units": (1, 1, 1, 1), "width_factor": 1},
                          {"depth": 10, "width": 1}, {"widths": [8, 8, 8], "blocks": 1})
    info = export_mixture(model, tmp_path / "bai.pt2", (3, 32, 32))
    assert info["format"] == "export" and "fallback" not in info
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    exported = torch.export.load(str(tmp_path / "bai.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5, rtol=0)
    assert info["mixing_net"] == "Bai2023MixingNet" and info["eval_head"]["alpha_min"] == pytest.approx(0.84)


def test_a_composite_calibrates_in_place_and_refuses_our_file_format(tmp_path):
    """calibrate_adaptive works on the authors' head (same eval-head interface); saving in our format is refused."""
    from adasmooth.data import Dataset
    from adasmooth.evaluate.calibrate import calibrate_adaptive
    from adasmooth.mixing.adaptive import save_adaptive_classifier

    torch.manual_seed(0)
    model = build_bai2023("Bai2023Improving_trades", "cifar100", {"units": (1, 1, 1, 1), "width_factor": 1},
                          {"depth": 10, "width": 1}, {"widths": [8, 8, 8], "blocks": 1})
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model.std_model(x).argmax(1)  # labels g gets right: the target needs alpha low enough for g
    summary = calibrate_adaptive(model, Dataset(x, y, 100, "cifar100", "val"), target_acc=100.0, alpha_range=(0.0, 1.0))
    assert summary["reached"] and summary["clean_acc"] == 100.0
    assert float(model.mixing_net.eval_shift) == pytest.approx(summary["value"]) != pytest.approx(1.0)
    assert model.mixing_net.eval_head()["alpha_min"] == 0.0
    with torch.no_grad():
        assert bool((model(x).argmax(1) == y).all())
    with pytest.raises(ConfigError, match="Bai2023MixingNet"):
        save_adaptive_classifier(model, tmp_path / "m")


@needs_peer
def test_evaluate_runs_on_a_released_composite(peer, tmp_path, capsys):
    """`adasmooth evaluate --mixnet robustbench:.../Bai2023Improving_edm`: the paper's own model under attack B,
    with data set and eps taken from the entry (cifar10, 8/255)."""
    import json

    from test_load_model import _fake_cifar10

    from adasmooth.cli import main
    from adasmooth.mixing.export import load_mixture

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    wrapper = _save_peer_composite(peer, "Bai2023Improving_edm", "cifar10", tmp_path / "zoo", x)
    spec = "robustbench:cifar10/Linf/Bai2023Improving_edm"
    model, info = load_mixture(spec, model_dir=tmp_path / "zoo")
    with torch.no_grad():
        assert torch.allclose(model(x), wrapper.comp_model(x)[0], atol=1e-4, rtol=0)
    _fake_cifar10(tmp_path / "data", n=4)
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--mixnet", spec, "--model-dir", str(tmp_path / "zoo"), "--data-dir", str(tmp_path / "data"),
               "--attacks", "B", "--n-examples", "4", "--no-progress", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    config = json.loads(out.read_text())["config"]
    assert config["dataset"] == "cifar10" and config["eps"] == pytest.approx(8 / 255)
