"""``adasmooth train-mixnet``: train the mixing network alpha(x) of an adaptive mixed classifier."""

from __future__ import annotations

import argparse
import dataclasses

from ..core.config import merge_cli
from .common import add_common, add_data, add_threat, cli_values


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, output_default="runs/mixnet")
    add_data(p)
    add_threat(p)
    p.add_argument("--std", default=None, help="checkpoint of the standard (accurate) model g")
    p.add_argument("--rob", default=None, help="checkpoint of the robust model h")
    p.add_argument("--setting", choices=["A", "B", "C"], default=None,
                   help="training-time attack: A gray-box PGD, B white-box PGD (default), C APGD-CE + APGD-T")
    p.add_argument("--taps", type=_names, default=None,
                   help="two module names tapped on both models (default: each model's first two stages)")
    p.add_argument("--widths", type=_ints, default=None, help="three widths of the mixing network (default 256,512,1024)")
    p.add_argument("--blocks", type=_ints, default=None, help="residual blocks per group (default 2,2,2)")
    p.add_argument("--std-scale", type=float, default=None, help="logit scale of g in the mixture")
    p.add_argument("--rob-scale", type=float, default=None, help="logit scale of h in the mixture")
    p.add_argument("--attack-steps", type=int, default=None, help="mean number of attack steps (chi-squared draw)")
    p.add_argument("--adaptive-weight-max", type=float, default=None, help="w ~ U(0, this) on the attacker's alpha term")
    p.add_argument("--c-ce", type=float, default=None, help="weight of CE in Eq. 4.2 (default 0)")
    p.add_argument("--c-bce", type=float, default=None, help="weight of BCE in Eq. 4.2 (default 1.5)")
    p.add_argument("--c-prod", type=float, default=None, help="weight of CE*BCE in Eq. 4.2 (default 0.2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights (e.g. 0.8); default off")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                   help="no mixed precision on CUDA")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--val-fraction", type=float, default=None, help="hold out this part of the training set")
    p.add_argument("--eval-examples", type=int, default=None, help="test examples measured at the end")
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False, default=None)


def run(args: argparse.Namespace) -> int:
    from ..train.mixnet import MixnetTrainConfig, train_mixnet

    keys = [f.name for f in dataclasses.fields(MixnetTrainConfig)]
    cfg = merge_cli(MixnetTrainConfig, args.config, cli_values(args, keys))
    meta = train_mixnet(cfg)
    m = meta["metrics"]
    s = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json), setting {cfg.setting}: clean {m['clean_acc']:.2f}%, "
          f"white-box PGD-{s} ({cfg.norm}, eps={cfg.eps}) {m[f'pgd{s}_acc']:.2f}%, mean alpha clean "
          f"{m['alpha_clean_mean']:.3f} / attacked {m[f'alpha_pgd{s}_mean']:.3f} on {m['eval_examples']} test examples")
    return 0
