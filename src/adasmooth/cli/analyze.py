"""``adasmooth analyze``: why the mixture is robust — confidence gaps (Table 1) and local Lipschitz
constants of h's probabilities (Appendix C.3).

Examples::

    adasmooth analyze --std runs/std --rob runs/rob --eps 0.1 --what gap
    adasmooth analyze --rob runs/rob --eps 0.1 --what lipschitz --alphas 0.6,0.8,1.0

Outputs: <output>.json, <output>_gap.png (histograms), <output>_lipschitz.png, and a printed table.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..core.config import merge_cli
from .common import add_common, add_data, add_threat, cli_values, parse_floats


@dataclass
class AnalyzeConfig:
    std: str | None = None  # standard model g
    rob: str | None = None  # robust model h
    what: Literal["gap", "lipschitz", "both"] = "both"
    dataset: str | None = None  # default: the checkpoints' data set
    data_dir: str | None = None
    split: Literal["train", "val", "test"] = "test"
    norm: Literal["linf", "l2"] = "linf"
    eps: float | None = None  # default: the robust checkpoint's evaluation eps
    n_examples: int | None = 1000
    batch_size: int = 250
    aa_steps: int = 100  # APGD iterations for the AutoAttack-style column
    lipschitz_steps: int = 20  # PGD steps per class for Eq. C.1
    lipschitz_restarts: int = 1
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    seed: int = 0
    device: str = "auto"
    output: str = "runs/analyze"
    progress: bool = True

    def validate(self) -> None:
        if self.std is None and self.rob is None:
            raise ValueError("give --std CKPT and/or --rob CKPT")
        if self.what in ("lipschitz", "both") and self.rob is None:
            raise ValueError("the Lipschitz analysis needs --rob CKPT (the robust model h)")
        if self.eps is not None and self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        for name in ("batch_size", "aa_steps", "lipschitz_steps", "lipschitz_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError("alphas must lie in [0, 1]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, output_default="runs/analyze")
    add_data(p)
    add_threat(p)
    p.add_argument("--std", default=None, help="standard model checkpoint g")
    p.add_argument("--rob", default=None, help="robust model checkpoint h")
    p.add_argument("--what", choices=["gap", "lipschitz", "both"], default=None, help="which analysis (default both)")
    p.add_argument("--split", choices=["train", "val", "test"], default=None, help="data split (default test)")
    p.add_argument("--n-examples", type=int, default=None, help="analyse the first N inputs (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per attack batch (default 250)")
    p.add_argument("--aa-steps", type=int, default=None, help="APGD iterations for the AutoAttack column (default 100)")
    p.add_argument("--lipschitz-steps", type=int, default=None, help="PGD steps for Eq. C.1 (default 20)")
    p.add_argument("--lipschitz-restarts", type=int, default=None, help="PGD restarts for Eq. C.1 (default 1)")
    p.add_argument("--alphas", type=parse_floats, default=None, help="alphas for the estimated radii")


def _fmt_gap_rows(rows):
    out = []
    for r in rows:
        out.append({
            "model": r["model"], "setting": r["setting"], "accuracy %": r["accuracy"],
            "gap ok mean": r["gap_correct_mean"], "gap ok median": r["gap_correct_median"],
            "gap wrong mean": r["gap_incorrect_mean"], "gap wrong median": r["gap_incorrect_median"],
        })
    return out


def run(args: argparse.Namespace) -> int:
    from ..evaluate.analysis import confidence_gap_table, lipschitz_analysis, plot_gap_histograms, plot_lipschitz_histogram
    from ..models.checkpoint import load_checkpoint
    from ..data import load_dataset
    from ..core.io import format_table, write_result
    from ..core.runtime import resolve_device, seed_everything

    keys = [f.name for f in dataclasses.fields(AnalyzeConfig)]
    cfg = merge_cli(AnalyzeConfig, args.config, cli_values(args, keys))
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    models, infos = {}, {}
    for name, path in (("g", cfg.std), ("h", cfg.rob)):
        if path is not None:
            models[name], infos[name] = load_checkpoint(path, device)
    classes = {int(i["num_classes"]) for i in infos.values()}
    if len(classes) > 1:
        raise ValueError(f"the models disagree on the class count: {sorted(classes)}")
    dataset = cfg.dataset or next((i.get("dataset") for i in infos.values() if i.get("dataset")), None)
    if dataset is None:
        raise ValueError("the checkpoints do not name their data set; give --dataset")
    eps = cfg.eps
    if eps is None:
        ref = infos.get("h") or infos.get("g")
        eps = (ref.get("metrics") or {}).get("eval_eps")
        if eps is None:
            raise ValueError("give --eps (the checkpoint records no evaluation eps)")
    data = load_dataset(dataset, cfg.split, cfg.data_dir).subset(cfg.n_examples)
    x, y = data.x.to(device), data.y.to(device)
    results: dict = {"dataset": dataset, "eps": eps, "norm": cfg.norm, "n": len(data)}
    if cfg.what in ("gap", "both"):
        gap = confidence_gap_table(models, x, y, eps, cfg.norm, batch_size=cfg.batch_size, seed=cfg.seed,
                                   aa_steps=cfg.aa_steps, progress=cfg.progress)
        results["confidence_gap"] = gap
        plot_gap_histograms(gap, f"{cfg.output}_gap.png")
        print(f"Confidence gap (Table 1), {cfg.norm} eps={eps}, AutoAttack column: {gap['autoattack_mode']}")
        print(format_table(_fmt_gap_rows(gap["rows"]), precision=3))
    if cfg.what in ("lipschitz", "both"):
        lip = lipschitz_analysis(models["h"], x, y, eps, cfg.norm, alphas=cfg.alphas, steps=cfg.lipschitz_steps,
                                 restarts=cfg.lipschitz_restarts, batch_size=max(1, cfg.batch_size // 10),
                                 seed=cfg.seed, progress=cfg.progress)
        results["lipschitz"] = lip
        plot_lipschitz_histogram(lip, f"{cfg.output}_lipschitz.png")
        print(f"Local Lipschitz of h's probabilities (Eq. C.1, PGD-{cfg.lipschitz_steps}), {cfg.norm} eps={eps}: "
              f"mean {lip['mean_lipschitz_eq_c1']:.3f}, median {lip['median_lipschitz_eq_c1']:.3f}; "
              f"mean largest probability change {lip['mean_max_probability_change']:.3f}")
        print(format_table([{"alpha": r["alpha"], "h correct and est. radius >= eps (%)": r["robust_at_eps_pct"],
                             "median est. radius": r["median_radius"]} for r in lip["per_alpha"]], precision=3))
    out = write_result(f"{cfg.output}.json", results, cfg, cfg.seed)
    print(f"wrote {out} (+ PNG beside it)")
    return 0
