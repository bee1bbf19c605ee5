"""``adasmooth train-base``: train a base model and write a checkpoint with measured accuracies."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import merge_cli
from .common import add_common, add_data, add_threat, cli_values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training import TRAINING_METHODS, TrainConfig  # noqa: F401  (registers methods)

    add_common(p, output_default="runs/model")
    add_data(p)
    add_threat(p)
    p.add_argument("--method", default=None, help=f"one of {sorted(TRAINING_METHODS)} (default standard)")
    p.add_argument("--arch", default=None, help="model name (small-cnn, mlp, resnet18, preact-resnet18, wrn-34-10, ...)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--attack-steps", type=int, default=None, help="PGD steps during adversarial training")
    p.add_argument("--trades-beta", type=float, default=None)
    p.add_argument("--sigma", type=float, default=None, help="noise level for gaussian / cat-rs")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples measured at the end")
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False, default=None)


def run(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train_base

    keys = [f.name for f in dataclasses.fields(TrainConfig)]
    cfg = merge_cli(TrainConfig, args.config, cli_values(args, keys))
    meta = train_base(cfg)
    m = meta["metrics"]
    steps = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json): clean {m['clean_acc']:.2f}%, "
          f"PGD-{steps} ({cfg.norm}, eps={cfg.eps}) {m[f'pgd{steps}_acc']:.2f}% on {m['eval_examples']} test examples")
    return 0
