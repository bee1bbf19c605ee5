"""CAT-RS (adasmooth.train.methods.catrs, adasmooth.train.catrs_targets) and the gaussian training method: maths against hand-derived values."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adasmooth.train.catrs_targets import (
    CatrsTargetsConfig,
    build_targets,
    build_targets_for_dataset,
    load_smoothed_targets,
    save_smoothed_targets,
    smoothed_targets,
)
from adasmooth.train.methods.catrs import (
    CatrsOptions,
    bottom_k_mask,
    catrs_loss,
    default_lambda,
    draw_noise,
    effective_eps,
    kl_noise_pgd,
    kl_to_target,
    low_confidence_loss,
    noise_accuracy,
    noise_moments,
    project_l2_ball,
    pull_within_eps,
    restore_moments,
    sample_k,
)
from adasmooth.models.checkpoint import load_checkpoint
from adasmooth.core.config import ConfigError, from_mapping
from adasmooth.data.base import load_dataset
from adasmooth.models.base import create_model
from adasmooth.train.loop import TRAINING_METHODS, TrainConfig, TrainContext, train_base


@pytest.fixture(autouse=True)
def _one_thread():
    # On a shared, oversubscribed CPU, intra-op threads make these tiny models many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits(n=None):
    data = load_dataset("digits", "train")
    return data.subset(n)


def _tiny_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return create_model("small-cnn", 10, in_channels=1, width=4, hidden=16).to(dtype)


# --------------------------------------------------------------------------- bottom-K mask and K


def test_bottom_k_mask_keeps_exactly_k_smallest_per_row():
    gen = torch.Generator().manual_seed(1)
    losses = torch.randint(0, 4, (200, 6), generator=gen).float()  # many ties
    k = torch.randint(0, 7, (200,), generator=gen)
    mask = bottom_k_mask(losses, k)
    assert torch.equal(mask.sum(1), k)
    for row, keep in zip(losses, mask):
        if keep.any() and (~keep).any():
            assert row[keep].max() <= row[~keep].min()


def test_low_confidence_loss_hand_values():
    losses = torch.tensor([[3.0, 1.0, 2.0, 4.0], [0.5, 0.25, 8.0, 1.0]])
    got = low_confidence_loss(losses, torch.tensor([2, 4]))
    # row 0 keeps 1 and 2; row 1 keeps all; both divide by m = 4
    assert torch.allclose(got, torch.tensor([3.0 / 4, 9.75 / 4]))
    assert torch.allclose(low_confidence_loss(losses, torch.tensor([1, 0])), torch.tensor([0.25, 0.0]))


def test_bottom_k_mask_rejects_bad_k():
    with pytest.raises(ValueError, match="k must lie"):
        bottom_k_mask(torch.zeros(2, 3), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        bottom_k_mask(torch.zeros(2, 3), torch.tensor([1, 2, 3]))


def test_sample_k_binomial_and_at_least_one():
    gen = torch.Generator().manual_seed(0)
    m = 4
    assert torch.equal(sample_k(torch.zeros(100), m, gen), torch.ones(100, dtype=torch.long))
    assert torch.equal(sample_k(torch.ones(100), m, gen), torch.full((100,), m))
    k = sample_k(torch.full((20000,), 0.5), m, gen)
    assert k.min() >= 1 and k.max() <= m
    # Binomial(4, 1/2) with 0 raised to 1: P(K=1) = (1 + 4) / 16, mean = 2 + 1/16
    assert abs((k == 1).float().mean().item() - 5 / 16) < 0.015
    assert abs(k.float().mean().item() - (2 + 1 / 16)) < 0.03
    a = sample_k(torch.full((50,), 0.3), m, torch.Generator().manual_seed(7))
    b = sample_k(torch.full((50,), 0.3), m, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_k(torch.tensor([1.5]), m)


def test_noise_accuracy_counts_correct_copies():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 2.0]], [[1.0, 0.0], [5.0, 0.0]]])
    assert torch.allclose(noise_accuracy(logits, torch.tensor([0, 1])), torch.tensor([2 / 3, 2 / 3]))


# --------------------------------------------------------------------------- worst-case noise


def test_restore_moments_and_ball_projection_are_exact():
    gen = torch.Generator().manual_seed(3)
    noise0 = 0.5 * torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64) + 0.2
    mean0, rms0 = noise_moments(noise0)
    moved = noise0 + torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    restored = restore_moments(moved, mean0, rms0)
    mean1, rms1 = noise_moments(restored)
    assert torch.allclose(mean1, mean0, atol=1e-12) and torch.allclose(rms1, rms0, atol=1e-12)
    projected = project_l2_ball(moved, noise0, 0.7)
    assert ((projected - noise0).flatten(1).norm(dim=1) <= 0.7 + 1e-12).all()
    # inside the ball nothing moves
    near = noise0 + 1e-3 * torch.ones_like(noise0)
    assert torch.equal(project_l2_ball(near, noise0, 0.7), near)


def test_pull_within_eps_keeps_moments_and_distance():
    gen = torch.Generator().manual_seed(4)
    noise0 = torch.randn(32, 20, generator=gen, dtype=torch.float64) + 0.3
    mean0, rms0 = noise_moments(noise0)
    far = restore_moments(noise0 + 2 * torch.randn(32, 20, generator=gen, dtype=torch.float64), mean0, rms0)
    pulled = pull_within_eps(far, noise0, 1.0)
    dist = (pulled - noise0).norm(dim=1)
    assert (dist <= 1.0 + 1e-9).all()
    assert torch.allclose(dist, torch.ones_like(dist), atol=1e-9)  # all of them were farther than 1
    mean1, rms1 = noise_moments(pulled)
    assert torch.allclose(mean1, mean0, atol=1e-12) and torch.allclose(rms1, rms0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.25, 1.0, 3.0])
def test_noise_pgd_keeps_mean_rms_and_eps_ball_and_raises_kl(eps):
    data = _digits(12)
    model = _tiny_cnn()
    gen = torch.Generator().manual_seed(5)
    noise0 = draw_noise(data.x, 3, 0.5, gen)
    noise0[0] += 0.1  # a draw with a clearly non-zero mean
    target = F.one_hot(data.y, 10).float() * 0.8 + 0.02
    worst = kl_noise_pgd(model, data.x, noise0, target, eps, steps=4)
    assert worst.shape == noise0.shape and not worst.requires_grad
    flat, flat0 = worst.reshape(36, -1), noise0.reshape(36, -1)
    assert ((flat - flat0).norm(dim=1) <= eps * (1 + 1e-5)).all()
    mean, rms = noise_moments(flat)
    mean0, rms0 = noise_moments(flat0)
    assert torch.allclose(mean, mean0, atol=1e-5) and torch.allclose(rms, rms0, rtol=1e-5)
    with torch.no_grad():
        x_rep = data.x.unsqueeze(0)
        kl0 = kl_to_target(model((x_rep + noise0).reshape(36, 1, 8, 8)).view(3, 12, -1), target)
        kl1 = kl_to_target(model((x_rep + worst).reshape(36, 1, 8, 8)).view(3, 12, -1), target)
    assert kl1.mean() > kl0.mean()
    assert model.training  # the attack restores the mode it found


# --------------------------------------------------------------------------- the loss


class _FirstTwo(nn.Module):
    """logits = the first two coordinates of the input, so the losses can be worked out by hand."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x.reshape(x.shape[0], -1)[:, :2]


def _ce2(z0, z1, y):
    z = (z0, z1)
    return math.log(math.exp(z0) + math.exp(z1)) - z[y]


def _kl2(t, z0, z1):
    lse = math.log(math.exp(z0) + math.exp(z1))
    logp = (z0 - lse, z1 - lse)
    return sum(ti * (math.log(ti) - lp) for ti, lp in zip(t, logp) if ti > 0)


def test_catrs_loss_matches_hand_computed_values():
    x = torch.tensor([[0.2, 0.8, 0.5], [0.9, 0.1, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    noise = torch.tensor(
        [
            [[0.1, -0.3, 0.0], [0.0, 0.4, 0.0]],
            [[-0.2, 0.5, 0.0], [0.3, -0.6, 0.0]],
            [[0.6, -0.1, 0.0], [-0.5, 0.2, 0.0]],
        ],
        dtype=torch.float64,
    )  # (m=3, N=2, 3)
    target = torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=torch.float64)
    k = torch.tensor([2, 3])
    lam = 0.5
    terms = catrs_loss(_FirstTwo().double(), x, y, noise, lam, eps=0.0, steps=2, k=k, target=target)

    ces = [[_ce2(x[i, 0].item() + noise[j, i, 0].item(), x[i, 1].item() + noise[j, i, 1].item(), int(y[i]))
            for j in range(3)] for i in range(2)]
    low0 = sum(sorted(ces[0])[:2]) / 3
    low1 = sum(ces[1]) / 3
    # eps = 0: the worst-case noise is the draw itself
    high1 = max(_kl2(target[1].tolist(), x[1, 0].item() + noise[j, 1, 0].item(), x[1, 1].item() + noise[j, 1, 1].item())
                for j in range(3))
    assert terms.low.tolist() == pytest.approx([low0, low1], rel=1e-12)
    assert terms.high.tolist() == pytest.approx([0.0, high1], rel=1e-12)
    assert terms.loss.item() == pytest.approx((low0 + low1 + lam * high1) / 2, rel=1e-12)
    assert terms.loss.dtype == torch.float64

    # the default target is the detached mean softmax over the copies
    mean_target = F.softmax((x[1] + noise[:, 1])[:, :2], -1).mean(0).tolist()
    high1_mean = max(_kl2(mean_target, x[1, 0].item() + noise[j, 1, 0].item(), x[1, 1].item() + noise[j, 1, 1].item())
                     for j in range(3))
    terms = catrs_loss(_FirstTwo().double(), x, y, noise, lam, eps=0.0, steps=2, k=k)
    assert terms.high[1].item() == pytest.approx(high1_mean, rel=1e-10)


def test_kl_term_only_for_inputs_with_k_equal_m():
    data = _digits(16)
    model = _tiny_cnn(1)
    noise = draw_noise(data.x, 4, 0.25, torch.Generator().manual_seed(2))
    target = torch.full((16, 10), 0.1)
    k = torch.tensor([4, 1, 2, 3] * 4)
    terms = catrs_loss(model, data.x, data.y, noise, 1.0, 0.5, 2, k=k, target=target)
    full = k == 4
    assert (terms.high[~full] == 0).all() and (terms.high[full] > 0).all()
    assert torch.allclose(terms.loss, (terms.low + terms.high).mean())
    terms.loss.backward()  # gradients reach the model through both parts
    assert all(p.grad is not None for p in model.parameters())

    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    no_full = catrs_loss(model, data.x, data.y, noise, 1.0, 0.5, 2, k=torch.full((16,), 3), target=target)
    assert (no_full.high == 0).all() and len(calls) == 1  # no attack, no second forward pass
    calls.clear()
    zero_lam = catrs_loss(model, data.x, data.y, noise, 0.0, 0.5, 2, k=torch.full((16,), 4))
    assert (zero_lam.high == 0).all() and len(calls) == 1


def test_catrs_loss_draws_k_from_noise_accuracy():
    data = _digits(8)
    model = _tiny_cnn(2)
    noise = draw_noise(data.x, 4, 0.25, torch.Generator().manual_seed(3))
    terms = catrs_loss(model, data.x, data.y, noise, 1.0, 0.5, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model((data.x.unsqueeze(0) + noise).reshape(32, 1, 8, 8)).view(4, 8, -1)
    assert torch.allclose(terms.confidence, noise_accuracy(logits, data.y))
    assert ((terms.k >= 1) & (terms.k <= 4)).all()
    assert ((terms.confidence == 0) <= (terms.k == 1)).all()  # w = 0 forces K = 1


def test_defaults_and_schedule():
    assert [default_lambda(s) for s in (0.25, 0.5, 1.0)] == [0.5, 1.0, 2.0]
    assert effective_eps(1.0, 5, None) == 1.0
    assert effective_eps(1.0, 0, 1) == 1.0 and effective_eps(1.0, 1, 1) == 2.0


def test_draw_noise_scale_seed_and_dtype():
    x = torch.zeros(50, 1, 8, 8, dtype=torch.float64)
    a = draw_noise(x, 4, 0.5, torch.Generator().manual_seed(9))
    b = draw_noise(x, 4, 0.5, torch.Generator().manual_seed(9))
    assert a.shape == (4, 50, 1, 8, 8) and a.dtype == torch.float64 and torch.equal(a, b)
    assert abs(a.std().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="m >= 1"):
        draw_noise(x, 0, 0.5)


# --------------------------------------------------------------------------- training


def test_short_catrs_run_lowers_the_fixed_noise_loss():
    data = _digits(256)
    torch.manual_seed(3)
    model = create_model("mlp", 10, in_channels=1, input_size=8, hidden=32)
    cfg = TrainConfig(dataset="digits", method="cat-rs", sigma=0.25, catrs=CatrsOptions(steps=2, eps=0.5))
    cfg.validate()
    ctx = TrainContext(generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe_noise = draw_noise(data.x, 4, 0.25, torch.Generator().manual_seed(11))
    probe_k = torch.full((256,), 4)

    def probe():
        # fixed noise and K = m for everyone: the full objective, free of the method's own randomness
        return catrs_loss(model, data.x, data.y, probe_noise, 0.5, 0.5, 2, k=probe_k).loss.item()

    before = probe()
    for epoch in range(6):
        ctx.epoch = epoch
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 256, 32):
            idx = perm[i : i + 32]
            loss = TRAINING_METHODS.get("cat-rs")(model, (data.x[idx], data.y[idx], idx), cfg, ctx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = probe()
    assert after < 0.8 * before
    stats = ctx.extras["catrs_stats"]
    assert stats["inputs"] == 6 * 256 and 0 <= stats["full"] <= stats["inputs"]


@pytest.mark.parametrize("method", ["gaussian", "cat-rs"])
def test_train_base_records_sigma(tmp_path, method):
    cfg = TrainConfig(dataset="digits", method=method, sigma=0.5, epochs=1, batch_size=32, n_train=64,
                      eval_examples=16, eval_pgd_steps=1, catrs=CatrsOptions(steps=1), model_kwargs={"width": 4, "hidden": 16},
                      output=str(tmp_path / method), progress=False, resume=False)
    meta = train_base(cfg)
    _, sidecar = load_checkpoint(tmp_path / method)
    assert meta["sigma"] == 0.5 and sidecar["sigma"] == 0.5
    assert sidecar["training"]["method"] == method
    assert sidecar["training"]["config"]["catrs"]["m"] == 4


def test_gaussian_loss_is_ce_on_sigma_scaled_noise():
    """Each example's noise comes from its own generator, seeded from (seed, epoch, index): the loss is
    CE on x + sigma * that noise, and an example's noise does not depend on its batch."""
    from adasmooth.attacks.base import draw

    data = _digits(20)
    model = _tiny_cnn(4)
    cfg = TrainConfig(method="gaussian", sigma=0.3)
    ctx = TrainContext(seed=5, epoch=2)
    idx = torch.arange(100, 120)
    loss = TRAINING_METHODS.get("gaussian")(model, (data.x, data.y, idx), cfg, ctx)
    noise = torch.stack([torch.randn(data.x.shape[1:], generator=g) for g in ctx.generators(idx, "cpu", "noise").generators])
    expected = F.cross_entropy(model(data.x + 0.3 * noise), data.y)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(model(data.x + 0.6 * noise), data.y))
    # the same example in another batch draws the same noise; another epoch draws other noise
    half = draw("normal", (10, *data.x.shape[1:]), ctx.generators(idx[10:], "cpu", "noise"), data.x)
    assert torch.equal(half, noise[10:])
    other_epoch = draw("normal", (20, *data.x.shape[1:]), TrainContext(seed=5, epoch=3).generators(idx, "cpu", "noise"),
                       data.x)
    assert not torch.allclose(other_epoch, noise)


# --------------------------------------------------------------------------- cached targets


def test_smoothed_targets_votes_and_softmax():
    data = _digits(10)
    model = _tiny_cnn(5)
    gen = torch.Generator().manual_seed(0)
    votes = smoothed_targets(model, data.x, 0.25, 37, batch_size=64, generator=gen)
    assert votes.shape == (10, 10) and torch.allclose(votes.sum(1), torch.ones(10))
    assert torch.allclose(votes * 37, (votes * 37).round(), atol=1e-4)  # counts out of 37 draws
    with torch.no_grad():
        clean = model(data.x)
    tiny = smoothed_targets(model, data.x, 1e-9, 5, batch_size=8, generator=gen)
    assert torch.equal(tiny, F.one_hot(clean.argmax(1), 10).float())
    soft = smoothed_targets(model, data.x, 1e-9, 3, mode="softmax", generator=gen)
    assert torch.allclose(soft, F.softmax(clean, 1), atol=1e-5)


def test_cached_targets_roundtrip_and_training(tmp_path):
    data = _digits(64)
    probs = F.one_hot(data.y, 10).float() * 0.9 + 0.01
    path = tmp_path / "targets"
    save_smoothed_targets(path, probs, data.y, {"sigma": 0.25, "num_samples": 1})
    loaded = load_smoothed_targets(str(path) + ".safetensors")
    assert torch.equal(loaded.probs, probs) and torch.equal(loaded.labels, data.y)
    assert json.loads((tmp_path / "targets.json").read_text())["kind"] == "catrs-smoothed-targets"
    idx = torch.tensor([3, 0, 7])
    assert torch.equal(loaded.lookup(idx, data.y[idx]), probs[idx])
    with pytest.raises(ValueError, match="do not match"):
        loaded.lookup(idx, (data.y[idx] + 1) % 10)
    with pytest.raises(ValueError, match="outside"):
        loaded.lookup(torch.tensor([64]), data.y[:1])

    cfg = TrainConfig(dataset="digits", method="cat-rs", sigma=0.25, epochs=1, batch_size=32, n_train=64,
                      eval_examples=8, eval_pgd_steps=1,
                      catrs=CatrsOptions(steps=1, confidence="cached", target="cached", target_path=str(path)),
                      model_kwargs={"width": 4, "hidden": 16},
                      output=str(tmp_path / "m"), progress=False, resume=False)
    meta = train_base(cfg, train_data=data)
    assert meta["sigma"] == 0.25 and math.isfinite(meta["training"]["history"][0]["train_loss"])


def test_bad_options_give_clear_errors(tmp_path):
    def check(exc, match, **kw):
        with pytest.raises(exc, match=match):
            TrainConfig(method="cat-rs", catrs=CatrsOptions(**kw)).validate()

    check(ValueError, "catrs.m", m=0)
    check(ValueError, "catrs.lambda", lambda_=-0.1)
    check(ValueError, "catrs.lambda", lambda_=float("nan"))
    check(ValueError, "catrs.eps", eps=-1.0)
    check(ValueError, "catrs.eps", eps=float("inf"))
    check(ValueError, "catrs.steps", steps=0)
    check(ValueError, "catrs.confidence", confidence="entropy")
    check(ValueError, "catrs.target", target="hard")
    check(ValueError, "catrs.target_path is required", target="cached")
    check(FileNotFoundError, "not found", confidence="cached", target_path=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="entropy"):
        from_mapping(TrainConfig, {"method": "cat-rs", "catrs": {"confidence": "entropy"}})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_smoothed_targets(tmp_path / "none")
    with pytest.raises(ValueError, match="lambda"):
        catrs_loss(_FirstTwo(), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2), -1.0, 0.1, 1)
    with pytest.raises(ValueError, match="noise must be"):
        catrs_loss(_FirstTwo(), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 1, 2), 1.0, 0.1, 1)


def test_build_targets_reads_sigma_from_checkpoint(tmp_path):
    cfg = TrainConfig(dataset="digits", method="gaussian", sigma=0.5, epochs=1, batch_size=32, n_train=64,
                      eval_examples=8, eval_pgd_steps=1, model_kwargs={"width": 4, "hidden": 16},
                      output=str(tmp_path / "gauss"), progress=False, resume=False)
    train_base(cfg)
    targets = from_mapping(CatrsTargetsConfig, {"model": str(tmp_path / "gauss"), "output": str(tmp_path / "t"),
                                                "samples": 3, "n_train": 64, "device": "cpu", "progress": False})
    assert build_targets(targets) == tmp_path / "t.safetensors"
    loaded = load_smoothed_targets(tmp_path / "t")
    assert loaded.probs.shape == (64, 10) and torch.equal(loaded.labels, _digits(64).y)
    assert torch.allclose(loaded.probs * 3, (loaded.probs * 3).round(), atol=1e-5)
    assert loaded.info["dataset"] == "digits"  # taken from the checkpoint
    again = build_targets_for_dataset(tmp_path / "gauss", "digits", tmp_path / "t2", samples=3, n_train=64,
                                      device="cpu", progress=False)
    assert torch.equal(load_smoothed_targets(again).probs, loaded.probs)  # the same seed draws the same noise
    assert loaded.info["sigma"] == 0.5 and loaded.info["num_samples"] == 3 and loaded.info["mode"] == "votes"
