"""The MixedNUTS map and rule against hand-computed values; its checkpoint round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adasmooth.core.errors import CheckpointError, ConfigError, InputError
from adasmooth.mixing import MIXING_RULES, MixedClassifier
from adasmooth.mixing.adaptive import build_adaptive_classifier, load_adaptive_classifier, save_adaptive_classifier
from adasmooth.mixing.fixed import load_fixed_mixture, save_fixed_mixture
from adasmooth.mixing.nonlinear import (
    NonlinearParams,
    TransformedModel,
    nonlinear_map,
    nonlinear_mix_log_probs,
    nonlinear_params_of,
    nonlinear_rule,
    normalize_top_k,
)
from adasmooth.models.base import create_model
from adasmooth.models.checkpoint import save_checkpoint

ROW = [0.0, 1.0, 2.0, 3.0]  # mean 1.5, unbiased variance 5/3
Z = [(v - 1.5) / math.sqrt(5 / 3 + 1e-8) for v in ROW]


def test_normalize_top_k_by_hand():
    out = normalize_top_k(torch.tensor([ROW]), k=250)
    assert out.tolist()[0] == pytest.approx(Z, abs=1e-6)
    # top-2 of [0, 1, 2, 3]: mean 2.5, unbiased variance 0.5
    out2 = normalize_top_k(torch.tensor([ROW]), k=2)
    assert out2.tolist()[0] == pytest.approx([(v - 2.5) / math.sqrt(0.5 + 1e-8) for v in ROW], abs=1e-6)


def test_map_relu_power_scale_by_hand():
    # relu(z) = [0, 0, sqrt(0.15), sqrt(1.35)]; squared: [0, 0, 0.15, 1.35]; times 3
    out = nonlinear_map(torch.tensor([ROW]), s=3.0, c=0.0, p=2.0, activation="relu")
    assert out.dtype == torch.float64  # the map runs wide (see the module's note on precision)
    assert out.tolist()[0] == pytest.approx([0.0, 0.0, 0.45, 4.05], abs=1e-6)


def test_map_gelu_and_sign_preserving_power_by_hand():
    def gelu(a):
        return a * 0.5 * (1 + math.erf(a / math.sqrt(2)))

    expected = [1.7 * math.copysign(abs(gelu(z - 0.5)) ** 3, gelu(z - 0.5)) for z in Z]
    out = nonlinear_map(torch.tensor([ROW]), s=1.7, c=-0.5, p=3.0, activation="gelu")
    assert out.tolist()[0] == pytest.approx(expected, rel=1e-6)
    assert out[0, 0] < 0  # GELU of a negative number is negative; the power keeps the sign
    elu = [math.exp(z + 0.2) - 1 if z + 0.2 < 0 else z + 0.2 for z in Z]
    out = nonlinear_map(torch.tensor([ROW]), s=0.5, c=0.2, p=0.5, activation="elu")
    assert out.tolist()[0] == pytest.approx([0.5 * math.copysign(abs(a) ** 0.5, a) for a in elu], rel=1e-6)


def test_map_gradient_is_finite_at_relu_zeros_with_p_below_one():
    z = torch.tensor([ROW], requires_grad=True)
    nonlinear_map(z, 1.0, 0.0, 0.5, activation="relu").sum().backward()
    assert torch.isfinite(z.grad).all()


def test_hardmax_mixture_matches_hand_built_probabilities():
    rng = np.random.default_rng(0)
    g, h = rng.normal(size=(64, 10)) * 3, rng.normal(size=(64, 10)) * 3
    alpha, s, c, p = 0.9, 2.0, -0.3, 2.5
    # by hand in numpy: normalise, GELU, signed power, scale, softmax; one-hot of g's argmax
    z = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, ddof=1, keepdims=True) + 1e-8) + c
    a = z * 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    mapped = s * np.sign(a) * np.abs(a) ** p
    p_h = np.exp(mapped - mapped.max(1, keepdims=True))
    p_h /= p_h.sum(1, keepdims=True)
    probs = (1 - alpha) * np.eye(10)[g.argmax(1)] + alpha * p_h
    out = nonlinear_mix_log_probs(torch.tensor(g, dtype=torch.float32), torch.tensor(h, dtype=torch.float32),
                                  alpha, NonlinearParams(s=s, c=c, p=p))
    assert out.dtype == torch.float32
    assert (out.argmax(1).numpy() == probs.argmax(1)).all()
    np.testing.assert_allclose(out.exp().numpy(), probs, atol=1e-5)
    # g can flip h's decision only where h's top-two margin is below (1 - alpha) / alpha
    flipped = probs.argmax(1) != p_h.argmax(1)
    top2 = np.sort(p_h, 1)[:, -2:]
    assert (top2[flipped, 1] - top2[flipped, 0] < (1 - alpha) / alpha).all()
    assert flipped.any()


def test_rule_is_registered_and_carries_its_parameters():
    assert "nonlinear" in MIXING_RULES
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    h = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    params = NonlinearParams(s=2.0, c=-0.5, p=2.0, top_k=5)
    model = MixedClassifier(g, h, 0.95, rule=nonlinear_rule(params))
    assert model.rule == "nonlinear" and nonlinear_params_of(model) == params
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        expected = nonlinear_mix_log_probs(g(x), h(x), 0.95, params)
        torch.testing.assert_close(model(x), expected)
        # alpha = 1 is h's transformed softmax alone: same ranking as h
        model.alpha = 1.0
        assert torch.equal(model(x).argmax(1), h(x).argmax(1))
    assert nonlinear_params_of(MixedClassifier(g, h, 0.5)) is None


def test_bad_parameters_are_config_errors():
    for bad in (dict(s=0.0), dict(p=-1.0), dict(c=math.nan), dict(top_k=1), dict(activation="tanh")):
        with pytest.raises(ConfigError):
            nonlinear_rule(NonlinearParams(**bad))
    with pytest.raises(InputError):
        normalize_top_k(torch.zeros(3))


def test_transformed_model_keeps_the_ranking():
    torch.manual_seed(0)
    h = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    t = TransformedModel(h, NonlinearParams(s=3.0, c=-1.0, p=3.0))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(t(x).argmax(1), h(x).argmax(1))
    assert t.attack_source is h


def _saved_pair(tmp_path):
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    h = create_model("small-cnn", 10, in_channels=1, width=4, hidden=8).eval()
    save_checkpoint(g, tmp_path / "g", {"dataset": "digits"})
    save_checkpoint(h, tmp_path / "h", {"dataset": "digits"})
    return g, h


def test_fixed_nonlinear_mixture_round_trips(tmp_path):
    g, h = _saved_pair(tmp_path)
    params = NonlinearParams(s=0.7, c=-1.2, p=3.5, activation="softplus")
    model = MixedClassifier(g, h, 0.987, rule=nonlinear_rule(params))
    path = save_fixed_mixture(model, tmp_path / "mix", {"std_checkpoint": tmp_path / "g",
                                                        "rob_checkpoint": tmp_path / "h", "beta": 98.5})
    assert json.loads(path.read_text())["std_checkpoint"] == "g"  # relative to the file
    loaded, info = load_fixed_mixture(tmp_path / "mix")
    assert nonlinear_params_of(loaded) == params and loaded.alpha == pytest.approx(0.987) and info["beta"] == 98.5
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    (tmp_path / "h.safetensors").unlink()
    with pytest.raises(CheckpointError, match="h"):
        load_fixed_mixture(tmp_path / "mix")


def test_adaptive_nonlinear_classifier_round_trips(tmp_path):
    g, h = _saved_pair(tmp_path)
    torch.manual_seed(1)
    model = build_adaptive_classifier(g, h, (1, 8, 8), widths=(8, 8, 8), blocks=(1, 1, 1)).eval()
    params = NonlinearParams(s=2.0, c=-0.4, p=2.0)
    model.nonlinear = params
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        out = model.mix(x)
        torch.testing.assert_close(out.logits, nonlinear_mix_log_probs(g(x), h(x), out.alpha, params))
    save_adaptive_classifier(model, tmp_path / "ada", {"std_checkpoint": tmp_path / "g", "rob_checkpoint": tmp_path / "h"})
    loaded, info = load_adaptive_classifier(tmp_path / "ada")
    assert loaded.nonlinear == params and info["nonlinear"] == params.as_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    model.nonlinear = None  # a plain adaptive classifier stays plain through the file
    save_adaptive_classifier(model, tmp_path / "plain", {"std_checkpoint": tmp_path / "g", "rob_checkpoint": tmp_path / "h"})
    assert load_adaptive_classifier(tmp_path / "plain")[0].nonlinear is None
