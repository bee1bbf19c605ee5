"""PGD: threat-model geometry, strength against a standard model on digits, determinism, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adasmooth.attacks import PGD, check_logits, dlr_from_logits, margin_from_logits, project
from adasmooth.attacks.base import normalized_step, per_sample, random_init
from adasmooth.mixing.fixed import MixedClassifier

from conftest import train_small_cnn


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _fooled(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != y


@pytest.fixture(scope="module")
def test_batch(digits_test):
    return digits_test.x, digits_test.y


@pytest.fixture(scope="module")
def other_model(digits_train):
    """A second standard model (other seed, other width) for transfer attacks."""
    return train_small_cnn(digits_train, seed=1, width=8)


# ------------------------------------------------------------------ geometry


def test_project_by_hand():
    eps = torch.tensor([0.5, 1.0]).view(2, 1)
    delta = torch.tensor([[0.7, -0.9], [0.2, -0.3]])
    torch.testing.assert_close(project(delta, eps, "linf"), torch.tensor([[0.5, -0.5], [0.2, -0.3]]))
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    torch.testing.assert_close(project(delta, eps, "l2"), torch.tensor([[0.3, 0.4], [0.3, 0.4]]))
    step = normalized_step(torch.tensor([[3.0, -4.0]]), "l2")
    torch.testing.assert_close(step, torch.tensor([[0.6, -0.8]]))
    assert torch.equal(normalized_step(torch.tensor([[3.0, -4.0, 0.0]]), "linf"), torch.tensor([[1.0, -1.0, 0.0]]))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_init_inside_ball_and_box(norm):
    x = torch.rand(64, 1, 8, 8)
    x[:8] = 0.0  # corner cases: clipping to the box
    eps = per_sample(torch.linspace(0, 2.0 if norm == "l2" else 0.5, 64), x)
    gen = torch.Generator().manual_seed(0)
    delta = random_init(x, eps, norm, gen)
    size = delta.flatten(1).abs().amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert (size <= eps.flatten() + 1e-6).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    assert size[-1] > 0


@pytest.mark.parametrize("norm,eps_max", [("linf", 0.3), ("l2", 2.0)])
def test_pgd_stays_in_ball_and_box_with_per_sample_eps(std_digits_model, test_batch, norm, eps_max):
    x, y = test_batch[0][:48], test_batch[1][:48]
    eps = torch.linspace(0, eps_max, 48)
    x_adv = PGD(std_digits_model, eps, norm, steps=10, seed=0)(x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    assert torch.equal(x_adv[0], x[0])  # eps = 0 for the first sample
    # Larger budgets are used: most of the largest-eps samples move a lot.
    assert (size[-10:] > 0.5 * eps[-10:]).float().mean() > 0.8


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_x(std_digits_model, test_batch, norm):
    x, y = test_batch[0][:16], test_batch[1][:16]
    assert torch.equal(PGD(std_digits_model, 0.0, norm, steps=3, seed=0)(x, y), x)


# ------------------------------------------------------------------ strength


@pytest.mark.parametrize("norm,eps,loss", [("linf", 0.2, "ce"), ("l2", 1.0, "ce"), ("linf", 0.2, "margin"),
                                           ("linf", 0.2, "dlr")])
def test_pgd_breaks_a_standard_model(std_digits_model, test_batch, norm, eps, loss):
    x, y = test_batch
    clean = _accuracy(std_digits_model, x, y)
    attacked = _accuracy(std_digits_model, PGD(std_digits_model, eps, norm, steps=20, loss=loss, seed=0)(x, y), y)
    assert clean > 0.9
    assert attacked < 0.15, f"{norm} eps={eps} {loss}: accuracy only fell from {clean:.3f} to {attacked:.3f}"


def test_random_noise_of_same_size_hurts_far_less(std_digits_model, test_batch):
    # PGD must beat random perturbations of the same l_inf size by a wide margin (it follows gradients).
    x, y = test_batch
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.2 * (2 * torch.randint(0, 2, x.shape, generator=gen).float() - 1)).clamp(0, 1)
    attacked = PGD(std_digits_model, 0.2, "linf", steps=20, seed=0)(x, y)
    assert _accuracy(std_digits_model, noisy, y) - _accuracy(std_digits_model, attacked, y) > 0.4


def test_more_restarts_never_weaker(std_digits_model, test_batch):
    x, y = test_batch
    one = PGD(std_digits_model, 0.05, "linf", steps=5, restarts=1, seed=3)(x, y)
    four = PGD(std_digits_model, 0.05, "linf", steps=5, restarts=4, seed=3)(x, y)
    fooled_one, fooled_four = _fooled(std_digits_model, one, y), _fooled(std_digits_model, four, y)
    # The first restart is the single run (same seed): every example it fools stays fooled.
    assert not (fooled_one & ~fooled_four).any()
    assert fooled_four.sum() >= fooled_one.sum()
    # Where both fail, the kept example has at least the single run's loss.
    both_fail = ~fooled_one & ~fooled_four
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        l1 = ce(std_digits_model(one), y, reduction="none")[both_fail]
        l4 = ce(std_digits_model(four), y, reduction="none")[both_fail]
    assert (l4 >= l1 - 1e-5).all()


def test_more_steps_stronger(std_digits_model, test_batch):
    x, y = test_batch
    acc_1 = _accuracy(std_digits_model, PGD(std_digits_model, 0.5, "l2", steps=1, seed=0)(x, y), y)
    acc_20 = _accuracy(std_digits_model, PGD(std_digits_model, 0.5, "l2", steps=20, seed=0)(x, y), y)
    assert acc_20 < acc_1 - 0.05


def test_transfer_is_explicit(std_digits_model, other_model, test_batch):
    x, y = test_batch
    x_adv_a = PGD(std_digits_model, 0.2, "linf", steps=20, seed=0)(x, y)
    x_adv_b = PGD(other_model, 0.2, "linf", steps=20, seed=0)(x, y)
    white_box_b = _accuracy(other_model, x_adv_b, y)
    transfer_a_to_b = _accuracy(other_model, x_adv_a, y)
    # Crafted on A, evaluated on B: weaker against B than B's own white-box attack, still harmful.
    assert white_box_b < transfer_a_to_b < _accuracy(other_model, x, y)
    assert _accuracy(std_digits_model, x_adv_a, y) < transfer_a_to_b


def test_attack_on_mixed_classifier_with_custom_loss(std_digits_model, other_model, test_batch):
    x, y = test_batch[0][:64], test_batch[1][:64]
    mixed = MixedClassifier(std_digits_model, other_model, 0.5)

    def mixed_margin(model, x_in, y_in):  # a loss that reaches the MixOutput, as adaptive attacks do
        return margin_from_logits(model.mix(x_in).logits, y_in)

    x_adv = PGD(mixed, 0.2, "linf", steps=20, loss=mixed_margin, seed=0)(x, y)
    assert _accuracy(mixed, x_adv, y) < 0.5 * _accuracy(mixed, x, y)


# ------------------------------------------------------------------ side effects and determinism


def test_mode_and_gradients_untouched(std_digits_model, test_batch):
    x, y = test_batch[0][:32], test_batch[1][:32]
    model = copy.deepcopy(std_digits_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for training in (True, False):
        model.train(training)
        PGD(model, 0.1, "linf", steps=3, restarts=2, seed=0)(x, y)
        assert all(m.training == training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_seeded_runs_are_identical(std_digits_model, test_batch):
    x, y = test_batch[0][:32], test_batch[1][:32]
    for norm in ("linf", "l2"):
        a = PGD(std_digits_model, 0.1, norm, steps=4, restarts=2, seed=7)(x, y)
        b = PGD(std_digits_model, 0.1, norm, steps=4, restarts=2, seed=7)(x, y)
        c = PGD(std_digits_model, 0.1, norm, steps=4, restarts=2, seed=8)(x, y)
        assert torch.equal(a, b) and not torch.equal(a, c)
    # Without a random start the attack is deterministic even unseeded.
    d = PGD(std_digits_model, 0.1, steps=4, random_start=False)(x, y)
    e = PGD(std_digits_model, 0.1, steps=4, random_start=False)(x, y)
    assert torch.equal(d, e)


def test_input_not_modified(std_digits_model, test_batch):
    x, y = test_batch[0][:8].clone(), test_batch[1][:8]
    x_copy = x.clone()
    x_adv = PGD(std_digits_model, 0.2, steps=3, seed=0)(x, y)
    assert torch.equal(x, x_copy) and not x_adv.requires_grad


# ------------------------------------------------------------------ losses


def test_margin_and_dlr_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.5, 2.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(margin_from_logits(logits, y), torch.tensor([1.0 - 3.0, 2.0 - 0.5]))
    # DLR = -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)
    torch.testing.assert_close(dlr_from_logits(logits, y), torch.tensor([-(3.0 - 1.0) / (3.0 - 0.0),
                                                                          -(0.5 - 2.0) / (2.0 - 0.5)]))
    target = torch.tensor([3, 2])
    # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    torch.testing.assert_close(dlr_from_logits(logits, y, target), torch.tensor(
        [-(3.0 - (-1.0)) / (3.0 - (0.0 + -1.0) / 2), -(0.5 - 1.0) / (2.0 - (0.5 + 0.0) / 2)]))
    with pytest.raises(ValueError, match="3 classes"):
        dlr_from_logits(torch.zeros(2, 2), torch.tensor([0, 1]))


# ------------------------------------------------------------------ bad input


class _Probabilities(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


def test_bad_arguments(std_digits_model, test_batch):
    x, y = test_batch[0][:4], test_batch[1][:4]
    with pytest.raises(ValueError, match="eps"):
        PGD(std_digits_model, -0.1)
    with pytest.raises(ValueError, match="eps"):
        PGD(std_digits_model, torch.tensor([0.1, -0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="eps"):
        PGD(std_digits_model, float("nan"))
    with pytest.raises(ValueError, match="norm"):
        PGD(std_digits_model, 0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        PGD(std_digits_model, 0.1, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        PGD(std_digits_model, 0.1, restarts=0)
    with pytest.raises(ValueError, match="loss"):
        PGD(std_digits_model, 0.1, loss="hinge")
    attack = PGD(std_digits_model, 0.1, steps=2)
    with pytest.raises(ValueError, match="labels"):
        attack(x, y[:, None])
    with pytest.raises(ValueError, match="labels"):
        attack(x, y[:3])
    with pytest.raises(ValueError, match="per-sample"):
        PGD(std_digits_model, torch.full((3,), 0.1), steps=2)(x, y)
    with pytest.raises(ValueError, match="probabilities"):
        PGD(_Probabilities(std_digits_model), 0.1, steps=2)(x, y)
    with pytest.raises(ValueError, match="probabilities"):
        check_logits(torch.full((2, 4), 0.25))
    check_logits(torch.log(torch.full((2, 4), 0.25)))  # log-probabilities are fine
