"""``load_model(spec)``: every spec kind, its errors, default taps on the new architectures, and the
commands (evaluate, sweep, certify) taking any spec for --model/--std/--rob."""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from adasmooth.cli import main
from adasmooth.core.errors import CheckpointError, ConfigError, MissingDependencyError
from adasmooth.mixing.adaptive import build_adaptive_classifier
from adasmooth.mixing.network import resolve_module
from adasmooth.models import create_model, default_taps, load_model, model_info
from adasmooth.models import robustbench as rb
from adasmooth.models.checkpoint import recorded_threat, save_checkpoint
from adasmooth.models.loader import spec_files, spec_kind

C10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
TINY = rb.ZooEntry("cifar10", "Linf", "TinyTest", "dm-wrn-10-1", {"activation": "swish"}, C10)


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """A tiny DMWideResNet entry in the table and its file, state dict under "state_dict" with "module."."""
    monkeypatch.setitem(rb.ZOO, TINY.key, TINY)
    torch.manual_seed(0)
    model = create_model(TINY.architecture, 10, mean=C10[0], std=C10[1], **TINY.kwargs).eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    path = tmp_path / "zoo" / "cifar10" / "Linf" / "TinyTest.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state}, path)
    return tmp_path / "zoo", model


def _python_module(tmp_path, monkeypatch, name: str) -> None:
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n"
        "def linear():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))\n"
        "def not_a_module():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


# ---------------------------------------------------------------------------- spec kinds


def test_checkpoint_spec_is_load_checkpoint(tmp_path):
    model = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8, dataset="digits")
    save_checkpoint(model, tmp_path / "g")
    loaded, info = load_model(tmp_path / "g")
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert info["dataset"] == "digits" and spec_kind(str(tmp_path / "g")) == "checkpoint"


def test_robustbench_spec_reads_model_dir_argument_then_environment(tiny_zoo, monkeypatch):
    model_dir, reference = tiny_zoo
    x = torch.rand(2, 3, 32, 32)
    loaded, info = load_model(f"robustbench:{TINY.key}", model_dir=model_dir)
    assert torch.equal(loaded(x), reference(x))
    monkeypatch.setenv("ADASMOOTH_MODEL_DIR", str(model_dir))
    again, _ = load_model("robustbench:cifar10/linf/TinyTest")  # lower-case threat, folder from the environment
    assert torch.equal(again(x), reference(x))
    assert info["threat"] == {"model": "Linf", "norm": "linf", "eps": pytest.approx(8 / 255)}
    assert recorded_threat(None, None, info, "h") == (pytest.approx(8 / 255), "linf")
    assert spec_files(f"robustbench:{TINY.key}") == [model_dir / "cifar10" / "Linf" / "TinyTest.pt"]
    assert model_info(f"robustbench:{TINY.key}")["input_shape"] == [3, 32, 32]


def test_a_loaded_robustbench_model_saves_as_an_adasmooth_checkpoint(tiny_zoo, tmp_path):
    model, _ = load_model(f"robustbench:{TINY.key}", model_dir=tiny_zoo[0])
    save_checkpoint(model, tmp_path / "converted")
    again, info = load_model(tmp_path / "converted")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), model(x)) and info["architecture"] == "dm-wrn-10-1"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_python_spec_with_weights_strips_prefixes(tmp_path, monkeypatch, suffix):
    _python_module(tmp_path, monkeypatch, "user_nets_a")
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    weights = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({f"model.{k}": v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, weights)
    x = torch.rand(2, 3, 32, 32)
    for spec, kw in ((f"python:user_nets_a:linear@{weights}", {}), ("python:user_nets_a:linear", {"weights": weights})):
        loaded, info = load_model(spec, **kw)
        assert torch.equal(loaded(x), reference(x))
        assert info["num_classes"] == 10 and info["dataset"] is None
    assert spec_files(f"python:user_nets_a:linear@{weights}") == [weights]


def test_python_spec_wrong_keys_list_missing_and_unexpected(tmp_path, monkeypatch):
    _python_module(tmp_path, monkeypatch, "user_nets_b")
    save_file({"1.weight": torch.zeros(10, 3072), "head.bias": torch.zeros(10)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(f"python:user_nets_b:linear@{tmp_path / 'bad.safetensors'}")
    text = str(err.value)
    assert "missing keys 1.bias" in text and "unexpected keys head.bias" in text and "bad.safetensors" in text
    assert "\n" not in text


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickled_code_in_a_pt_file_is_refused_without_running(tmp_path, monkeypatch, capsys):
    _python_module(tmp_path, monkeypatch, "user_nets_c")
    torch.save({"state_dict": {"1.weight": _Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt holds pickled code"):
        load_model(f"python:user_nets_c:linear@{tmp_path / 'evil.pt'}")
    monkeypatch.setitem(rb.ZOO, TINY.key, TINY)
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": _Evil()}, tmp_path / "cifar10" / "Linf" / "TinyTest.pt")
    with pytest.raises(CheckpointError, match="TinyTest.pt holds pickled code"):
        load_model(f"robustbench:{TINY.key}", model_dir=tmp_path)
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("spec,error,text", [
    ("robustbench:cifar10/Linf/Nobody2099", ConfigError, "cifar10/Linf table (names are case-sensitive"),
    ("robustbench:cifar10/Carmon2019Unlabeled", ConfigError, "expected robustbench:<dataset>/<threat>/<name>"),
    ("robustbench:cifar10/Linf/Carmon2019Unlabeled", CheckpointError, "never downloads"),
    ("hf:some/model", ConfigError, "unknown kind 'hf'"),
    ("python:no_such_module_xyz:make", ConfigError, "cannot import no_such_module_xyz"),
    ("python:json", ConfigError, "expected python:<package.module>:<factory>"),
    ("python:json:nothing_here", ConfigError, "json has no callable 'nothing_here'"),
    ("python:json:dumps@", ConfigError, "nothing after '@'"),
    ("runs/model.pt", ConfigError, "bare weights file"),
    ("robustbench:cifar10/Linf/Standard@w.pt", ConfigError, "weights apply only"),
])
def test_bad_specs_are_one_line_errors(spec, error, text, tmp_path):
    with pytest.raises(error) as err:
        load_model(spec, model_dir=tmp_path)
    assert text in str(err.value) and "\n" not in str(err.value)


def test_python_factory_must_return_a_module(tmp_path, monkeypatch):
    _python_module(tmp_path, monkeypatch, "user_nets_d")
    with pytest.raises(ConfigError, match="returned a int, not a torch nn.Module"):
        load_model("python:user_nets_d:not_a_module")


@pytest.mark.parametrize("kind,package", [("timm", "timm"), ("torchvision", "torchvision.models")])
def test_timm_and_torchvision_missing_is_a_clear_error(kind, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # makes the import fail, as on these machines
    with pytest.raises(MissingDependencyError, match=f"needs {package}, which does not import here"):
        load_model(f"{kind}:resnet18")


def test_timm_models_get_imagenet_normalisation_and_weights(tmp_path, monkeypatch):
    stand_in = types.ModuleType("timm")
    stand_in.create_model = lambda name, pretrained: nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    monkeypatch.setitem(sys.modules, "timm", stand_in)
    torch.manual_seed(2)
    inner = stand_in.create_model("x", False)
    save_file({k: v.contiguous() for k, v in inner.state_dict().items()}, str(tmp_path / "t.safetensors"))
    model, info = load_model(f"timm:tiny@{tmp_path / 't.safetensors'}")
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), inner((x - mean) / std), atol=1e-6)
    assert info["num_classes"] == 5


# ---------------------------------------------------------------------------- named stages


@pytest.mark.parametrize("name,kwargs,taps", [
    ("dm-wrn-10-1", {"activation": "relu"}, ("layer.0", "layer.1")),
    ("rb-wrn-10-1", {"sub_block1": True}, ("block1", "block2")),
    ("dm-preact-resnet18", {}, ("layer_0", "layer_1")),
    ("rb-preact-resnet18", {"bn_before_fc": True}, ("layer1", "layer2")),
    ("rb-resnet18", {}, ("layer1", "layer2")),
])
def test_default_taps_of_the_robustbench_architectures(name, kwargs, taps):
    model = create_model(name, 10, **kwargs)
    assert default_taps(model) == taps
    for tap in model.stage_names:
        resolve_module(model, tap)


def test_mixing_network_runs_on_robustbench_architectures_with_default_taps():
    g = create_model("rb-wrn-10-1", 10).eval()
    h = create_model("dm-wrn-10-1", 10, activation="swish").eval()
    mixed = build_adaptive_classifier(g, h, (3, 32, 32), widths=(8, 8, 8), blocks=(1, 1, 1)).eval()
    out = mixed.mix(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 10) and ((out.alpha >= 0) & (out.alpha <= 1)).all()


def test_unknown_tap_lists_the_module_names():
    model = create_model("dm-wrn-10-1", 10)
    with pytest.raises(ConfigError) as err:
        resolve_module(model, "block1")
    assert "its stages are ['init_conv', 'layer.0'" in str(err.value)
    assert "its modules are normalize, init_conv, layer, batchnorm, relu, logits" in str(err.value)


# ---------------------------------------------------------------------------- the commands


def _fake_cifar10(folder, n: int = 8) -> None:
    """CIFAR-10's python batches with n random images each (the real set is not on these machines)."""
    rng = np.random.default_rng(0)
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (folder / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch))


@pytest.fixture
def cifar_setup(tiny_zoo, tmp_path, monkeypatch):
    """A fake CIFAR-10 test split, the tiny zoo entry, an adasmooth checkpoint and a python: module."""
    _fake_cifar10(tmp_path / "data")
    g = create_model("small-cnn", 10, in_channels=3, width=4, hidden=8, input_shape=(3, 32, 32), dataset="cifar10")
    save_checkpoint(g, tmp_path / "g")
    _python_module(tmp_path, monkeypatch, "user_nets_e")
    return types.SimpleNamespace(model_dir=tiny_zoo[0], data=tmp_path / "data", ckpt=tmp_path / "g",
                                 rb=f"robustbench:{TINY.key}", py="python:user_nets_e:linear", out=tmp_path / "out")


@pytest.mark.parametrize("std", ["ckpt", "py", "rb"])
def test_evaluate_mixes_any_spec_with_a_robustbench_model(cifar_setup, std, capsys):
    s = cifar_setup
    out = s.out / f"{std}.json"
    rc = main(["evaluate", "--std", str(getattr(s, std)), "--rob", s.rb, "--alpha", "0.6", "--model-dir",
               str(s.model_dir), "--data-dir", str(s.data), "--attacks", "pgd", "--n-examples", "4",
               "--batch-size", "4", "--no-progress", "--output", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    config = payload["config"]
    assert config["dataset"] == "cifar10" and config["eps"] == pytest.approx(8 / 255) and config["norm"] == "linf"
    assert len(payload["results"]["examples"]) == 4


def test_evaluate_a_single_robustbench_model_from_the_environment(cifar_setup, monkeypatch, capsys):
    s = cifar_setup
    monkeypatch.setenv("ADASMOOTH_MODEL_DIR", str(s.model_dir))
    rc = main(["evaluate", "--model", s.rb, "--data-dir", str(s.data), "--attacks", "pgd", "--n-examples", "4",
               "--no-progress", "--output", str(s.out / "single.json")])
    assert rc == 0 and "cifar10 test, 4 examples, linf" in capsys.readouterr().out


def test_sweep_takes_a_robustbench_h_and_a_python_g(cifar_setup, capsys):
    s = cifar_setup
    rc = main(["sweep", "--std", s.py, "--rob", s.rb, "--model-dir", str(s.model_dir), "--data-dir", str(s.data),
               "--alphas", "0,1", "--steps", "1", "--n-examples", "4", "--no-progress", "--output", str(s.out)])
    assert rc == 0
    rows = json.loads((s.out / "sweep.json").read_text())["results"]["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 1.0]


def test_certify_a_robustbench_model(cifar_setup, capsys):
    s = cifar_setup
    rc = main(["certify", "--model", s.rb, "--sigma", "0.25", "--std", str(s.ckpt), "--alpha", "0.5",
               "--model-dir", str(s.model_dir), "--data-dir", str(s.data), "--n0", "4", "--n", "8",
               "--n-examples", "2", "--batch-size", "8", "--no-progress", "--output", str(s.out / "cert")])
    assert rc == 0 and (s.out / "cert.json").is_file()


def test_train_mixnet_with_default_taps_on_a_robustbench_h_then_evaluate(cifar_setup, capsys):
    s = cifar_setup
    rc = main(["train-mixnet", "--std", str(s.ckpt), "--rob", s.rb, "--model-dir", str(s.model_dir), "--data-dir",
               str(s.data), "--widths", "8,8,8", "--blocks", "1,1,1", "--epochs", "1", "--batch-size", "8",
               "--n-train", "8", "--attack-steps", "1", "--eval-examples", "4", "--eval-pgd-steps", "1",
               "--bn-recalibration-batches", "1", "--no-progress", "--output", str(s.out / "mixnet")])
    assert rc == 0
    sidecar = json.loads((s.out / "mixnet.json").read_text())
    assert sidecar["taps"] == {"std": ["stage1", "stage2"], "rob": ["layer.0", "layer.1"]}
    rc = main(["evaluate", "--mixnet", str(s.out / "mixnet"), "--std", str(s.ckpt), "--rob", s.rb, "--model-dir",
               str(s.model_dir), "--data-dir", str(s.data), "--attacks", "B", "--n-examples", "4", "--no-progress",
               "--output", str(s.out / "mixed.json")])
    assert rc == 0


@pytest.mark.parametrize("spec,text", [
    ("robustbench:cifar10/Linf/Nobody2099", "not in RobustBench 1.1.1"),
    ("hf:x/y", "unknown kind"),
    ("model.pt", "bare weights file"),
])
def test_bad_specs_exit_2_with_one_line(cifar_setup, spec, text, capsys):
    s = cifar_setup
    rc = main(["evaluate", "--model", spec, "--data-dir", str(s.data), "--no-progress",
               "--output", str(s.out / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and text in err and len(err.splitlines()) == 1


def test_wrong_keys_in_a_robustbench_file_exit_2(cifar_setup, monkeypatch, capsys):
    s = cifar_setup
    monkeypatch.setitem(rb.ZOO, TINY.key, dataclasses.replace(TINY, architecture="dm-wrn-10-2"))
    rc = main(["evaluate", "--model", s.rb, "--model-dir", str(s.model_dir), "--no-progress",
               "--output", str(s.out / "x.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "TinyTest.pt do not fit the model" in err and "shape mismatch" in err
    assert len(err.splitlines()) == 1


def test_a_mixture_on_a_robustbench_h_loads_calibrates_and_exports_by_its_recorded_spec(cifar_setup, monkeypatch,
                                                                                       capsys):
    """The README's worked example in small: train-mixnet on (own g, RobustBench h), then evaluate, calibrate
    and export with the base models found from the mixture's own record (h by its spec, g by relative path)."""
    s = cifar_setup
    monkeypatch.setenv("ADASMOOTH_MODEL_DIR", str(s.model_dir))
    assert main(["train-mixnet", "--std", str(s.ckpt), "--rob", s.rb, "--data-dir", str(s.data), "--widths", "8,8,8",
                 "--blocks", "1,1,1", "--epochs", "1", "--batch-size", "8", "--n-train", "8", "--attack-steps", "1",
                 "--eval-examples", "4", "--eval-pgd-steps", "1", "--bn-recalibration-batches", "1", "--no-progress",
                 "--output", str(s.out / "mix")]) == 0
    assert json.loads((s.out / "mix.json").read_text())["rob_checkpoint"] == s.rb
    assert main(["evaluate", "--mixnet", str(s.out / "mix"), "--data-dir", str(s.data), "--attacks", "B",
                 "--n-examples", "4", "--no-progress", "--output", str(s.out / "e.json")]) == 0
    _fake_cifar10(s.data / "calibration", n=100)  # calibrate needs 100 images
    (s.data / "cifar-10-batches-py" / "test_batch").write_bytes(
        (s.data / "calibration" / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert main(["calibrate", "--mixnet", str(s.out / "mix"), "--data-dir", str(s.data), "--split", "test",
                 "--target-between", "0.5", "--attack-examples", "4", "--calib-apgd-steps", "1",
                 "--range-widths", "0.5", "--no-progress"]) == 0
    assert main(["export", "--mixnet", str(s.out / "mix-calibrated"), "--output", str(s.out / "mix.pt")]) == 0
    assert (s.out / "mix.pt").is_file()
