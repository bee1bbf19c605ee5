"""Nonlinear + adaptive: the mixing network trained on top of the MixedNUTS map; PGD momentum; extra clean inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adasmooth.attacks import PGD
from adasmooth.attacks.base import project
from adasmooth.core.errors import ConfigError, InputError
from adasmooth.data.base import DATASET_STATS, load_dataset
from adasmooth.mixing.adaptive import load_adaptive_classifier
from adasmooth.mixing.nonlinear import NonlinearParams, nonlinear_mix_log_probs
from adasmooth.models.base import create_model
from adasmooth.models.checkpoint import save_checkpoint
from adasmooth.train.mixnet import MixnetTrainConfig, craft_training_attack, train_mixnet


def _model(seed):
    torch.manual_seed(seed)
    mean, std = DATASET_STATS["digits"]
    return create_model("small-cnn", 10, in_channels=1, mean=mean, std=std, width=4, hidden=16).eval()


def test_pgd_momentum_zero_is_plain_sign_gradient_and_momentum_changes_the_path():
    model = _model(0)
    data = load_dataset("digits", "test").subset(16)
    x, y = data.x, data.y
    # plain PGD by hand: zero start, sign of the CE gradient, projection, clipping
    delta = torch.zeros_like(x)
    for _ in range(3):
        delta.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = project(delta + 0.05 * grad.sign(), torch.full((16, 1, 1, 1), 0.1), "linf")
            delta = (x + delta).clamp(0, 1) - x
    plain = PGD(model, 0.1, steps=3, step_size=0.05, random_start=False, momentum=0.0)(x, y)
    torch.testing.assert_close(plain, x + delta)
    heavy = PGD(model, 0.1, steps=3, step_size=0.05, random_start=False, momentum=0.9)(x, y)
    assert not torch.equal(heavy, plain) and (heavy - x).abs().max() <= 0.1 + 1e-6
    per_sample = PGD(model, 0.1, steps=3, step_size=0.05, random_start=False, momentum=torch.full((16,), 0.9))(x, y)
    torch.testing.assert_close(per_sample, heavy)
    with pytest.raises(InputError):
        PGD(model, 0.1, momentum=1.0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    save_checkpoint(_model(0), root / "g", {"dataset": "digits"})
    save_checkpoint(_model(1), root / "h", {"dataset": "digits"})
    return root


def test_nonlinear_adaptive_training_writes_a_nonlinear_classifier(pair, tmp_path):
    params = NonlinearParams(s=2.0, c=-0.5, p=2.0)
    cfg = MixnetTrainConfig(std=str(pair / "g"), rob=str(pair / "h"), dataset="digits", widths=[4, 4, 4],
                            blocks=[1, 1, 1], setting="B", eps=0.2, attack_steps=2, batch_size=16, n_train=32,
                            epochs=1, eval_examples=8, eval_pgd_steps=1, progress=False, device="cpu",
                            rule="nonlinear", nonlinear=params, extra_clean=2, output=str(tmp_path / "nl"),
                            recipe="cheap")
    meta = train_mixnet(cfg)
    model, info = load_adaptive_classifier(tmp_path / "nl")
    assert model.nonlinear == params and info["training"]["config"]["extra_clean"] == 2
    x = load_dataset("digits", "test").subset(8).x
    with torch.no_grad():
        out = model.mix(x)
        torch.testing.assert_close(out.logits, nonlinear_mix_log_probs(model.std_model(x), model.rob_model(x),
                                                                       out.alpha, params))
    assert np.isfinite(meta["training"]["history"][0]["train_loss"])


def test_training_attack_on_a_nonlinear_mixture_moves_the_inputs(pair, tmp_path):
    # the true mixture gives g no gradient; the attack crafts on the surrogate and still moves the inputs
    from adasmooth.train.mixnet import build_from_config

    cfg = MixnetTrainConfig(std=str(pair / "g"), rob=str(pair / "h"), dataset="digits", widths=[4, 4, 4],
                            blocks=[1, 1, 1], setting="B", eps=0.2, attack_steps=3, rule="nonlinear",
                            nonlinear=NonlinearParams(s=1.0, c=0.0, p=3.0), norm="linf")
    model = build_from_config(cfg, (1, 8, 8), torch.device("cpu"))
    x = load_dataset("digits", "test").subset(8)
    x_adv = craft_training_attack(model, x.x, x.y, cfg, np.random.default_rng(0))
    assert (x_adv - x.x).abs().amax() > 0.01
    assert (x_adv - x.x).abs().amax() <= 0.2 * 1.1 + 1e-6


def test_config_checks_the_new_options():
    base = dict(std="g", rob="h", eps=0.1)
    for bad in (dict(momentum_max=1.0), dict(extra_clean=-1), dict(nonlinear=NonlinearParams(p=0.0))):
        with pytest.raises(ConfigError):
            MixnetTrainConfig(**base, **bad).validate()
