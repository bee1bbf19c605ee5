"""Our APGD against the reference (pyautoattack) and the AutoAttack wrapper's seed, log and flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adasmooth.attacks import APGD, APGDTargeted, AutoAttackAttack, run_autoattack

from digits_models import robust_count

pyautoattack = pytest.importorskip("pyautoattack")

EPS = 0.1


def reference(model, x, y, attack: str, seed: int, n_targets: int = 9):
    adversary = pyautoattack.AutoAttack(model, attacks=[attack], version="custom", eps=EPS, norm="Linf", seed=seed)
    adversary.apgd.n_restarts = 1  # the custom version defaults to 5; the standard version uses 1
    adversary.apgd_targeted.n_target_classes = n_targets
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    return x_adv


@pytest.mark.parametrize("seed", [0, 1])
def test_apgd_ce_agrees_with_pyautoattack(robust_model, test_data, seed):
    # 360 test inputs: 0.5 points is 1.8 inputs, so at most one input may differ. Both draw the
    # same random starts (one seeded generator over the same shapes), so agreement is expected to be
    # near-exact; the slack of one input covers floating-point divergence of a trajectory.
    x, y = test_data
    ours = robust_count(robust_model, APGD(robust_model, EPS, seed=seed)(x, y), y)
    ref = robust_count(robust_model, reference(robust_model, x, y, "apgd-ce", seed), y)
    clean = robust_count(robust_model, x, y)
    assert ref < clean - 20  # the attack has work to do on this model
    assert abs(ours - ref) / len(y) * 100 <= 0.5, (ours, ref)


def test_apgd_t_agrees_with_pyautoattack(robust_model, test_data):
    # three target classes instead of nine keep the test fast; the benchmark runs all nine
    x, y = test_data
    ours = robust_count(robust_model, APGDTargeted(robust_model, EPS, n_target_classes=3, seed=0)(x, y), y)
    ref = robust_count(robust_model, reference(robust_model, x, y, "apgd-t", 0, n_targets=3), y)
    assert ref < robust_count(robust_model, x, y) - 20
    assert abs(ours - ref) / len(y) * 100 <= 0.5, (ours, ref)


class Quantized(nn.Module):
    """Input quantisation: zero gradient almost everywhere, a classic case of gradient masking."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 16) / 16)


def test_square_flag_fires_on_gradient_masking(robust_model, test_data):
    x, y = test_data[0][:60], test_data[1][:60]
    result = run_autoattack(Quantized(robust_model), x, y, EPS, version="custom", attacks=["apgd-ce", "square"],
                            seed=0, batch_size=60, square_queries=200, apgd_restarts=1)
    acc = result.robust_accuracy
    assert acc["apgd-ce"] - acc["square"] >= 0.2  # the gradient attack was fooled, the black-box one was not
    assert result.unreliable
    assert any("Square" in f for f in result.flags)
    assert float(result.robust.float().mean() * 100) == pytest.approx(acc["square"], abs=0.01)  # the log rounds to 0.01 %


def test_autoattack_attack_run_reports_flags_and_broken_inputs(robust_model, test_data):
    x, y = test_data[0][:60], test_data[1][:60]
    attack = AutoAttackAttack(Quantized(robust_model), EPS, version="custom", attacks=["apgd-ce", "square"], seed=0,
                              batch_size=60, square_queries=200, apgd_restarts=1)
    result = attack.run(x, y)
    assert any("Square" in f for f in result.flags)  # the gradient masking of Quantized is reported
    with torch.no_grad():
        clean_ok = attack.model(x).argmax(1) == y
        adv_pred = attack.model(result.x_adv).argmax(1)
    assert torch.equal(result.predicted, adv_pred) and torch.equal(result.fooled, adv_pred != y)
    broken = clean_ok & result.fooled
    assert broken.any()
    expected = ["clean" if not ok else ("autoattack-custom" if b else None)
                for ok, b in zip(clean_ok.tolist(), broken.tolist())]
    assert result.broken_by == expected


def test_no_square_flag_seed_logged(robust_model, test_data):
    x, y = test_data[0][:40], test_data[1][:40]
    result = run_autoattack(robust_model, x, y, EPS, version="custom", attacks=["apgd-ce", "square"], seed=7,
                            batch_size=40, square_queries=100, apgd_restarts=1)
    assert not result.unreliable
    assert result.seed == 7 and "seed=7" in result.log
    assert "robust accuracy after APGD-CE" in result.log
    # outcomes agree with the model on the returned points
    with torch.no_grad():
        correct = robust_model(result.x_adv).argmax(1) == y
    assert torch.equal(result.robust, correct & result.clean_correct)
    assert ((result.x_adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6).all()


def test_run_autoattack_errors(robust_model, test_data):
    x, y = test_data[0][:4], test_data[1][:4]
    with pytest.raises(ValueError, match="seed"):
        run_autoattack(robust_model, x, y, EPS, seed=None)
    with pytest.raises(ValueError, match="eps"):
        run_autoattack(robust_model, x, y, -0.1)
    with pytest.raises(ValueError, match="version"):
        run_autoattack(robust_model, x, y, EPS, version="fast")
    with pytest.raises(ValueError, match="unknown AutoAttack attack"):
        run_autoattack(robust_model, x, y, EPS, version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match="probabilities"):
        run_autoattack(nn.Sequential(robust_model, nn.Softmax(dim=1)), x, y, EPS)
