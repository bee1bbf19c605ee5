"""timm: / torchvision: / python: specs with constructor options, class counts from the weights,
one-line errors, default taps from timm's ``feature_info`` and torchvision's stages, taps without the
wrapper's prefix.

CI has neither timm nor torchvision: the stand-ins below imitate what adasmooth uses of them
(``timm.create_model(name, pretrained=False, **options)``, ``timm.list_models()``, a model's
``feature_info``, ``get_classifier()`` and ``num_classes``; ``torchvision.models.get_model(name,
weights=None, **options)``, ``list_models()``, the ResNets' module names)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from adasmooth.cli import main
from adasmooth.core.errors import ConfigError
from adasmooth.mixing.adaptive import build_adaptive_classifier, load_adaptive_classifier, save_adaptive_classifier
from adasmooth.models import default_taps, load_model
from adasmooth.models.loader import split_options

# ---------------------------------------------------------------------------- stand-ins


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


class TimmNet(nn.Module):
    """Like a timm ResNet: ``act1`` at reduction 2, ``layer1``.. at 4, 8, 16, a ``fc`` head."""

    def __init__(self, num_classes: int = 1000, width: int = 4, drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.act1 = nn.ReLU()
        self.layer1 = _conv(width, width, 2)
        self.layer2 = _conv(width, 2 * width, 2)
        self.layer3 = _conv(2 * width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)
        self.feature_info = [{"num_chs": width, "reduction": 2, "module": "act1"},
                             {"num_chs": width, "reduction": 4, "module": "layer1"},
                             {"num_chs": 2 * width, "reduction": 8, "module": "layer2"},
                             {"num_chs": 2 * width, "reduction": 16, "module": "layer3"}]
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.act1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class VitLikeNet(TimmNet):
    """feature_info entries all at one reduction (a ViT's blocks): every entry is a stage."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.feature_info = [{"num_chs": 4, "reduction": 16, "module": m} for m in ("layer1", "layer2", "layer3")]


class TorchvisionResNet(nn.Module):
    """The module names of torchvision's ResNets."""

    def __init__(self, num_classes: int = 1000, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = _conv(width, width, 1)
        self.layer2 = _conv(width, width, 2)
        self.layer3 = _conv(width, width, 2)
        self.layer4 = _conv(width, width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchvisionFeatures(nn.Module):
    """A ``features`` sequence (EfficientNet, MobileNet, VGG, ...) at reductions 2, 2, 4, 4, 8, 16."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 2, 1),
                                      nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
        self.classifier = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def _timm_module(calls: list) -> types.ModuleType:
    nets = {"timmnet": TimmNet, "vitlike": VitLikeNet}
    timm = types.ModuleType("timm")

    def create_model(name, pretrained=False, **options):
        calls.append((name, pretrained, options))
        if name.split(".")[0] not in nets:
            raise RuntimeError(f"Unknown model ({name})")
        return nets[name.split(".")[0]](**options)

    timm.create_model = create_model
    timm.list_models = lambda: sorted(nets)
    return timm


@pytest.fixture
def timm_calls(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setitem(sys.modules, "timm", _timm_module(calls))
    return calls


@pytest.fixture
def torchvision_stand_in(monkeypatch) -> None:
    nets = {"resnet18": TorchvisionResNet, "efficientnet_b0": TorchvisionFeatures}
    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")

    def get_model(name, weights=None, **options):
        if name not in nets:
            raise ValueError(f"Unknown model {name}")
        return nets[name](**options)

    models.get_model, models.list_models, package.models = get_model, lambda: sorted(nets), models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def _weights(model: nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


# ---------------------------------------------------------------------------- options and class counts


def test_spec_options_are_typed_query_strings():
    name, options = split_options("timm:x?a=10&b=0.5&c=true&d=False&e=gelu&f=1e-3", "x?a=10&b=0.5&c=true&d=False"
                                                                                     "&e=gelu&f=1e-3")
    assert name == "x"
    assert options == {"a": 10, "b": 0.5, "c": True, "d": False, "e": "gelu", "f": 0.001}
    assert [type(options[k]) for k in "abcde"] == [int, float, bool, bool, str]
    for body, text in [("x?", "nothing after '?'"), ("x?a", "'a' is not name=value"), ("x?1a=2", "not name=value"),
                       ("x?a=1&a=2", "'a' is given twice")]:
        with pytest.raises(ConfigError, match=text):
            split_options(f"timm:{body}", body)


def test_timm_options_reach_the_constructor(timm_calls):
    model, info = load_model("timm:timmnet?num_classes=10&drop_rate=0.25&width=6")
    assert timm_calls == [("timmnet", False, {"num_classes": 10, "drop_rate": 0.25, "width": 6})]
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    assert info["num_classes"] == 10 and info["architecture"] == "timmnet"
    assert info["options"] == {"num_classes": 10, "drop_rate": 0.25, "width": 6}


def test_class_count_comes_from_the_weights_head(timm_calls, torchvision_stand_in, tmp_path):
    torch.manual_seed(0)
    trained = TimmNet(num_classes=10)
    weights = _weights(trained, tmp_path / "timm10.safetensors")
    model, info = load_model(f"timm:timmnet@{weights}")
    assert info["num_classes"] == 10 and info["options"] == {"num_classes": 10}
    x = torch.rand(3, 3, 16, 16)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)  # the stand-in's pretrained_cfg
    with torch.no_grad():
        assert torch.allclose(model(x), trained((x - mean) / std), atol=1e-6)
    # torchvision: the ImageNet normalisation, and the class count of a .pt file's head
    resnet = TorchvisionResNet(num_classes=7)
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, tmp_path / "r7.pt")
    model, info = load_model(f"torchvision:resnet18@{tmp_path / 'r7.pt'}")
    assert info["num_classes"] == 7 and model(x).shape == (3, 7)
    # given explicitly, the class count is the user's: a mismatch is the weights' one-line error
    with pytest.raises(Exception, match=r"fc.weight \(10, 8\) in the file, \(5, 8\) in the model") as err:
        load_model(f"timm:timmnet?num_classes=5@{weights}")
    assert "\n" not in str(err.value)


def test_python_factories_take_options_and_the_weights_class_count(tmp_path, monkeypatch):
    (tmp_path / "user_factories_f.py").write_text(
        "from torch import nn\n"
        "def mlp(num_classes=3, hidden=5):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, info = load_model("python:user_factories_f:mlp?hidden=7&num_classes=4")
    assert model[1].out_features == 7 and info["num_classes"] == 4
    weights = _weights(model, tmp_path / "mlp.safetensors")
    _, info = load_model(f"python:user_factories_f:mlp?hidden=7@{weights}")
    assert info["num_classes"] == 4 and info["options"] == {"hidden": 7, "num_classes": 4}


# ---------------------------------------------------------------------------- failures: one line, exit 2


def _one_line_exit_2(capsys, argv: list[str], text: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("spec,text", [
    ("timm:resnet_nope", "timm has no model 'resnet_nope'"),
    ("timm:timnet", "did you mean timmnet?"),
    ("timm:timmnet?bogus_option=1", "timm.create_model('timmnet') with {'bogus_option': 1} failed (TypeError:"),
    ("torchvision:resnet_nope", "torchvision has no model 'resnet_nope'; did you mean resnet18?"),
    ("python:user_factories_g:broken", "broken() failed (RuntimeError: no GPU here)"),
    ("python:user_factories_g:broken?size=3", "broken() with {'size': 3} failed (TypeError:"),
    ("python:user_factories_h:net", "cannot import user_factories_h (SyntaxError: "),
    ("python:user_factories_i:net", "cannot import user_factories_i (ZeroDivisionError: division by zero)"),
])
def test_a_model_that_cannot_be_built_is_one_line_exit_2(spec, text, timm_calls, torchvision_stand_in, tmp_path,
                                                         monkeypatch, capsys):
    (tmp_path / "user_factories_g.py").write_text("def broken():\n    raise RuntimeError('no GPU here')\n")
    (tmp_path / "user_factories_h.py").write_text("def net(:\n    pass\n")
    (tmp_path / "user_factories_i.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="model spec"):
        load_model(spec)
    _one_line_exit_2(capsys, ["export", "--std", spec, "--rob", spec, "--alpha", "0.5", "--input-shape", "3", "8", "8",
                              "--output", str(tmp_path / "m.pt2")], text)
    assert not (tmp_path / "m.pt2").exists()


# ---------------------------------------------------------------------------- default taps


def test_default_taps_of_timm_models_follow_feature_info(timm_calls):
    model, _ = load_model("timm:timmnet")
    assert model.stage_names == ("model.act1", "model.layer1", "model.layer2", "model.layer3")
    assert default_taps(model) == ("model.layer1", "model.layer2")
    vit, _ = load_model("timm:vitlike")  # no entry before the first stage: the normalisation stands for it
    assert vit.stage_names == ("normalize", "model.layer1", "model.layer2", "model.layer3")
    assert default_taps(vit) == ("model.layer1", "model.layer2")


def test_default_taps_of_torchvision_models(torchvision_stand_in):
    resnet, _ = load_model("torchvision:resnet18")
    assert default_taps(resnet) == ("model.layer1", "model.layer2")
    # a features sequence at reductions 2, 2, 4, 4, 8, 16: the last at 4 (index 3) and at 8 (index 4)
    features, _ = load_model("torchvision:efficientnet_b0")
    assert features.stage_names == ("model.features.2", "model.features.3", "model.features.4", "model.features.5")
    assert default_taps(features) == ("model.features.3", "model.features.4")


def test_mixing_foreign_models_with_default_and_unprefixed_taps(timm_calls, torchvision_stand_in, tmp_path):
    g, _ = load_model("timm:timmnet?num_classes=10")
    h, _ = load_model("torchvision:resnet18?num_classes=10")
    mixed = build_adaptive_classifier(g, h, (3, 16, 16), widths=(4, 4, 4), blocks=(1, 1, 1)).eval()
    assert mixed.std_taps == ("model.layer1", "model.layer2") == mixed.rob_taps
    named = build_adaptive_classifier(g, h, (3, 16, 16), taps=("layer2", "layer3"), widths=(4, 4, 4),
                                      blocks=(1, 1, 1)).eval()
    assert named.std_taps == ("model.layer2", "model.layer3") == named.rob_taps  # recorded by their full path
    assert named(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"tap 'layer9' .* model\.layer1.*the prefix model\. may be left out"):
        build_adaptive_classifier(g, h, (3, 16, 16), taps=("layer1", "layer9"))
    # the saved mixture records the full tap names and its input shape; export needs no --input-shape
    named.std_checkpoint = f"timm:timmnet@{_weights(g.model, tmp_path / 'g.safetensors')}"
    named.rob_checkpoint = f"torchvision:resnet18@{_weights(h.model, tmp_path / 'h.safetensors')}"
    save_adaptive_classifier(named, tmp_path / "mix")
    record = json.loads((tmp_path / "mix.json").read_text())
    assert record["taps"]["std"] == ["model.layer2", "model.layer3"] and record["input_shape"] == [3, 16, 16]
    loaded, _ = load_adaptive_classifier(tmp_path / "mix")
    assert loaded.input_shape == (3, 16, 16)
    assert main(["export", "--mixnet", str(tmp_path / "mix"), "--output", str(tmp_path / "mix.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "mix.pt2")).module()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(program(x), named(x), atol=1e-5, rtol=0)
