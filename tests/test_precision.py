"""Precision, layout, compilation and batch sizing (core.precision), and what the fast paths must keep:
fp32 unchanged, sync-free APGD equal to the compacting one, low precision judged in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adasmooth.attacks import APGD, APGDTargeted, make_attack
from adasmooth.attacks.adaptive import differentiable_surrogate
from adasmooth.attacks.base import AttackResult, is_mixed_model
from adasmooth.core.errors import ConfigError
from adasmooth.core.precision import (
    FP16_GRAD_SCALE,
    PRECISIONS,
    PrecisionModel,
    check_precision,
    compile_model,
    find_batch_size,
    largest_fitting,
    numerics,
    parse_batch_size,
    prepare_model,
    with_precision,
)
from adasmooth.evaluate.robustness import evaluate_robustness, judge_fp32
from adasmooth.mixing import MixedClassifier


def _linear(weight: float, n_in: int = 4, n_out: int = 2) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    nn.init.constant_(lin.weight, weight)
    return lin


def test_precision_names():
    assert PRECISIONS == ("fp32", "tf32", "bf16", "fp16")
    for name in PRECISIONS:
        assert check_precision(name) == name
    with pytest.raises(ConfigError, match="fp8"):
        check_precision("fp8")


def test_fp32_and_tf32_keep_the_model_itself():
    model = _linear(0.5)
    assert with_precision(model, "fp32") is model
    assert with_precision(model, "tf32") is model
    assert prepare_model(model, "fp32") is model
    assert isinstance(with_precision(model, "bf16"), PrecisionModel)


def test_numerics_sets_and_restores_tf32_switches():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with numerics("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with numerics("fp32"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bf16_wrapper_returns_fp32_logits_and_gradients(std_digits_model, digits_test):
    x = digits_test.x[:16].clone().requires_grad_(True)
    wrapped = with_precision(std_digits_model, "bf16")
    out = wrapped(x)
    assert out.dtype == torch.float32
    ref = std_digits_model(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    (g,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    (g_ref,) = torch.autograd.grad(ref.logsumexp(1).sum(), x)
    assert g.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), g_ref.flatten(1)).mean()
    assert cos > 0.9, cos


def test_fp16_gradient_scaling_saves_an_underflowing_gradient():
    # d(1e-5 * sum(W x))/dx_j = 1e-5 * sum_i W_ij = 2e-8: below fp16's smallest subnormal (6e-8), so
    # unscaled it flushes to zero in the fp16 backward pass; scaled by 2**12 it survives.
    lin = _linear(1e-3)
    x = torch.rand(3, 4, requires_grad=True)
    scaled = with_precision(lin, "fp16")
    assert scaled.grad_scale == FP16_GRAD_SCALE
    (g,) = torch.autograd.grad(scaled(x).sum() * 1e-5, x)
    assert torch.allclose(g, torch.full_like(g, 2e-8), rtol=0.05)
    unscaled = with_precision(lin, "fp16")
    unscaled.grad_scale = 1.0
    (g0,) = torch.autograd.grad(unscaled(x).sum() * 1e-5, x)
    assert torch.count_nonzero(g0) == 0


def test_fp16_overflowing_gradient_entries_become_zero_not_nan():
    lin = _linear(1.0)
    x = torch.rand(2, 4, requires_grad=True)
    wrapped = with_precision(lin, "fp16")
    # 1e2 * 2**12 = 4e5 overflows fp16 (max 65504) in the scaled backward pass
    (g,) = torch.autograd.grad(wrapped(x).sum() * 1e2, x)
    assert torch.isfinite(g).all()


class _Const(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def _mixture(hardmax: bool = False) -> MixedClassifier:
    g = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    h = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    return MixedClassifier(g, h, 0.7, std_hardmax=hardmax).eval()


def test_mixed_wrapper_keeps_the_mixed_protocol():
    mixed = _mixture()
    wrapped = with_precision(mixed, "bf16")
    assert is_mixed_model(wrapped) and not is_mixed_model(with_precision(_linear(1.0), "bf16"))
    out = wrapped.mix(torch.rand(5, 1, 2, 2))
    assert out.logits.dtype == out.alpha.dtype == out.alpha_logit.dtype == torch.float32
    assert torch.allclose(out.alpha, torch.full((5,), 0.7))
    # transfer attacks craft on the base models: they run at the wrapper's precision too
    assert isinstance(wrapped.std_model, PrecisionModel) and wrapped.std_model.model is mixed.std_model
    assert wrapped.alpha == pytest.approx(0.7)


def test_surrogate_of_a_wrapped_hardmax_mixture():
    mixed = _mixture(hardmax=True)
    surrogate = differentiable_surrogate(with_precision(mixed, "bf16"))
    assert isinstance(surrogate, PrecisionModel) and surrogate.precision == "bf16"
    assert surrogate.model.std_hardmax is False and mixed.std_hardmax is True


def test_alpha_logit_is_infinite_at_the_ends():
    mixed = _mixture()
    x = torch.rand(2, 1, 2, 2)
    for alpha, expected in ((0.0, -torch.inf), (1.0, torch.inf)):
        mixed.alpha = alpha
        assert torch.equal(mixed.mix(x).alpha_logit, torch.full((2,), expected))


@pytest.mark.parametrize("cls, kwargs", [(APGD, {}), (APGDTargeted, {"n_target_classes": 3}),
                                         (APGD, {"minimum_margin": True})])
def test_sync_free_apgd_equals_the_compacting_one(std_digits_model, digits_test, cls, kwargs):
    # sync-free runs keep broken inputs in the batch (masked): the same inputs break, and the
    # points of the unbroken ones are the same; a broken one may get a deeper misclassified iterate
    x, y = digits_test.x[:40], digits_test.y[:40]
    compact = cls(std_digits_model, 0.1, steps=12, seed=0, **kwargs)
    masked = cls(std_digits_model, 0.1, steps=12, seed=0, **kwargs)
    masked.sync_free = True
    x_compact, x_masked = compact(x, y), masked(x, y)
    with torch.no_grad():
        ok_compact = std_digits_model(x_compact).argmax(1) == y
        ok_masked = std_digits_model(x_masked).argmax(1) == y
        assert ok_compact.sum() < (std_digits_model(x).argmax(1) == y).sum()  # the attack broke some inputs
    assert torch.equal(ok_compact, ok_masked)
    if kwargs.get("minimum_margin"):  # no input is dropped in either mode: the very same points
        assert torch.equal(x_compact, x_masked)
    else:
        assert torch.equal(x_compact[ok_compact], x_masked[ok_masked])


def test_judge_fp32_overrules_a_low_precision_verdict():
    # the attack's model claims every input broken; the fp32 model (class 0 always) disagrees for y = 0
    fp32 = _Const(torch.tensor([[2.0, 0.0, 1.0]]))
    x = torch.zeros(4, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 2])
    claimed = AttackResult.from_logits(x, torch.tensor([[0.0, 5.0, 0.0]]).expand(4, -1), y,
                                       broken_by=["part-a"] * 4, flags=["note"])
    assert claimed.fooled.tolist() == [True, False, True, True]
    judged = judge_fp32(fp32, claimed, y)
    assert judged.fooled.tolist() == [False, True, False, True]
    assert judged.predicted.tolist() == [0, 0, 0, 0]
    assert judged.margin.tolist() == [-1.0, 2.0, -1.0, 1.0]  # max_{j != y} z_j - z_y of (2, 0, 1)
    assert judged.broken_by == [None, "part-a", None, "part-a"]
    assert judged.flags == ["note"]


def test_low_precision_evaluation_is_recorded_and_judged_in_fp32(std_digits_model, digits_test):
    data = (digits_test.x[:24], digits_test.y[:24])
    report = evaluate_robustness(std_digits_model, data, attacks=["pgd"], eps=0.1, batch_size=12,
                                 progress=False, precision="bf16", attack_options={"pgd_steps": 5})
    assert report.precision == "bf16" and report.to_dict()["precision"] == "bf16"
    assert report.summary()["precision"] == "bf16"
    fp32 = evaluate_robustness(std_digits_model, data, attacks=["pgd"], eps=0.1, batch_size=12,
                               progress=False, attack_options={"pgd_steps": 5})
    assert fp32.precision == "fp32"
    assert report.clean_pred == fp32.clean_pred  # clean predictions always come from fp32
    assert abs(report.accuracy("pgd") - fp32.accuracy("pgd")) <= 100 * 3 / 24


def test_make_attack_accepts_a_wrapped_mixture():
    attack = make_attack("B", with_precision(_mixture(), "bf16"), 0.1, seed=0, pgd_steps=2)
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_parse_batch_size():
    assert parse_batch_size("auto") == "auto"
    assert parse_batch_size("64") == 64 and parse_batch_size(8) == 8
    for bad in ("0", "many", 0, -3, True, 2.5):
        with pytest.raises(ValueError):
            parse_batch_size(bad)


def test_batch_size_search_doubles_until_memory_runs_out():
    tried = []

    def attempt(size):
        tried.append(size)
        if size > 300:
            raise torch.OutOfMemoryError("too big")

    assert largest_fitting(attempt, 64, 4096, headroom=0.8) == int(256 * 0.8)
    assert tried == [64, 128, 256, 512]
    tried.clear()
    # the first size already fails: search again from 1
    assert largest_fitting(lambda s: attempt(s) if s <= 20 else (_ for _ in ()).throw(torch.OutOfMemoryError()),
                           64, 4096, headroom=1.0) == 16
    with pytest.raises(ConfigError, match="batch of 1"):
        largest_fitting(lambda s: (_ for _ in ()).throw(torch.OutOfMemoryError()), 1, 8)
    assert find_batch_size(attempt, "cpu", cpu_default=123) == 123  # no device memory to fill


def test_compile_failure_falls_back_to_eager(caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    lin = _linear(0.5)
    compiled = compile_model(lin, backend=broken_backend)
    x = torch.rand(2, 4)
    assert torch.equal(compiled(x), lin(x))
    assert compiled.failed is not None
    assert "torch.compile failed" in caplog.text  # a library warning, through the adasmooth logger
    assert torch.equal(compiled(x), lin(x))  # later calls go straight to eager


def test_compiling_a_mixture_leaves_the_callers_mixture_alone():
    mixed = _mixture()
    compiled = compile_model(mixed, backend="eager")
    assert compiled.std_model is not mixed.std_model and mixed._modules["std_model"] is mixed.std_model
    x = torch.rand(3, 1, 2, 2)
    assert torch.allclose(compiled(x), mixed(x))
    assert is_mixed_model(compiled)


def test_config_fields():
    from adasmooth.cli.certify import CertifyConfig
    from adasmooth.cli.evaluate import EvaluateConfig
    from adasmooth.core.config import from_mapping
    from adasmooth.train.loop import TrainConfig

    cfg = from_mapping(EvaluateConfig, {"model": "m", "batch_size": "auto", "precision": "bf16",
                                        "channels_last": True, "compile": True})
    assert (cfg.batch_size, cfg.precision, cfg.channels_last, cfg.compile) == ("auto", "bf16", True, True)
    assert from_mapping(EvaluateConfig, {"model": "m", "batch_size": "32"}).batch_size == 32
    with pytest.raises(ConfigError, match="batch_size"):
        from_mapping(EvaluateConfig, {"model": "m", "batch_size": "lots"})
    with pytest.raises(ConfigError, match="fp8"):
        from_mapping(CertifyConfig, {"model": ["m"], "precision": "fp8"})
    assert from_mapping(CertifyConfig, {"model": ["m"], "batch_size": "auto"}).batch_size == "auto"
    assert from_mapping(TrainConfig, {"precision": "fp16"}).precision == "fp16"
    assert TrainConfig().precision == "fp32"


def test_bf16_training_runs(digits_train, digits_test, tmp_path):
    from adasmooth.train.loop import TrainConfig, train_base

    cfg = TrainConfig(dataset="digits", arch="small-cnn", model_kwargs={"width": 4, "hidden": 16}, epochs=1,
                      batch_size=64, n_train=256, eval_examples=32, eval_pgd_steps=2, precision="bf16",
                      progress=False, output=str(tmp_path / "m"))
    meta = train_base(cfg, digits_train, digits_test)
    assert meta["training"]["config"]["precision"] == "bf16"
    loss = meta["training"]["history"][0]["train_loss"]
    assert 0 < loss < 10
