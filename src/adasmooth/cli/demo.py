"""``adasmooth demo``: train a standard and a PGD-trained CNN, then run the alpha sweep on them.

With no arguments it runs offline on scikit-learn's digits in about a minute of CPU time; with
``--dataset fashion-mnist --data-dir DIR`` it does the same on Fashion-MNIST.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.config import RunOptions, batch_size_option, data_dir_option, option, output_option
from .common import checkpoint_files, narrate

# Per data set: (eps, epochs, n_train, n_examples, width of h's CNN; None: --width). Digits needs a
# larger eps than the usual 0.1: at 0.1 its PGD-trained CNN is as accurate as the standard one, and at
# 0.3 (also 0.25) PGD training of this small CNN collapses. Even at 0.2 a PGD-trained CNN of width 16 is
# as accurate as g (96.9 vs 96.7 % clean), so the demo gives h width 8: 89.4 % clean, 43.6 % under
# PGD-20, a robust model that pays in accuracy as robust models do on real data (width 12: 95.3 %,
# 16 at eps 0.22: 93.1 % clean but no more robust; measured with seed 0).
_DEFAULTS = {
    "digits": (0.2, 20, None, None, 8),
    "fashion-mnist": (0.1, 4, 10000, 500, None),
}


@dataclass
class DemoConfig(RunOptions):
    dataset: Literal["digits", "fashion-mnist"] = option("digits", help="data set the demo runs on")
    data_dir: str | None = data_dir_option()
    eps: float | None = option(None, help="attack radius; none: per data set (digits 0.2, fashion-mnist 0.1)")
    norm: Literal["linf", "l2"] = option("linf", help="threat model")
    epochs: int | None = option(None, help="training epochs of both models; none: per data set (digits 20)")
    n_train: int | None = option(None, help="train on the first N examples; none: per data set "
                                            "(fashion-mnist 10000, digits all)")
    n_examples: int | None = option(None, help="test examples swept; none: per data set (digits all 360, "
                                               "fashion-mnist 500)")
    width: int = option(16, help="channels of the small CNN of the standard model g")
    rob_width: int | None = option(None, help="channels of the small CNN of the PGD-trained model h; none: per "
                                              "data set (digits 8, fashion-mnist as --width)")
    attack_steps: int = option(5, help="PGD steps during adversarial training")
    alphas: list[float] = option(default_factory=lambda: [round(0.1 * i, 10) for i in range(11)],
                                 help="mixing weights of h swept, as 0,0.5,1 or start:stop:step")
    variants: list[str] = option(default_factory=lambda: ["prob", "logit", "grad_max_g"],
                                 help="mixing rules compared in the trade-off plot")
    steps: int = option(20, help="PGD steps of the sweep's attacks")
    step_size: float | None = option(None, help="PGD step size; none: 2.5 * eps / steps")
    batch_size: int = batch_size_option(256)
    std_scale: float = option(1.0, help="logit scale of the standard model g")
    rob_scale: float = option(1.0, help="logit scale of the robust model h")
    output: str = output_option("adasmooth-demo", "output folder")
    # These models are tiny: intra-op threads buy nothing and, on a busy machine, cost up to 10x in
    # spinning (measured: 24 s of CPU with 1 thread, 313 s with 2, for the default demo).
    threads: int | None = option(1, help="torch CPU threads; none: torch's default")

    def validate(self) -> None:
        if self.dataset not in _DEFAULTS:
            raise ValueError(f"the demo runs on {sorted(_DEFAULTS)}, not {self.dataset!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.width < 1 or self.attack_steps < 1 or (self.rob_width is not None and self.rob_width < 1):
            raise ValueError("width, rob_width and attack_steps must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"n_train must be >= 1, got {self.n_train}")
        self.sweep_config().validate()

    def resolved(self) -> "DemoConfig":
        eps, epochs, n_train, n_examples, rob_width = _DEFAULTS[self.dataset]
        return dataclasses.replace(
            self,
            eps=self.eps if self.eps is not None else eps,
            epochs=self.epochs if self.epochs is not None else epochs,
            n_train=self.n_train if self.n_train is not None else n_train,
            n_examples=self.n_examples if self.n_examples is not None else n_examples,
            rob_width=self.rob_width if self.rob_width is not None else rob_width or self.width,
        )

    def sweep_config(self):
        from ..evaluate.sweep import SweepConfig

        out = Path(self.output)
        return SweepConfig(std=str(out / "std"), rob=str(out / "rob"), dataset=self.dataset, data_dir=self.data_dir,
                           alphas=self.alphas, eps=self.eps, norm=self.norm, steps=self.steps,
                           step_size=self.step_size, variants=self.variants, n_examples=self.n_examples,
                           batch_size=self.batch_size, std_scale=self.std_scale, rob_scale=self.rob_scale,
                           seed=self.seed, device=self.device, output=str(out), progress=self.progress)


CONFIG = DemoConfig


def files(cfg: DemoConfig) -> tuple[list, list]:
    from .sweep import OUTPUT_FILES

    out = Path(cfg.output)
    return [], [*checkpoint_files(out / "std", out / "rob"), *(out / name for name in OUTPUT_FILES)]


def run(cfg: DemoConfig) -> int:
    import torch

    cfg = cfg.resolved()
    cfg.validate()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        _run_demo(cfg)
    finally:
        torch.set_num_threads(previous_threads)  # the demo may run inside a larger process (tests)
    return 0


def _run_demo(cfg: DemoConfig) -> None:
    from ..data import load_dataset
    from ..train.loop import TrainConfig, train_base
    from .sweep import load_pair, run_sweep

    t0 = time.time()
    out = Path(cfg.output)
    train = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir)
    common = dict(dataset=cfg.dataset, data_dir=cfg.data_dir, arch="small-cnn",
                  norm=cfg.norm, eps=cfg.eps, attack_steps=cfg.attack_steps, epochs=cfg.epochs, batch_size=64,
                  lr=0.05, n_train=cfg.n_train, eval_examples=cfg.n_examples, seed=cfg.seed, device=cfg.device,
                  progress=cfg.progress)
    for name, method, width in (("std", "standard", cfg.width), ("rob", "pgd", cfg.rob_width)):
        kind = "standard model g" if method == "standard" else f"PGD-trained model h (eps {cfg.eps})"
        narrate(f"[demo] training the {kind}: small CNN of width {width}, {cfg.epochs} epochs on {cfg.dataset} "
              f"-> {out / name}.safetensors")
        meta = train_base(TrainConfig(method=method, output=str(out / name), model_kwargs={"width": width},
                                      **common), train, test)
        m = meta["metrics"]
        narrate(f"[demo]   clean {m['clean_acc']:.2f}%, PGD-20 (eps={cfg.eps}) {m['pgd20_acc']:.2f}%")
    sweep_cfg = cfg.sweep_config()
    g, g_info, h, h_info = load_pair(sweep_cfg.std, sweep_cfg.rob, "cpu")
    result, paths = run_sweep(sweep_cfg, g, h, g_info, h_info)
    narrate(f"[demo] done in {time.time() - t0:.0f} s. Results in {out.resolve()}/: sweep.json, sweep.csv, "
          f"accuracy_vs_alpha.png (paper Figure 4), tradeoff.png (Figures 1/5), std/rob checkpoints")
