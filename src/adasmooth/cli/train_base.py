"""``adasmooth train-base``: train a base model and write a checkpoint with measured accuracies."""

from __future__ import annotations

from ..train.loop import TrainConfig

CONFIG = TrainConfig


def epilog() -> str:
    from ..train.methods import TRAINING_METHODS

    return "methods: " + ", ".join(TRAINING_METHODS.names())


def run(cfg: TrainConfig) -> int:
    from ..train.loop import train_base

    meta = train_base(cfg)
    m = meta["metrics"]
    steps = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json): clean {m['clean_acc']:.2f}%, "
          f"PGD-{steps} ({cfg.norm}, eps={cfg.eps}) {m[f'pgd{steps}_acc']:.2f}% on {m['eval_examples']} test examples")
    return 0
