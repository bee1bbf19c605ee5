"""``adasmooth train-base``: train a base model and write a checkpoint with measured accuracies."""

from __future__ import annotations

from ..train.loop import TrainConfig
from .common import checkpoint_files

CONFIG = TrainConfig


def files(cfg: TrainConfig) -> tuple[list, list]:
    from ..train.engine import history_paths, resume_path

    uses_targets = cfg.method == "cat-rs" and "cached" in (cfg.catrs.confidence, cfg.catrs.target)
    inputs = checkpoint_files(cfg.catrs.target_path) if uses_targets else []
    return inputs, [*checkpoint_files(cfg.output), resume_path(cfg.output), *history_paths(cfg.output)]


def epilog() -> str:
    from ..train.methods import TRAINING_METHODS

    width = max(map(len, TRAINING_METHODS.names()))
    return "methods:\n" + "\n".join(f"  {name:<{width}}  {TRAINING_METHODS.info(name).get('description', '')}"
                                     for name in TRAINING_METHODS)


def run(cfg: TrainConfig) -> int:
    from ..core.distributed import is_main_process
    from ..train.loop import train_base

    meta = train_base(cfg)
    if not is_main_process():
        return 0
    m = meta["metrics"]
    steps = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json): clean {m['clean_acc']:.2f}%, "
          f"PGD-{steps} ({cfg.norm}, eps={cfg.eps}) {m[f'pgd{steps}_acc']:.2f}% on {m['eval_examples']} test examples")
    return 0
