"""``adasmooth analyze``: why the mixture is robust — confidence gaps (Table 1) and local Lipschitz
constants of h's probabilities (Appendix C.3).

Examples::

    adasmooth analyze --std runs/std --rob runs/rob --eps 0.1 --what gap
    adasmooth analyze --rob runs/rob --eps 0.1 --what lipschitz --alphas 0.6,0.8,1.0

Outputs: <output>.json, <output>_gap.png (histograms), <output>_lipschitz.png, and a printed table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..core.checks import check_eps
from ..core.config import CheckpointDataOptions, DataLoadingOptions, batch_size_option, n_examples_option, option, output_option
from ..models.checkpoint import check_input_shape, recorded_dataset, recorded_threat, load_checkpoint_data
from ..models.loader import model_dir_option
from .common import checkpoint_files, narrate
from ..data.images import ImageOptions, image_options


@dataclass
class AnalyzeConfig(CheckpointDataOptions, DataLoadingOptions):
    std: str | None = option(None, help="standard model g (any model spec: checkpoint path, robustbench:, python:, ...)")
    rob: str | None = option(None, help="robust model h (any model spec)")
    model_dir: str | None = model_dir_option()
    what: Literal["gap", "lipschitz", "both"] = option("both", help="which analysis")
    split: Literal["train", "val", "test"] = option("test", help="data split")
    norm: Literal["linf", "l2"] | None = option(None, help="threat model; none: the robust checkpoint's")
    eps: float | None = option(None, help="attack radius; none: the robust checkpoint's evaluation eps")
    image: ImageOptions = image_options()
    n_examples: int | None = n_examples_option(1000)
    batch_size: int = batch_size_option(250)
    aa_steps: int = option(100, help="APGD iterations for the AutoAttack-style column")
    lipschitz_steps: int = option(20, help="PGD steps per class for the local Lipschitz estimate (Eq. C.1)")
    lipschitz_restarts: int = option(1, help="PGD restarts for Eq. C.1")
    alphas: list[float] = option(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                                 help="alphas for the estimated radii")
    output: str = output_option("runs/analyze", "output prefix: PREFIX.json and PNGs beside it")

    def validate(self) -> None:
        if self.std is None and self.rob is None:
            raise ValueError("give --std CKPT and/or --rob CKPT")
        if self.what in ("lipschitz", "both") and self.rob is None:
            raise ValueError("the Lipschitz analysis needs --rob CKPT (the robust model h)")
        check_eps(self.eps, self.norm)
        for name in ("batch_size", "aa_steps", "lipschitz_steps", "lipschitz_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError("alphas must lie in [0, 1]")


CONFIG = AnalyzeConfig


def _fmt_gap_rows(rows):
    out = []
    for r in rows:
        out.append({
            "model": r["model"], "setting": r["setting"], "accuracy %": r["accuracy"],
            "gap ok mean": r["gap_correct_mean"], "gap ok median": r["gap_correct_median"],
            "gap wrong mean": r["gap_incorrect_mean"], "gap wrong median": r["gap_incorrect_median"],
        })
    return out


def files(cfg: AnalyzeConfig) -> tuple[list, list]:
    outputs = [f"{cfg.output}.json", f"{cfg.output}_gap.png", f"{cfg.output}_lipschitz.png"]
    return checkpoint_files(cfg.std, cfg.rob), outputs


def run(cfg: AnalyzeConfig) -> int:
    from ..evaluate.analysis import confidence_gap_table, lipschitz_analysis, plot_gap_histograms, plot_lipschitz_histogram
    from ..models.loader import load_model
    from ..core.io import format_table, write_result
    from ..core.runtime import resolve_device, seed_everything

    paths = {name: path for name, path in (("g", cfg.std), ("h", cfg.rob)) if path is not None}
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    models, infos = {}, {}
    for name, path in paths.items():
        models[name], infos[path] = load_model(path, device, model_dir=cfg.model_dir)
    classes = {int(i["num_classes"]) for i in infos.values()}
    if len(classes) > 1:
        raise ValueError(f"the models disagree on the class count: {sorted(classes)}")
    dataset = recorded_dataset(cfg.dataset, infos, cfg.force_dataset)
    reference = cfg.rob or cfg.std
    eps, norm = recorded_threat(cfg.eps, cfg.norm, infos[reference], reference)
    image, data = load_checkpoint_data(cfg, infos, dataset, cfg.split)
    cfg = dataclasses.replace(cfg, dataset=dataset, eps=eps, norm=norm, image=image)
    data = data.subset(cfg.n_examples)
    check_input_shape(infos, data.input_shape, dataset)
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
    narrate(f"wrote {out} (+ PNG beside it)")
    return 0
