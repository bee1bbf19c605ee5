"""Model registry: output shapes for every architecture, named stages, built-in normalisation, errors."""

from __future__ import annotations

import pytest
import torch

from adasmooth.core.errors import ConfigError, InputError
from adasmooth.models.base import Normalize, create_model, default_taps, list_models

# (registry name, kwargs that keep it small, input shape (C, H, W))
ARCHS = [
    ("small-cnn", {"width": 4, "hidden": 16}, (1, 8, 8)),
    ("small-cnn", {"width": 4, "hidden": 16}, (1, 28, 28)),
    ("small-cnn", {"width": 4, "hidden": 16}, (3, 32, 32)),
    ("mlp", {"input_size": 8, "hidden": 16}, (1, 8, 8)),
    ("mlp", {"input_size": 28, "hidden": 16}, (1, 28, 28)),
    ("resnet18", {"width": 4}, (3, 32, 32)),
    ("preact-resnet18", {"width": 4}, (3, 32, 32)),
    ("wrn-16-2", {}, (3, 32, 32)),
    ("wrn-10-1", {"dropout": 0.3}, (3, 16, 16)),
]
IDS = [f"{name}-{shape[1]}px-c{shape[0]}" for name, _, shape in ARCHS]


def _build(name, kwargs, shape, num_classes=10, **extra):
    torch.manual_seed(0)
    return create_model(name, num_classes, in_channels=shape[0], **kwargs, **extra)


@pytest.mark.parametrize("num_classes", [10, 100, 3])
@pytest.mark.parametrize("name,kwargs,shape", ARCHS, ids=IDS)
def test_logits_shape_for_every_architecture(name, kwargs, shape, num_classes):
    model = _build(name, kwargs, shape, num_classes).eval()
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, num_classes)
    assert torch.isfinite(out).all()
    assert model.spec.num_classes == num_classes and model.spec.in_channels == shape[0]


@pytest.mark.parametrize("name,kwargs,shape", ARCHS, ids=IDS)
def test_stages_run_in_order_equal_forward(name, kwargs, shape):
    model = _build(name, kwargs, shape, mean=[0.4] * shape[0], std=[0.2] * shape[0]).eval()
    x = torch.rand(4, *shape)
    assert len(model.stage_names) >= 3
    out = (x - 0.4) / 0.2  # the built-in normalisation, by hand
    for stage in model.stage_names:
        module = getattr(model, stage)
        assert isinstance(module, torch.nn.Module)
        out = module(out)
    torch.testing.assert_close(out, model(x))


def test_stage_names_per_family():
    assert create_model("small-cnn", 10, 1).stage_names == ("stem", "stage1", "stage2", "head")
    assert create_model("resnet18", 10, width=4).stage_names == (
        "stem", "layer1", "layer2", "layer3", "layer4", "head")
    wrn = create_model("wrn-16-2", 10)
    assert wrn.stage_names == ("stem", "block1", "block2", "block3", "head")
    assert default_taps(wrn) == ("block1", "block2")
    assert default_taps(create_model("resnet18", 10, width=4)) == ("layer1", "layer2")


def test_forward_hook_taps_a_named_stage():
    model = create_model("wrn-16-2", 10).eval()
    seen = {}
    handle = model.block2.register_forward_hook(lambda m, i, o: seen.setdefault("block2", o))
    model(torch.rand(2, 3, 32, 32))
    handle.remove()
    assert seen["block2"].shape == (2, 64, 16, 16)  # 32 * widen_factor channels, stride 2


def test_large_wideresnets_are_expressible():
    with torch.device("meta"):
        wrn34 = create_model("wrn-34-10", 10)
        wrn70 = create_model("wrn-70-16", 100)
        n34 = sum(p.numel() for p in wrn34.parameters())
        n70 = sum(p.numel() for p in wrn70.parameters())
        feats = wrn70.block1(wrn70.stem(wrn70.normalize(torch.empty(2, 3, 32, 32))))
        feats2 = wrn70.block2(feats)
        logits = wrn70(torch.empty(2, 3, 32, 32))
    assert abs(n34 - 46.16e6) / 46.16e6 < 0.01  # WRN-34-10: 46.2M parameters
    assert abs(n70 - 266.9e6) / 266.9e6 < 0.01  # WRN-70-16: 267M parameters
    assert feats.shape == (2, 256, 32, 32) and feats2.shape == (2, 512, 16, 16)
    assert logits.shape == (2, 100)
    assert len(wrn34.block1) == 5 and len(wrn70.block1) == 11  # (depth - 4) / 6 blocks per stage
    assert sum(p.numel() for p in create_model("resnet18", 10).parameters()) == 11_173_962


def test_normalisation_lives_inside_the_model():
    model = create_model("small-cnn", 10, 3, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.125], width=4, hidden=8)
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), expected)
    assert model.spec.mean == [0.1, 0.2, 0.3] and model.spec.std == [0.5, 0.25, 0.125]
    # The statistics are buffers: they travel in the state dict.
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    # One value is broadcast over the channels; none means identity.
    single = create_model("small-cnn", 10, 3, mean=[0.5], std=[0.25], width=4, hidden=8)
    assert single.spec.mean == [0.5] * 3
    ident = create_model("mlp", 10, 1, input_size=8, hidden=8)
    torch.testing.assert_close(ident.normalize(x[:, :1]), x[:, :1])


def test_model_follows_dtype():
    model = create_model("small-cnn", 10, 1, mean=[0.3], std=[0.4], width=4, hidden=8).double().eval()
    out = model(torch.rand(3, 1, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_input_gradient_flows():
    model = create_model("preact-resnet18", 10, width=4).eval()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    model(x)[:, 3].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_model_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("vgg16", 10)
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wrn-35-10", 10)
    with pytest.raises(ConfigError, match="widen_factor"):
        create_model("wrn-16-0", 10)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("small-cnn", 1)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("small-cnn", 10.0)
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("small-cnn", 10, in_channels=0)
    with pytest.raises(ConfigError, match="channels"):
        create_model("small-cnn", 10, in_channels=3, mean=[0.1, 0.2])
    with pytest.raises(ConfigError, match="positive"):
        Normalize([0.0], [0.0])
    model = create_model("small-cnn", 10, 1, width=4, hidden=8)
    with pytest.raises(InputError, match="shape"):
        model(torch.rand(1, 8, 8))
    with pytest.raises(InputError, match="channels"):
        model(torch.rand(2, 3, 8, 8))
    assert "wrn-<depth>-<width>" in list_models() and "small-cnn" in list_models()
