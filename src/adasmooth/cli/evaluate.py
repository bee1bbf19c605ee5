"""``adasmooth evaluate``: attack a single model or a mixture and report per-input outcomes.

Examples::

    adasmooth evaluate --model runs/rob --attacks apgd-ce,apgd-t
    adasmooth evaluate --std runs/std --rob runs/rob --alpha 0.7 --attacks A,B,D,std,rob
    adasmooth evaluate --mixnet runs/mixnet --attacks B,C,D --n-examples 500

The data set, eps and norm default to what the checkpoints record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..core.checks import check_finite
from ..core.config import (
    RunOptions,
    data_dir_option,
    dataset_option,
    force_dataset_option,
    n_examples_option,
    option,
    output_option,
)
from ..core.precision import Precision, channels_last_option, compile_option, parse_batch_size, precision_option
from ..models.checkpoint import check_input_shape, recorded_dataset, recorded_threat
from .common import check_file_output, check_outputs_not_inputs, checkpoint_files


@dataclass
class EvaluateConfig(RunOptions):
    model: str | None = option(None, help="a single model checkpoint to attack")
    std: str | None = option(None, help="standard (accurate) base model checkpoint g of a fixed mixture")
    rob: str | None = option(None, help="robust base model checkpoint h of a fixed mixture")
    alpha: float | None = option(None, help="fixed mixing weight of h, in [0, 1]")
    mixnet: str | None = option(None, help="adaptive mixed classifier checkpoint (from train-mixnet / calibrate)")
    std_scale: float = option(1.0, help="logit scale of g in a fixed mixture")
    rob_scale: float = option(1.0, help="logit scale of h in a fixed mixture")
    dataset: str | None = dataset_option()
    force_dataset: bool = force_dataset_option()
    data_dir: str | None = data_dir_option()
    split: Literal["train", "val", "test"] = option("test", help="data split")
    norm: Literal["linf", "l2"] | None = option(None, help="threat model; none: the robust checkpoint's")
    eps: float | None = option(None, help="attack radius in [0, 1] pixel units; none: the robust checkpoint's")
    attacks: list[str] = option(default_factory=lambda: ["apgd-ce", "apgd-t"],
                                help="attacks to run (see the list below)")
    n_examples: int | None = n_examples_option(1000)
    batch_size: int | str = option(250, help="inputs per batch, or auto: the largest that fits in device memory")
    precision: Precision = precision_option()
    channels_last: bool = channels_last_option()
    compile: bool = compile_option()
    cascade: bool = option(False, help="run each attack only on inputs that survived the earlier ones")
    adaptive_weight: float = option(0.25, help="weight w of the alpha term in attack D")
    output: str = output_option("runs/evaluate.json", "result JSON (rewritten after every batch)")

    def validate(self) -> None:
        from ..attacks import ATTACK_NAMES

        check_finite("eps", self.eps, 0, high=1)
        self.batch_size = parse_batch_size(self.batch_size)
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(ATTACK_NAMES)}")
        if not self.attacks:
            raise ValueError("give at least one attack")
        if self.model is not None and any(v is not None for v in (self.std, self.rob, self.alpha, self.mixnet)):
            raise ValueError("--model evaluates one checkpoint; do not combine it with --std/--rob/--alpha/--mixnet")
        if self.model is None and self.mixnet is None and (self.std is None or self.rob is None):
            raise ValueError("give --model CKPT, or --std CKPT --rob CKPT with --alpha or --mixnet, or --mixnet CKPT")
        if self.model is None and self.mixnet is None and self.alpha is None:
            raise ValueError("a mixture needs --alpha FLOAT (fixed) or --mixnet CKPT (adaptive)")
        if self.alpha is not None and self.mixnet is not None:
            raise ValueError("give either --alpha or --mixnet, not both")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0.0 <= self.adaptive_weight <= 1.0:
            raise ValueError(f"adaptive_weight must lie in [0, 1], got {self.adaptive_weight}")
        if not (self.std_scale > 0 and self.rob_scale > 0):
            raise ValueError("std_scale and rob_scale must be > 0")


CONFIG = EvaluateConfig


def epilog() -> str:
    from ..attacks import ATTACK_DESCRIPTIONS

    return "attacks:\n" + "\n".join(f"  {name:<11} {text}" for name, text in ATTACK_DESCRIPTIONS.items())


def _load_model(cfg: EvaluateConfig, device):
    """(model, {checkpoint path: sidecar}, the robust (or only) checkpoint's path, source record)."""
    from ..mixing import MixedClassifier
    from ..mixing.adaptive import load_adaptive_classifier
    from ..models.checkpoint import load_checkpoint

    if cfg.model is not None:
        model, info = load_checkpoint(cfg.model, device)
        return model, {cfg.model: info}, cfg.model, {"model": cfg.model}
    std = load_checkpoint(cfg.std, device) if cfg.std else None
    rob = load_checkpoint(cfg.rob, device) if cfg.rob else None
    if cfg.mixnet is not None:
        model, info = load_adaptive_classifier(cfg.mixnet, std[0] if std else None, rob[0] if rob else None,
                                               device=device)
        infos = {cfg.std or cfg.mixnet: std[1] if std else info}
        if rob:
            infos[cfg.rob] = rob[1]
        return model.eval(), infos, cfg.rob or cfg.mixnet, {"mixnet": cfg.mixnet, "std": cfg.std, "rob": cfg.rob}
    model = MixedClassifier(std[0], rob[0], cfg.alpha, std_scale=cfg.std_scale, rob_scale=cfg.rob_scale)
    return model.eval(), {cfg.std: std[1], cfg.rob: rob[1]}, cfg.rob, {"std": cfg.std, "rob": cfg.rob,
                                                                      "alpha": cfg.alpha}


def run(cfg: EvaluateConfig) -> int:
    from ..core.runtime import resolve_device, seed_everything
    from ..data import load_dataset
    from ..evaluate.robustness import evaluate_robustness, format_report, write_report

    inputs = [f for p in (cfg.model, cfg.std, cfg.rob, cfg.mixnet) if p for f in checkpoint_files(p)]
    check_outputs_not_inputs([cfg.output], inputs)
    check_file_output(cfg.output)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, infos, threat_source, source = _load_model(cfg, device)
    dataset = recorded_dataset(cfg.dataset, infos, cfg.force_dataset)
    eps, norm = recorded_threat(cfg.eps, cfg.norm, infos[threat_source], threat_source)
    cfg = dataclasses.replace(cfg, dataset=dataset, eps=eps, norm=norm)
    data = load_dataset(dataset, cfg.split, cfg.data_dir).subset(cfg.n_examples)
    check_input_shape(infos, data.input_shape, dataset)

    if cfg.batch_size == "auto":
        from ..core.precision import auto_batch_size, prepare_model

        attacked = prepare_model(model, cfg.precision, cfg.channels_last)
        cfg = dataclasses.replace(cfg, batch_size=auto_batch_size(attacked, data.input_shape, device, gradients=True,
                                                                  precision=cfg.precision, cpu_default=250))
        print(f"batch size auto: {cfg.batch_size}")

    def save(report):
        write_report(cfg.output, report, config={**dataclasses.asdict(cfg), "source": source})

    report = evaluate_robustness(
        model, data, attacks=cfg.attacks, eps=eps, norm=norm, batch_size=cfg.batch_size, seed=cfg.seed,
        progress=cfg.progress, device=device, cascade=cfg.cascade,
        attack_options={"adaptive_weight": cfg.adaptive_weight}, on_batch=save, precision=cfg.precision,
        channels_last=cfg.channels_last, compile=cfg.compile,
    )
    save(report)
    print(f"{dataset} {cfg.split}, {report.n} examples, {norm} eps={eps}, seed {cfg.seed}, "
          f"attacks in {cfg.precision} (judged in fp32)")
    print(format_report(report))
    print(f"wrote {cfg.output}")
    return 0
