"""``adasmooth catrs-targets``: cache the smoothed soft labels of a training set for CAT-RS
(``train-base --method cat-rs --catrs-target cached --catrs-target-path OUTPUT``)."""

from __future__ import annotations

from ..train.catrs_targets import CatrsTargetsConfig
from .common import checkpoint_files, narrate

CONFIG = CatrsTargetsConfig


def files(cfg: CatrsTargetsConfig) -> tuple[list, list]:
    return checkpoint_files(cfg.model), checkpoint_files(cfg.output)


def run(cfg: CatrsTargetsConfig) -> int:
    from ..train.catrs_targets import build_targets

    path = build_targets(cfg)
    narrate(f"wrote {path} (+ .json)")
    return 0
