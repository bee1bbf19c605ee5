"""The same guarantees as tests/test_foreign_models.py, with the real timm and torchvision where they
import (a separate environment: ``torch==2.14.1 torchvision==0.29.1 timm``); skipped elsewhere.
Nothing is downloaded: models are built without pretrained weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adasmooth.core.errors import ConfigError
from adasmooth.mixing.adaptive import build_adaptive_classifier
from adasmooth.mixing.export import export_mixture, load_exported
from adasmooth.models import default_taps, load_model


def _importable(name: str):
    try:
        return __import__(name)
    except Exception:  # absent, or a torchvision built for another torch
        return None


timm = _importable("timm")
torchvision = _importable("torchvision")
needs_both = pytest.mark.skipif(timm is None or torchvision is None, reason="needs the real timm and torchvision")


@needs_both
def test_real_class_counts_taps_and_errors(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    g, info = load_model(f"timm:resnet18@{tmp_path / 'r18.safetensors'}")  # ImageNet head unless told otherwise
    assert info["num_classes"] == 10 and default_taps(g) == ("model.layer1", "model.layer2")
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(trained.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(trained.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(g(x), trained((x - mean) / std))
    h, info = load_model("torchvision:resnet18?num_classes=10")
    assert info["num_classes"] == 10 and default_taps(h) == ("model.layer1", "model.layer2")
    effnet, _ = load_model("torchvision:efficientnet_b0")  # features 2 and 3 end at reductions 4 and 8
    assert default_taps(effnet) == ("model.features.2", "model.features.3")
    for spec, text in [("timm:resnet_nope", "timm has no model 'resnet_nope'"),
                       ("torchvision:resnet_nope", "torchvision has no model 'resnet_nope'"),
                       ("timm:resnet18?bogus=1", "unexpected keyword argument 'bogus'")]:
        with pytest.raises(ConfigError, match=text) as err:
            load_model(spec)
        assert "\n" not in str(err.value)

    mixed = build_adaptive_classifier(g, h, (3, 32, 32), taps=("layer1", "layer2"), widths=(8, 8, 8),
                                      blocks=(1, 1, 1)).eval()
    info = export_mixture(mixed, tmp_path / "mix.pt2", (3, 32, 32))
    assert info["format"] == "export" and "fallback" not in info
    module, record = load_exported(tmp_path / "mix.pt2")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(module(x), mixed(x), atol=1e-5, rtol=0)
    assert record["input_shape"] == [3, 32, 32]
