"""``adasmooth train-base``: train a base model and write a checkpoint with measured accuracies."""

from __future__ import annotations

import argparse
import dataclasses

from ..core.config import merge_cli
from .common import add_common, add_data, add_threat, cli_values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.loop import TRAINING_METHODS, TrainConfig  # noqa: F401  (registers methods)

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
    g = p.add_argument_group("CAT-RS (--method cat-rs)")
    g.add_argument("--catrs-m", type=int, default=None, help="noise draws per input (default 4)")
    g.add_argument("--catrs-lambda", type=float, default=None,
                   help="weight of the worst-case KL term (default 2*sigma: 0.5/1/2 for sigma 0.25/0.5/1)")
    g.add_argument("--catrs-eps", type=float, default=None, help="l_2 radius of the worst-case noise search (default 1.0)")
    g.add_argument("--catrs-steps", type=int, default=None, help="PGD steps of the noise search (default 4)")
    g.add_argument("--catrs-warmup-epochs", type=int, default=None,
                   help="from this (0-based) epoch on the radius is doubled (default: never)")
    g.add_argument("--catrs-confidence", choices=["accuracy", "cached"], default=None,
                   help="w(x): fraction of noisy copies classified correctly, or the cached smoothed p(y|x)")
    g.add_argument("--catrs-target", choices=["mean", "cached"], default=None,
                   help="KL target: detached mean softmax over the copies, or the cached smoothed soft label")
    g.add_argument("--catrs-target-path", default=None,
                   help="cached smoothed targets (built by adasmooth.train.catrs_targets.build_targets)")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples measured at the end")
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False, default=None)


def run(args: argparse.Namespace) -> int:
    from ..core.config import load_config_file
    from ..train.loop import TrainConfig, train_base

    keys = [f.name for f in dataclasses.fields(TrainConfig)]
    values = cli_values(args, keys)
    # CatrsOptions field -> the --catrs-* option that sets it
    catrs = {name: getattr(args, "catrs_" + name.rstrip("_")) for name in
             ("m", "lambda_", "eps", "steps", "warmup_epochs", "confidence", "target", "target_path")}
    catrs = {name: value for name, value in catrs.items() if value is not None}
    if catrs:  # --catrs-* options refine the config file's catrs block rather than replace it
        values["catrs"] = {**(load_config_file(args.config) if args.config else {}).get("catrs", {}), **catrs}
    cfg = merge_cli(TrainConfig, args.config, values)
    meta = train_base(cfg)
    m = meta["metrics"]
    steps = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json): clean {m['clean_acc']:.2f}%, "
          f"PGD-{steps} ({cfg.norm}, eps={cfg.eps}) {m[f'pgd{steps}_acc']:.2f}% on {m['eval_examples']} test examples")
    return 0
