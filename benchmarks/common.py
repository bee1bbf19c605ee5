"""Shared benchmark set-up: the base models every benchmark reuses, trained once and cached.

Models are cached under ``benchmarks/results/cache`` (git-ignored); delete a file to retrain it.
Run ``python benchmarks/common.py`` to build them all. The data folder defaults to ``../shared/data``
beside the repository, or ``$ADASMOOTH_DATA``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from adasmooth.models.checkpoint import checkpoint_paths, load_checkpoint
from adasmooth.train.loop import TrainConfig, train_base

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = RESULTS / "cache"


REFERENCE_AUTOATTACK = "autoattack-ref"
SQUARE_QUERIES = {"value": 5000}  # a benchmark sets its budget before attacking


def _register_reference_autoattack() -> None:
    """The reference AutoAttack (pyautoattack, standard version) end to end, as an attack name of the registry,
    with the benchmark's target classes and Square query budget (SQUARE_QUERIES)."""
    from adasmooth.attacks import ATTACKS
    from adasmooth.attacks.adaptive import LogitsOnly
    from adasmooth.attacks.autoattack import AutoAttackAttack
    from adasmooth.attacks.base import is_mixed_model

    @ATTACKS.register(REFERENCE_AUTOATTACK, description="reference AutoAttack (pyautoattack standard: APGD-CE, "
                      "APGD-T, FAB-T, Square) end to end, with the benchmark's target classes and Square budget",
                      options=("n_target_classes",), requires="pyautoattack")
    def build(model, eps, norm, seed, batch_size, n_target_classes: int = 9) -> AutoAttackAttack:
        target = LogitsOnly(model) if is_mixed_model(model) else model
        return AutoAttackAttack(target, eps=eps, norm=norm, version="standard", seed=seed, batch_size=batch_size,
                                n_target_classes=n_target_classes, square_queries=SQUARE_QUERIES["value"])


_register_reference_autoattack()


def calibrated_mixture(method: str, target: float, ctx: dict):
    """(classifier, fit) of ``method`` calibrated to clean accuracy ``target`` (%) on ``ctx["calib"]``: "fixed alpha"
    (bisection), "nonlinear" ((s, c, p, alpha) at the target, from the cached ``ctx["logits"]`` and h's attacked
    margins ``ctx["attacked"]`` over ``ctx["grid"]``), or a mixing network ``ctx["mixnet"][method]`` with calibrate's
    default: alpha confined to the range (floor and width) that setting D attacks least (``ctx["range"]`` holds
    calibrate_range's keyword options)."""
    from adasmooth.evaluate.calibrate import calibrate_fixed_alpha, calibrate_range
    from adasmooth.evaluate.mixednuts import calibrate_nonlinear_to_accuracy
    from adasmooth.mixing import MixedClassifier
    from adasmooth.mixing.adaptive import load_adaptive_classifier
    from adasmooth.mixing.nonlinear import NonlinearParams, nonlinear_rule

    g, h, calib = ctx["g"], ctx["h"], ctx["calib"]
    if method == "fixed alpha":
        fit = calibrate_fixed_alpha(g, h, calib, target)
        return MixedClassifier(g, h, fit["alpha"]).eval(), fit
    if method == "nonlinear":
        fit = calibrate_nonlinear_to_accuracy(*ctx["logits"], ctx["attacked"], ctx["grid"], target)
        params = NonlinearParams(s=fit["s"], c=fit["c"], p=fit["p"])
        return MixedClassifier(g, h, fit["alpha"], rule=nonlinear_rule(params)).eval(), fit
    model, _ = load_adaptive_classifier(ctx["mixnet"][method], device=ctx["device"])
    return model, calibrate_range(model, calib, target, norm="linf", seed=0, **ctx["range"])


def data_dir() -> Path:
    env = os.environ.get("ADASMOOTH_DATA")
    return Path(env) if env else ROOT.parent.parent / "shared" / "data"


# name -> training config of the shared base models (small CNN, width 16)
BASE_MODELS: dict[str, dict] = {
    "fmnist-std": dict(dataset="fashion-mnist", method="standard", epochs=10, lr=0.05),
    "fmnist-pgd": dict(dataset="fashion-mnist", method="pgd", eps=0.1, attack_steps=5, epochs=4, n_train=30000,
                       lr=0.05),
    "mnist-std": dict(dataset="mnist", method="standard", epochs=5, lr=0.05),
    # PGD-AT at eps 0.3 stays at chance (loss 2.30 after 4 epochs, SGD 0.05 or Adam 1e-3) for this small
    # network; TRADES learns clean accuracy first and then robustness
    "mnist-trades": dict(dataset="mnist", method="trades", eps=0.3, attack_steps=10, epochs=4, n_train=30000,
                         lr=0.05),
    "mnist-gauss-0.25": dict(dataset="mnist", method="gaussian", sigma=0.25, epochs=10, lr=0.05),
    "mnist-gauss-0.5": dict(dataset="mnist", method="gaussian", sigma=0.5, epochs=10, lr=0.05),
}


def base_model(name: str, device: str = "cpu"):
    """Load the cached base model ``name``, training it first if it is missing. Returns (model, sidecar)."""
    path = CACHE / name
    weights, _ = checkpoint_paths(path)
    if not weights.is_file():
        spec = dict(BASE_MODELS[name])
        eps = spec.pop("eps", 0.3 if spec["dataset"] == "mnist" else 0.1)
        cfg = TrainConfig(arch="small-cnn", model_kwargs={"width": 16}, data_dir=str(data_dir()), eps=eps,
                          batch_size=128, eval_examples=1000, seed=0, output=str(path), device=device, **spec)
        train_base(cfg)
    return load_checkpoint(path, device)


if __name__ == "__main__":
    import torch

    # Several benchmarks share two cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(int(os.environ.get("ADASMOOTH_THREADS", "1")))
    for n in sys.argv[1:] or BASE_MODELS:
        model, info = base_model(n)
        print(n, info["metrics"])
