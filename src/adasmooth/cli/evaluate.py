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
from typing import Any, Literal

from ..core.checks import check_eps
from ..core.errors import CheckpointError
from ..core.config import (CheckpointDataOptions, DataLoadingOptions, n_examples_option, option, output_option,
                           rule_params_option)
from ..core.precision import Precision, channels_last_option, compile_option, parse_batch_size, precision_option
from ..data.images import ImageOptions, image_options
from ..models.checkpoint import check_input_shape, recorded_dataset, recorded_threat, load_checkpoint_data
from ..models.loader import SPEC_HELP, model_dir_option
from .common import checkpoint_files, narrate, warn_class_count

RULES = "adasmooth.mixing:MIXING_RULES"


@dataclass
class EvaluateConfig(CheckpointDataOptions, DataLoadingOptions):
    model: str | None = option(None, help=f"a single model to attack: {SPEC_HELP}")
    std: str | None = option(None, help="standard (accurate) base model g of a mixture (any model spec)")
    rob: str | None = option(None, help="robust base model h of a mixture (any model spec)")
    model_dir: str | None = model_dir_option()
    alpha: float | None = option(None, help="fixed mixing weight of h, in [0, 1]")
    mixnet: str | None = option(None, help="a saved mixture (from train-mixnet / calibrate, or a fixed one) or a "
                                           "released one: robustbench:<dataset>/Linf/Bai2023Improving_*")
    std_scale: float = option(1.0, help="logit scale of g in a fixed mixture")
    rob_scale: float = option(1.0, help="logit scale of h in a fixed mixture")
    rule: str = option("prob", help="mixing rule of a fixed mixture (with --alpha)", registry=RULES)
    rule_params: dict[str, Any] = rule_params_option()
    image: ImageOptions = image_options()
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
    restart: bool = option(False, help="start over: delete the journal an earlier run with another config left")
    output: str = output_option("runs/evaluate.json", "result JSON (rewritten after every batch)")

    def validate(self) -> None:
        from ..attacks import ATTACK_NAMES
        from ..mixing import MIXING_RULES, check_rule_params

        MIXING_RULES.get(self.rule)  # an unknown name lists the known ones
        check_rule_params(self.rule_params, [self.rule] if self.alpha is not None else [])

        check_eps(self.eps, self.norm)
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


def files(cfg: EvaluateConfig) -> tuple[list, list]:
    from ..mixing.export import mixture_files

    mixture = mixture_files(cfg.mixnet, cfg.model_dir) if cfg.mixnet else []
    return [*checkpoint_files(cfg.model, cfg.std, cfg.rob), *mixture], [cfg.output]


def _load_model(cfg: EvaluateConfig, device):
    """(model, {checkpoint path: sidecar}, the robust (or only) checkpoint's path, source record)."""
    from ..mixing import MixedClassifier, build_rule
    from ..mixing.adaptive import load_adaptive_classifier
    from ..mixing.export import load_mixture
    from ..models.loader import load_model

    if cfg.model is not None:
        model, info = load_model(cfg.model, device, model_dir=cfg.model_dir)
        return model, {cfg.model: info}, cfg.model, {"model": cfg.model}
    std = load_model(cfg.std, device, model_dir=cfg.model_dir) if cfg.std else None
    rob = load_model(cfg.rob, device, model_dir=cfg.model_dir) if cfg.rob else None
    if cfg.mixnet is not None:
        if std or rob:  # base models given explicitly replace the recorded ones
            model, info = load_adaptive_classifier(cfg.mixnet, std[0] if std else None, rob[0] if rob else None,
                                                   device=device)
        else:
            model, info = load_mixture(cfg.mixnet, device, cfg.model_dir)
        infos = {cfg.std or cfg.mixnet: std[1] if std else info}
        if rob:
            infos[cfg.rob] = rob[1]
        return model.eval(), infos, cfg.rob or cfg.mixnet, {"mixnet": cfg.mixnet, "std": cfg.std, "rob": cfg.rob}
    rule = build_rule(cfg.rule, cfg.rule_params.get(cfg.rule))
    model = MixedClassifier(std[0], rob[0], cfg.alpha, std_scale=cfg.std_scale, rob_scale=cfg.rob_scale, rule=rule)
    model.rule = cfg.rule
    return model.eval(), {cfg.std: std[1], cfg.rob: rob[1]}, cfg.rob, {"std": cfg.std, "rob": cfg.rob,
                                                                      "alpha": cfg.alpha, "rule": cfg.rule,
                                                                      "rule_params": cfg.rule_params.get(cfg.rule)}


# Fields that do not change any example's outcome: a journal made under other values still resumes.
NOT_RESULT_FIELDS = ("progress", "device", "batch_size", "restart", "output", "workers")


def run(cfg: EvaluateConfig) -> int:
    """Evaluate; every finished batch goes to a journal beside the output, so a killed run started again
    continues where it stopped; under torchrun each process takes a strided share of the examples and
    rank 0 writes the one result file."""
    from ..core.distributed import init_distributed, shard
    from ..core.journal import Journal, journal_path
    from ..core.runtime import resolve_device, seed_everything
    from ..evaluate.robustness import evaluate_robustness, format_report, report_from_examples, write_report

    dist = init_distributed(cfg.device)
    device = resolve_device(dist.device(cfg.device))
    seed_everything(cfg.seed)
    model, infos, threat_source, source = _load_model(cfg, device)
    dataset = recorded_dataset(cfg.dataset, infos, cfg.force_dataset)
    eps, norm = recorded_threat(cfg.eps, cfg.norm, infos[threat_source], threat_source)
    image, data = load_checkpoint_data(cfg, infos, dataset, cfg.split)
    cfg = dataclasses.replace(cfg, dataset=dataset, eps=eps, norm=norm, image=image)
    data = data.subset(cfg.n_examples)
    check_input_shape(infos, data.input_shape, dataset)
    warn_class_count(infos, data)

    if cfg.batch_size == "auto":
        from ..core.precision import auto_batch_size, prepare_model

        attacked = prepare_model(model, cfg.precision, cfg.channels_last)
        cfg = dataclasses.replace(cfg, batch_size=auto_batch_size(attacked, data.input_shape, device, gradients=True,
                                                                  precision=cfg.precision, cpu_default=250))
        narrate(f"batch size auto: {cfg.batch_size}")


    fingerprint = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RESULT_FIELDS}
    fingerprint["source"] = source
    path = journal_path(cfg.output)
    if cfg.restart and dist.is_main:
        Journal(path, fingerprint, restart=True).remove_all()
    dist.barrier()
    journal = Journal(path, fingerprint, part=f"rank{dist.rank}" if dist.active else None)
    mine = shard(journal.pending(range(len(data))), dist)
    if journal.done and dist.is_main:
        narrate(f"resuming: {len(journal.done)} of {len(data)} examples already done ({path})")
    config_record = {**dataclasses.asdict(cfg), "source": source}

    def final_report(records, complete: bool):
        seconds: dict[str, float] = {}
        flags: dict[str, list[str]] = {}
        for meta in journal.metas:
            for a, t in meta.get("seconds", {}).items():
                seconds[a] = seconds.get(a, 0.0) + t
            for a, msgs in meta.get("flags", {}).items():
                flags[a] = flags.get(a, []) + [m for m in msgs if m not in flags.get(a, [])]
        report = report_from_examples(records, cfg.attacks, eps, norm, cfg.seed, cfg.cascade, seconds, flags)
        report.complete, report.precision = complete, cfg.precision
        return report

    state = {"written": 0, "seconds": {}, "flags": {}}

    def on_batch(report):
        new = report.examples()[state["written"]:]
        seconds = {a: t - state["seconds"].get(a, 0.0) for a, t in report.seconds.items()}
        flags = {a: [m for m in msgs if m not in state["flags"].get(a, [])] for a, msgs in report.flags.items()}
        journal.append(new, meta={"seconds": seconds, "flags": {a: m for a, m in flags.items() if m}})
        state.update(written=report.n, seconds=dict(report.seconds), flags={a: list(m) for a, m in report.flags.items()})
        if not dist.active:  # one process: the result file shows the progress too
            write_report(cfg.output, final_report(list(journal.done.values()), False), config=config_record)

    if mine:
        part = data.select(mine)
        evaluate_robustness(
            model, part, attacks=cfg.attacks, eps=eps, norm=norm, batch_size=cfg.batch_size, seed=cfg.seed,
            progress=cfg.progress and dist.is_main, device=device, cascade=cfg.cascade,
            attack_options={"adaptive_weight": cfg.adaptive_weight}, on_batch=on_batch, precision=cfg.precision,
            channels_last=cfg.channels_last, compile=cfg.compile, indices=mine,
            done_before=0 if dist.active else len(journal.done),  # under torchrun rank 0's bar shows its share
        )
    dist.barrier()
    if not dist.is_main:
        return 0
    journal = Journal(path, fingerprint, part="rank0" if dist.active else None)  # every process's records
    missing = [i for i in range(len(data)) if i not in journal.done]
    if missing:  # the journal was removed or cut while this run wrote it
        raise CheckpointError(f"journal {path} lacks {len(missing)} of the {len(data)} examples this run finished "
                              f"(first: {missing[0]}); was it removed meanwhile? run again to redo them")
    report = final_report([journal.done[i] for i in range(len(data))], True)
    write_report(cfg.output, report, config=config_record)
    journal.remove_all()
    print(f"{dataset} {cfg.split}, {report.n} examples, {norm} eps={eps}, seed {cfg.seed}, "
          f"attacks in {cfg.precision} (judged in fp32)" + (f", {dist.world_size} processes" if dist.active else ""))
    print(format_report(report))
    narrate(f"wrote {cfg.output}")
    return 0
