"""The GPU paths: no host-device synchronisation inside attack iterations or certification sampling,
every precision, channels-last, compile, auto batch size and fp16 training on CUDA.

Skipped without CUDA; run it whenever a GPU is available:
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from adasmooth.attacks import APGD, PGD, APGDTargeted
from adasmooth.attacks.adaptive import adaptive_alpha_loss
from adasmooth.attacks.base import make_generator, per_sample
from adasmooth.certify.smoothing import Smooth
from adasmooth.core.precision import (
    PRECISIONS,
    auto_batch_size,
    compile_model,
    numerics,
    prepare_model,
    with_precision,
)
from adasmooth.evaluate.robustness import evaluate_robustness
from adasmooth.mixing import MixedClassifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = torch.device("cuda")


@contextlib.contextmanager
def no_sync():
    """Any host-device synchronisation inside raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture(scope="module")
def cuda_model(std_digits_model):
    import copy

    return copy.deepcopy(std_digits_model).to(DEV).eval()


@pytest.fixture(scope="module")
def cuda_batch(digits_test):
    return digits_test.x[:64].to(DEV), digits_test.y[:64].to(DEV)


def test_sync_debug_mode_catches_a_sync(cuda_batch):
    x, _ = cuda_batch
    with pytest.raises(RuntimeError), no_sync():
        x.sum().item()


def _apgd_run(attack, x, y):
    eps = per_sample(attack.eps, x)
    gen = make_generator(attack.seed, x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    with no_sync():
        return attack._run(x, y, eps, rows, gen, stop_early=False, sync_free=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_apgd_iterations_do_not_synchronise(cuda_model, cuda_batch, precision):
    x, y = cuda_batch
    model = with_precision(cuda_model, precision)
    fooled, point, *_ = _apgd_run(APGD(model, 0.1, steps=15, seed=0), x, y)
    assert fooled.any() and (point - x).abs().max() <= 0.1 + 1e-6
    targeted = APGDTargeted(model, 0.1, steps=15, seed=0, n_target_classes=3)
    targeted._targets = torch.full_like(y, 0).where(y != 0, 1)
    fooled_t, *_ = _apgd_run(targeted, x, y)
    assert fooled_t.any()


def test_minimum_margin_and_adaptive_loss_do_not_synchronise(cuda_model, cuda_batch):
    x, y = cuda_batch
    mixed = MixedClassifier(cuda_model, cuda_model, 0.6).to(DEV).eval()
    attack = APGD(with_precision(mixed, "bf16"), 0.1, steps=10, seed=0, loss=adaptive_alpha_loss(0.25, "dlr"),
                  minimum_margin=True)
    _, _, _, margin, margin_point = _apgd_run(attack, x, y)
    assert torch.isfinite(margin).all() and margin_point.shape == x.shape


def test_pgd_iterations_do_not_synchronise(cuda_model, cuda_batch):
    x, y = cuda_batch
    attack = PGD(with_precision(cuda_model, "bf16"), 0.1, steps=10, seed=0)
    eps = per_sample(0.1, x)
    step = per_sample(0.025, x)
    with no_sync():
        x_adv, _, _ = attack._one_run(x, y, eps, step, make_generator(0, x.device))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("precision", PRECISIONS)
def test_certify_sampling_does_not_synchronise(cuda_model, cuda_batch, precision):
    smooth = Smooth(with_precision(cuda_model, precision), 10, 0.25, seed=0)
    x = cuda_batch[0][0]
    with no_sync():
        predictions = smooth.sample_predictions(x, 300, 128)
    counts = smooth._bincount(predictions)
    assert counts.sum() == 300 and predictions.device.type == "cuda"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_attacks_and_is_judged_in_fp32(cuda_model, digits_test, precision):
    data = (digits_test.x[:128], digits_test.y[:128])
    ref = evaluate_robustness(cuda_model, data, attacks=["apgd-ce"], eps=0.1, batch_size=128, progress=False,
                              device=DEV, attack_options={"apgd_steps": 20})
    report = evaluate_robustness(cuda_model, data, attacks=["apgd-ce"], eps=0.1, batch_size=128, progress=False,
                                 device=DEV, precision=precision, attack_options={"apgd_steps": 20})
    assert report.precision == precision
    assert ref.accuracy("apgd-ce") < ref.accuracy()  # the attack has work to do
    assert abs(report.accuracy("apgd-ce") - ref.accuracy("apgd-ce")) <= 100 * 4 / 128


def test_channels_last_and_compile_agree_with_eager(cuda_model, cuda_batch):
    import copy

    x, _ = cuda_batch
    model = copy.deepcopy(cuda_model)
    with torch.no_grad(), numerics("fp32"):  # torch's default lets cuDNN use TF32: 1e-3 differences
        ref = model(x)
        fast = prepare_model(model, "fp32", channels_last=True)(x)
        compiled = compile_model(model)(x)
    assert torch.allclose(fast, ref, atol=1e-4)
    assert torch.allclose(compiled, ref, atol=1e-4)


def test_auto_batch_size_fits(cuda_model):
    size = auto_batch_size(cuda_model, (1, 8, 8), DEV, gradients=True)
    assert size >= 64
    x = torch.rand(size, 1, 8, 8, device=DEV, requires_grad=True)
    torch.autograd.grad(cuda_model(x).sum(), x)


def test_fp16_training_on_cuda(digits_train, digits_test, tmp_path):
    from adasmooth.train.loop import TrainConfig, train_base

    cfg = TrainConfig(dataset="digits", arch="small-cnn", model_kwargs={"width": 8, "hidden": 32}, epochs=2,
                      batch_size=64, n_train=512, eval_examples=64, eval_pgd_steps=2, precision="fp16", device="cuda",
                      progress=False, output=str(tmp_path / "m"), lr=0.05)
    meta = train_base(cfg, digits_train, digits_test)
    history = [h["train_loss"] for h in meta["training"]["history"]]
    assert all(0 < v < 10 for v in history) and history[1] < history[0]
