"""``adasmooth train-mixnet``: train the mixing network alpha(x) of an adaptive mixed classifier."""

from __future__ import annotations

from ..train.mixnet import MixnetTrainConfig
from .common import checkpoint_files

CONFIG = MixnetTrainConfig


def files(cfg: MixnetTrainConfig) -> tuple[list, list]:
    from ..train.engine import history_paths, resume_path
    from ..train.mixnet import curve_path

    return (checkpoint_files(cfg.std, cfg.rob),
            [*checkpoint_files(cfg.output), resume_path(cfg.output), curve_path(cfg.output), *history_paths(cfg.output)])


def run(cfg: MixnetTrainConfig) -> int:
    from ..core.distributed import is_main_process
    from ..train.mixnet import train_mixnet

    meta = train_mixnet(cfg)
    if not is_main_process():
        return 0
    from ..train.mixnet import curve_path

    history = meta["training"]["history"]
    if history and "monitor" in history[0]:
        print("epoch | held-out clean | attacked | alpha clean | alpha attacked | detection AUC")
        for r in history:
            mon = r["monitor"]
            print(f"{r['epoch']:5d} | {mon['clean_acc']:14.2f} | {mon['attacked_acc']:8.2f} | {mon['alpha_clean']:11.3f} "
                  f"| {mon['alpha_attacked']:14.3f} | {mon['detection_auc']:13.3f}{'  <- kept' if r.get('best') else ''}")
        print(f"(on {history[0]['monitor']['examples']} held-out training images; clean level "
              f"{history[0]['monitor']['target_clean_acc']:.2f}%; curve: {curve_path(cfg.output)})")
    m = meta["metrics"]
    s = cfg.eval_pgd_steps
    print(f"wrote {cfg.output}.safetensors (+ .json), epoch {meta['training']['kept_epoch']}, setting "
          f"{meta['setting']}: clean {m['clean_acc']:.2f}%, "
          f"white-box PGD-{s} ({m['eval_norm']}, eps={m['eval_eps']}) {m[f'pgd{s}_acc']:.2f}%, mean alpha clean "
          f"{m['alpha_clean_mean']:.3f} / attacked {m[f'alpha_pgd{s}_mean']:.3f} on {m['eval_examples']} test examples")
    return 0
