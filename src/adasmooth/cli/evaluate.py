"""``adasmooth evaluate``: attack a single model or a mixture and report per-input outcomes.

Examples::

    adasmooth evaluate --model runs/rob --dataset fashion-mnist --eps 0.1 --attacks apgd-ce,apgd-t
    adasmooth evaluate --std runs/std --rob runs/rob --alpha 0.7 --attacks A,B,D,std,rob
    adasmooth evaluate --mixnet runs/mixnet --attacks B,C,D --n-examples 500
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..core.config import merge_cli
from .common import add_common, add_data, add_threat, cli_values


@dataclass
class EvaluateConfig:
    model: str | None = None  # a single checkpoint
    std: str | None = None  # standard base model g
    rob: str | None = None  # robust base model h
    alpha: float | None = None  # fixed mixing weight of h
    mixnet: str | None = None  # adaptive mixed classifier checkpoint
    std_scale: float = 1.0
    rob_scale: float = 1.0
    dataset: str = "digits"
    data_dir: str | None = None
    split: Literal["train", "val", "test"] = "test"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 0.1
    attacks: list[str] = field(default_factory=lambda: ["apgd-ce", "apgd-t"])
    n_examples: int | None = 1000
    batch_size: int = 250
    cascade: bool = False
    adaptive_weight: float = 0.25
    seed: int = 0
    device: str = "auto"
    output: str = "runs/evaluate.json"
    progress: bool = True

    def validate(self) -> None:
        from ..attacks import ATTACK_NAMES

        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
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


def _attack_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty attack list")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..attacks import ATTACK_DESCRIPTIONS

    add_common(p, output_default="runs/evaluate.json")
    add_data(p)
    add_threat(p)
    p.add_argument("--model", default=None, help="a single model checkpoint to attack")
    p.add_argument("--std", default=None, help="standard (accurate) base model checkpoint g")
    p.add_argument("--rob", default=None, help="robust base model checkpoint h")
    p.add_argument("--alpha", type=float, default=None, help="fixed mixing weight of h, in [0, 1]")
    p.add_argument("--mixnet", default=None, help="adaptive mixed classifier checkpoint (mixing network)")
    p.add_argument("--std-scale", type=float, default=None, help="logit scale of g in a fixed mixture (default 1)")
    p.add_argument("--rob-scale", type=float, default=None, help="logit scale of h in a fixed mixture (default 1)")
    p.add_argument("--split", choices=["train", "val", "test"], default=None, help="data split (default test)")
    names = "; ".join(f"{k}: {v}" for k, v in ATTACK_DESCRIPTIONS.items())
    p.add_argument("--attacks", type=_attack_list, default=None,
                   help=f"comma-separated attacks (default apgd-ce,apgd-t). {names}")
    p.add_argument("--n-examples", type=int, default=None, help="evaluate the first N examples (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per attack batch (default 250)")
    p.add_argument("--cascade", action="store_const", const=True, default=None,
                   help="run each attack only on inputs that survived the earlier ones")
    p.add_argument("--adaptive-weight", type=float, default=None,
                   help="weight w of the alpha term in attack D (default 0.25)")


def _load_model(cfg: EvaluateConfig, device):
    from ..models.checkpoint import load_checkpoint
    from ..mixing import MixedClassifier

    if cfg.model is not None:
        model, info = load_checkpoint(cfg.model, device)
        return model, {"model": cfg.model, "dataset": info.get("dataset")}
    std = load_checkpoint(cfg.std, device)[0] if cfg.std else None
    rob = load_checkpoint(cfg.rob, device)[0] if cfg.rob else None
    if cfg.mixnet is not None:
        try:
            from ..mixing.adaptive import load_adaptive_classifier
        except ImportError as err:
            raise ValueError(f"--mixnet needs adasmooth.mixnet.load_adaptive_classifier, which is unavailable: {err}")
        loaded = load_adaptive_classifier(cfg.mixnet, std, rob, device=device)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        return model.eval(), {"mixnet": cfg.mixnet, "std": cfg.std, "rob": cfg.rob}
    model = MixedClassifier(std, rob, cfg.alpha, std_scale=cfg.std_scale, rob_scale=cfg.rob_scale)
    return model.eval(), {"std": cfg.std, "rob": cfg.rob, "alpha": cfg.alpha}


def run(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..evaluate.robustness import evaluate_robustness, format_report, write_report
    from ..core.runtime import resolve_device, seed_everything

    keys = [f.name for f in dataclasses.fields(EvaluateConfig)]
    cfg = merge_cli(EvaluateConfig, args.config, cli_values(args, keys))
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, source = _load_model(cfg, device)
    data = load_dataset(cfg.dataset, cfg.split, cfg.data_dir).subset(cfg.n_examples)

    def save(report):
        write_report(cfg.output, report, config={**dataclasses.asdict(cfg), "source": source})

    report = evaluate_robustness(
        model, data, attacks=cfg.attacks, eps=cfg.eps, norm=cfg.norm, batch_size=cfg.batch_size, seed=cfg.seed,
        progress=cfg.progress, device=device, cascade=cfg.cascade,
        attack_options={"adaptive_weight": cfg.adaptive_weight}, on_batch=save,
    )
    save(report)
    print(f"{cfg.dataset} {cfg.split}, {report.n} examples, {cfg.norm} eps={cfg.eps}, seed {cfg.seed}")
    print(format_report(report))
    print(f"wrote {cfg.output}")
    return 0
