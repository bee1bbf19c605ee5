"""The mixing network, feature taps (adasmooth.mixing.network) and the adaptive mixed classifier
(adasmooth.mixing.adaptive)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adasmooth.models.checkpoint import save_checkpoint
from adasmooth.mixing.adaptive import (
    AdaptiveMixedClassifier,
    build_adaptive_classifier,
    load_adaptive_classifier,
    save_adaptive_classifier,
)
from adasmooth.mixing.network import SMALL_WIDTHS, FeatureTaps, MixingNetConfig, MixingNetwork, ranged_alpha
from adasmooth.models.base import create_model, default_taps

# (registry name, kwargs, input shape, expected (first tap, second tap) shapes without the batch)
ARCHS = [
    ("small-cnn", dict(width=4, hidden=8), (1, 8, 8), ((4, 4, 4), (8, 4, 4))),
    ("small-cnn", dict(width=4, hidden=8), (1, 28, 28), ((4, 14, 14), (8, 4, 4))),
    ("mlp", dict(input_size=8, hidden=12), (1, 8, 8), ((12,), (12,))),
    ("resnet18", dict(width=4), (3, 16, 16), ((4, 16, 16), (8, 8, 8))),
    ("preact-resnet18", dict(width=4), (3, 16, 16), ((4, 16, 16), (8, 8, 8))),
    ("wrn-10-1", {}, (3, 16, 16), ((16, 16, 16), (32, 8, 8))),
]


def _pair(name, kw, shape, num_classes=10, seed=0):
    torch.manual_seed(seed)
    g = create_model(name, num_classes, in_channels=shape[0], **kw).eval()
    h = create_model(name, num_classes, in_channels=shape[0], **kw).eval()
    return g, h


def _tiny(shape=(1, 8, 8), **kw):
    g, h = _pair("small-cnn", dict(width=4, hidden=8), shape)
    torch.manual_seed(1)
    return build_adaptive_classifier(g, h, shape, widths=(8, 8, 8), blocks=(1, 1, 1), **kw)


@pytest.mark.parametrize("name,kw,shape,expected", ARCHS, ids=[f"{a[0]}-{a[2][1]}" for a in ARCHS])
def test_taps_shapes_and_base_outputs_unchanged(name, kw, shape, expected):
    g, _ = _pair(name, kw, shape)
    x = torch.rand(3, *shape)
    before = g(x)
    taps = default_taps(g)
    with FeatureTaps(g, taps) as t:
        during = g(x)
    feats = t.features()
    assert [tuple(f.shape[1:]) for f in feats] == [tuple(e) for e in expected]
    assert torch.equal(before, during)
    assert all(not m._forward_hooks for m in g.modules())  # hooks removed on exit
    assert torch.equal(g(x), before)


@pytest.mark.parametrize("name,kw,shape,expected", ARCHS, ids=[f"{a[0]}-{a[2][1]}" for a in ARCHS])
def test_classifier_works_for_every_architecture(name, kw, shape, expected):
    g, h = _pair(name, kw, shape)
    x = torch.rand(4, *shape)
    g_out, h_out = g(x), h(x)
    model = build_adaptive_classifier(g, h, shape, widths=SMALL_WIDTHS, blocks=(1, 1, 1)).eval()
    # concatenated channels of g's and h's taps ((N, D) features count as D channels)
    assert model.mixing_net.config.first_channels == 2 * expected[0][0]
    assert model.mixing_net.config.second_channels == 2 * expected[1][0]
    out = model.mix(x)
    assert out.logits.shape == (4, 10) and out.alpha.shape == (4,)
    # Eq. 3.4 by hand with the per-sample alpha
    a = out.alpha[:, None]
    ref = torch.log((1 - a) * F.softmax(g_out, 1) + a * F.softmax(h_out, 1))
    assert torch.allclose(out.logits, ref, atol=1e-5)
    assert torch.equal(g(x), g_out) and torch.equal(h(x), h_out)


def test_taps_of_different_spatial_size_and_architecture():
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=3, width=4, hidden=8)
    h = create_model("resnet18", 10, in_channels=3, width=4)
    model = build_adaptive_classifier(g, h, (3, 16, 16), widths=(8, 8, 8), blocks=(1, 1, 1)).eval()
    assert model.std_taps == ("stage1", "stage2") and model.rob_taps == ("layer1", "layer2")
    assert model.mix(torch.rand(2, 3, 16, 16)).alpha.shape == (2,)


def test_dotted_tap_names_and_clear_error_for_unknown_tap():
    g, h = _pair("small-cnn", dict(width=4, hidden=8), (1, 8, 8))
    model = build_adaptive_classifier(g, h, (1, 8, 8), widths=(8, 8, 8), blocks=(1, 1, 1), taps=("stage1.0", "stage2.2"))
    assert model.mix(torch.rand(2, 1, 8, 8)).alpha.shape == (2,)
    with pytest.raises(ValueError, match="layer7"):
        build_adaptive_classifier(g, h, (1, 8, 8), taps=("stage1", "layer7"))
    with pytest.raises(ValueError, match="two"):
        build_adaptive_classifier(g, h, (1, 8, 8), taps=("stage1", "stage2", "head"))


def test_clear_error_for_base_models_with_different_class_counts():
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8)
    h = create_model("small-cnn", 7, in_channels=1, width=4, hidden=8)
    net = MixingNetwork(MixingNetConfig(8, 16, [8, 8, 8], [1, 1, 1]))
    with pytest.raises(ValueError, match="class count"):
        AdaptiveMixedClassifier(g, h, net)


def test_alpha_stays_in_its_range_and_alpha_logit_is_its_logit():
    model = _tiny().eval()
    x = torch.rand(16, 1, 8, 8)
    for lo, hi, shift in [(0.0, 1.0, 0.4), (0.3, 0.5, 0.0), (0.3, 0.5, 50.0), (0.3, 0.5, -50.0), (0.9, 1.0, 3.0)]:
        model.mixing_net.set_eval_head(shift=shift, alpha_range=(lo, hi))
        out = model.mix(x)
        assert bool(((out.alpha >= lo) & (out.alpha <= hi)).all())
        ref = torch.logit(out.alpha.double()).float()
        finite = torch.isfinite(ref)
        assert torch.allclose(out.alpha_logit[finite], ref[finite], rtol=1e-4, atol=1e-4)
    model.train()
    out = model.mix(x)  # training ignores the evaluation range
    assert bool(((out.alpha > 0) & (out.alpha < 1)).all())
    with pytest.raises(ValueError, match="alpha range"):
        model.mixing_net.set_eval_head(alpha_range=(0.6, 0.5))


def test_ranged_alpha_matches_the_formula():
    u = torch.linspace(-8, 8, 33, dtype=torch.float64)
    alpha, logit = ranged_alpha(u, 0.2, 0.9)
    expected = torch.sigmoid(u) * 0.7 + 0.2
    assert torch.allclose(alpha, expected)
    assert torch.allclose(logit, torch.log(expected / (1 - expected)))


def test_train_mode_head_clamps_gamma_and_normalises_by_the_batch():
    net = MixingNetwork(MixingNetConfig(2, 2, [4, 4, 4], [1, 1, 1])).train()
    gamma = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0], requires_grad=True)
    z = net.normalized_gamma(gamma)
    alpha, logit = net.head(z)
    # by hand: mean 3.2, unbiased std sqrt(62.8 / 4) = 3.9623; bounds 3.2 -+ 0.6 * 3.9623 = 0.8226, 5.5774;
    # the clamp comes first, then the BN normalises the clamped values with their own batch statistics
    clamped = torch.tensor([0.82262, 1.0, 2.0, 3.0, 5.57738])
    bn = (clamped - clamped.mean()) / torch.sqrt(clamped.var(unbiased=False) + 1e-5)
    assert torch.allclose(logit, 2 * bn + 0.4, atol=1e-5)
    assert torch.allclose(alpha, torch.sigmoid(2 * bn + 0.4), atol=1e-6)
    # the two samples beyond 0.6 std of the batch (0 and 10) sit on the clamp bounds: no gradient reaches them
    (logit * torch.arange(5.0) ** 2).sum().backward()  # a plain sum of BN outputs has no gradient
    assert gamma.grad[0] == 0 and gamma.grad[4] == 0 and bool((gamma.grad[1:4] != 0).all())
    # the running statistics are those of the clamped gamma
    # momentum 0.01 from a zero start
    assert torch.allclose(net.alpha_bn.running_mean, torch.tensor([0.01 * clamped.mean()]), atol=1e-4)


def test_detach_switch_stops_gradients_through_alpha():
    model = _tiny().eval()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = model.mix(x)
    (grad,) = torch.autograd.grad(out.alpha.sum(), x)
    assert grad.abs().sum() > 0
    out = model.mix(x, detach_alpha=True)
    assert not out.alpha.requires_grad and not out.alpha_logit.requires_grad
    # the logits still carry the gradient of g and h, with alpha held constant
    a = out.alpha.detach()[:, None]
    ref = torch.log((1 - a) * F.softmax(model.std_model(x), 1) + a * F.softmax(model.rob_model(x), 1))
    g1 = torch.autograd.grad(out.logits[:, 0].sum(), x)[0]
    g2 = torch.autograd.grad(ref[:, 0].sum(), x)[0]
    assert torch.allclose(g1, g2, atol=1e-6)
    gray = AdaptiveMixedClassifier(model.std_model, model.rob_model, model.mixing_net, detach_features=True).eval()
    alpha = gray.mix(x).alpha
    (grad,) = torch.autograd.grad(alpha.sum(), x, allow_unused=True)
    assert grad is None or grad.abs().sum() == 0


def test_base_models_run_once_frozen_and_in_eval_mode():
    model = _tiny()
    seen = []  # (model, training, any parameter requiring grad) as each base model runs

    def record(module, _inputs, _output):
        seen.append((module, module.training, any(p.requires_grad for p in module.parameters())))

    handles = [m.register_forward_hook(record) for m in (model.std_model, model.rob_model)]
    model.train()
    model.mix(torch.rand(4, 1, 8, 8))
    for handle in handles:
        handle.remove()
    # one pass of each, in eval mode, with no parameter gradients
    assert seen == [(model.std_model, False, False), (model.rob_model, False, False)]
    assert model.mixing_net.training
    assert all(p.requires_grad for p in model.mixing_net.parameters())


def test_checkpoint_round_trip_reproduces_alpha_exactly(tmp_path):
    model = _tiny(std_scale=1.5, rob_scale=0.5)
    save_checkpoint(model.std_model, tmp_path / "g")
    save_checkpoint(model.rob_model, tmp_path / "h")
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the BN statistics away from their initial values
            model.mix(torch.rand(8, 1, 8, 8))
    model.eval()
    model.mixing_net.set_eval_head(scale=1.5, shift=0.7, alpha_range=(0.2, 0.95))
    x = torch.rand(6, 1, 8, 8)
    ref = model.mix(x)
    save_adaptive_classifier(model, tmp_path / "mix", {"std_checkpoint": tmp_path / "g",
                                                       "rob_checkpoint": tmp_path / "h", "note": "test"})
    loaded, info = load_adaptive_classifier(tmp_path / "mix")
    out = loaded.mix(x)
    assert torch.equal(out.alpha, ref.alpha)
    assert torch.equal(out.logits, ref.logits)
    assert info["note"] == "test" and info["eval_head"]["shift"] == pytest.approx(0.7)
    assert loaded.std_scale == 1.5 and loaded.rob_scale == 0.5
    with pytest.raises(FileNotFoundError):
        load_adaptive_classifier(tmp_path / "missing")


def test_mixing_net_config_validation():
    with pytest.raises(ValueError, match="widths"):
        MixingNetwork(MixingNetConfig(4, 4, [8, 8], [1, 1, 1]))
    with pytest.raises(ValueError, match="bn_momentum"):
        MixingNetwork(MixingNetConfig(4, 4, bn_momentum=0.0))
    assert math.isclose(MixingNetConfig(4, 4).train_scale, 2.0)


def test_features_from_one_base_model_only(tmp_path):
    from adasmooth.mixing.adaptive import build_adaptive_classifier, load_adaptive_classifier, save_adaptive_classifier
    from adasmooth.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8)
    h = create_model("small-cnn", 10, in_channels=1, width=6, hidden=8)
    both = build_adaptive_classifier(g, h, (1, 8, 8), widths=(4, 4, 4), blocks=(1, 1, 1))
    rob = build_adaptive_classifier(g, h, (1, 8, 8), widths=(4, 4, 4), blocks=(1, 1, 1), features="rob")
    # h's taps alone: its channels, not g's plus h's
    assert rob.mixing_net.config.first_channels + 4 == both.mixing_net.config.first_channels
    x = torch.rand(3, 1, 8, 8)
    _, _, first, second = rob.base_outputs(x)
    with FeatureTaps(h, rob.rob_taps) as taps:
        h(x)
    assert torch.equal(first, taps.features()[0])
    # what g's input does to alpha goes only through the mixture, not through alpha
    rob.eval()
    x.requires_grad_(True)
    out = rob.mix(x)
    (grad,) = torch.autograd.grad(out.alpha.sum(), x)
    assert grad.abs().sum() > 0
    save_checkpoint(g, tmp_path / "g", {"dataset": "digits"})
    save_checkpoint(h, tmp_path / "h", {"dataset": "digits"})
    rob.std_checkpoint, rob.rob_checkpoint = str(tmp_path / "g"), str(tmp_path / "h")
    save_adaptive_classifier(rob, tmp_path / "m")
    loaded, info = load_adaptive_classifier(tmp_path / "m")
    assert loaded.features == "rob" and info["features"] == "rob"
    with torch.no_grad():
        torch.testing.assert_close(loaded.mix(x.detach()).alpha, rob.mix(x.detach()).alpha)
    from adasmooth.core.errors import InputError

    with pytest.raises(InputError, match="features"):
        build_adaptive_classifier(g, h, (1, 8, 8), widths=(4, 4, 4), blocks=(1, 1, 1), features="no-such-source")
