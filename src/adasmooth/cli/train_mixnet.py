"""``adasmooth train-mixnet``: train the mixing network alpha(x) of an adaptive mixed classifier."""

from __future__ import annotations

from ..train.mixnet import MixnetTrainConfig
from .common import checkpoint_files

CONFIG = MixnetTrainConfig


def files(cfg: MixnetTrainConfig) -> tuple[list, list]:
    from ..train.loop import resume_path

    return checkpoint_files(cfg.std, cfg.rob), [*checkpoint_files(cfg.output), resume_path(cfg.output)]


def run(cfg: MixnetTrainConfig) -> int:
    from ..core.distributed import is_main_process
    from ..train.mixnet import train_mixnet

    meta = train_mixnet(cfg)
    if not is_main_process():
        return 0
    m = meta["metrics"]
    s = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json), setting {cfg.setting}: clean {m['clean_acc']:.2f}%, "
          f"white-box PGD-{s} ({m['eval_norm']}, eps={m['eval_eps']}) {m[f'pgd{s}_acc']:.2f}%, mean alpha clean "
          f"{m['alpha_clean_mean']:.3f} / attacked {m[f'alpha_pgd{s}_mean']:.3f} on {m['eval_examples']} test examples")
    return 0
