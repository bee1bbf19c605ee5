"""``adasmooth certify``: randomized-smoothing certificates of a base model, alone and mixed with g.

Examples::

    adasmooth certify --model runs/gauss025 --dataset mnist --n 10000 --n-examples 500
    adasmooth certify --model runs/gauss025 --std runs/std --alpha 0.8,0.9 --hardmax
    adasmooth certify --model runs/gauss025 runs/gauss05 --std runs/std   # + Figure-6 frontier

sigma comes from each checkpoint's sidecar ("sigma", written by gaussian / cat-rs training) unless
--sigma is given. Outputs: <output>_sigma<S>.tsv (Cohen's layout, written per input),
<output>_sigma<S>_counts.json (partial counts), <output>_sigma<S>_mixed_alpha<A>.tsv, <output>.json,
<output>_curves.png and, with several models and --std, <output>_frontier_{rs,lip}.png.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..core.config import merge_cli
from .common import add_common, add_data, cli_values, parse_floats

DEFAULT_RADII = [round(0.05 * i, 4) for i in range(31)]


@dataclass
class CertifyConfig:
    model: list[str] = field(default_factory=list)  # smoothed base model(s) h; the first is the frontier baseline
    sigma: float | None = None  # noise level (only with one model); default: the checkpoint's sidecar
    std: str | None = None  # standard model g for the mixed certificate
    alpha: list[float] = field(default_factory=list)  # mixing weights of h to certify
    hardmax: bool = False  # one-hot g (Appendix A.2)
    std_scale: float = 1.0
    dataset: str | None = None  # default: the checkpoint's data set
    data_dir: str | None = None
    split: Literal["train", "val", "test"] = "test"
    n0: int = 100
    n: int = 100_000
    alpha_conf: float = 0.001  # failure probability of every certificate
    batch_size: int = 1000
    n_examples: int | None = 500
    skip: int = 1
    radii: list[float] = field(default_factory=lambda: list(DEFAULT_RADII))
    frontier_alphas: list[float] = field(default_factory=lambda: [round(0.5 + 0.01 * i, 2) for i in range(51)])
    seed: int = 0
    device: str = "auto"
    output: str = "runs/certify"
    progress: bool = True

    def validate(self) -> None:
        if not self.model:
            raise ValueError("give at least one --model checkpoint (the smoothed base classifier)")
        if self.sigma is not None and (self.sigma <= 0 or len(self.model) > 1):
            raise ValueError("--sigma must be > 0 and can only be given with a single --model")
        if self.alpha and self.std is None:
            raise ValueError("--alpha needs --std CKPT (the standard model g of the mixture)")
        for a in self.alpha:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must lie in [0, 1], got {a}")
        if self.n0 < 1 or self.n < 1 or self.batch_size < 1 or self.skip < 1:
            raise ValueError("n0, n, batch_size and skip must be >= 1")
        if not 0.0 < self.alpha_conf < 1.0:
            raise ValueError(f"alpha_conf (failure probability) must lie in (0, 1), got {self.alpha_conf}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        if not self.radii or any(r < 0 for r in self.radii):
            raise ValueError("radii must be a non-empty list of numbers >= 0")
        if self.std_scale <= 0:
            raise ValueError("std_scale must be > 0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, output_default="runs/certify")
    add_data(p)
    p.add_argument("--model", nargs="+", default=None, help="smoothed base model checkpoint(s) h")
    p.add_argument("--sigma", type=float, default=None, help="noise level (default: the checkpoint's 'sigma')")
    p.add_argument("--std", default=None, help="standard model g: also certify the mixture (Theorems A.2 and 3.5)")
    p.add_argument("--alpha", type=parse_floats, default=None, help="mixing weight(s) of h, e.g. 0.8,0.9")
    p.add_argument("--hardmax", action="store_const", const=True, default=None, help="use a one-hot g (App. A.2)")
    p.add_argument("--std-scale", type=float, default=None, help="logit scale of g (default 1)")
    p.add_argument("--split", choices=["train", "val", "test"], default=None, help="data split (default test)")
    p.add_argument("--n0", type=int, default=None, help="selection draws per input (default 100)")
    p.add_argument("--n", type=int, default=None, help="estimation draws per input (default 100000)")
    p.add_argument("--alpha-conf", type=float, default=None, help="failure probability (default 0.001)")
    p.add_argument("--batch-size", type=int, default=None, help="noisy copies per forward pass (default 1000)")
    p.add_argument("--n-examples", type=int, default=None, help="certify at most N inputs (default 500)")
    p.add_argument("--skip", type=int, default=None, help="certify every k-th input (default 1)")
    p.add_argument("--radii", type=parse_floats, default=None, help="radii for the curves (default 0:1.5:0.05)")
    p.add_argument("--frontier-alphas", type=parse_floats, default=None,
                   help="alpha grid searched for the frontier (default 0.5:1:0.01)")


def run(args: argparse.Namespace) -> int:
    from ..certify.report import certify_smoothed_models, summary_rows
    from ..models.checkpoint import load_checkpoint, read_sidecar
    from ..data import load_dataset
    from ..core.io import format_table, write_result
    from ..core.runtime import resolve_device, seed_everything

    keys = [f.name for f in dataclasses.fields(CertifyConfig)]
    cfg = merge_cli(CertifyConfig, args.config, cli_values(args, keys))
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    models, dataset, num_classes = {}, cfg.dataset, None
    for path in cfg.model:
        info = read_sidecar(path)
        sigma = cfg.sigma if cfg.sigma is not None else info.get("sigma")
        if sigma is None:
            raise ValueError(f"{path} has no 'sigma' in its sidecar (not trained with noise?); give --sigma")
        if float(sigma) in models:
            raise ValueError(f"two models share sigma={sigma}")
        model, info = load_checkpoint(path, device)
        models[float(sigma)] = model
        dataset = dataset or info.get("dataset")
        if num_classes is not None and int(info["num_classes"]) != num_classes:
            raise ValueError("the models disagree on the class count")
        num_classes = int(info["num_classes"])
    if dataset is None:
        raise ValueError("the checkpoint does not name its data set; give --dataset")
    std_model = None
    if cfg.std is not None:
        std_model, std_info = load_checkpoint(cfg.std, device)
        if int(std_info["num_classes"]) != num_classes:
            raise ValueError(f"g has {std_info['num_classes']} classes but h has {num_classes}")
    data = load_dataset(dataset, cfg.split, cfg.data_dir)
    results, _ = certify_smoothed_models(
        models, data, num_classes, std_model=std_model, alphas=cfg.alpha, n0=cfg.n0, n=cfg.n,
        alpha_conf=cfg.alpha_conf, batch_size=cfg.batch_size, radii=cfg.radii, frontier_alphas=cfg.frontier_alphas,
        std_hardmax=cfg.hardmax, std_scale=cfg.std_scale, skip=cfg.skip, max_examples=cfg.n_examples,
        prefix=cfg.output, seed=cfg.seed, device=device, progress=cfg.progress,
    )
    results["dataset"] = dataset
    out = write_result(f"{cfg.output}.json", results, cfg, cfg.seed)
    show = [r for r in (0.0, 0.25, 0.5, 0.75, 1.0) if any(abs(r - x) < 1e-9 for x in cfg.radii)] or cfg.radii[:5]
    print(format_table(summary_rows(results, show), precision=1))
    for m in results["models"]:
        print(f"sigma={m['sigma']:g}: {m['examples']} inputs, {m['noisy_samples_per_second']:.0f} noisy samples/s, "
              f"{m['images_per_second']:.2f} images/s")
    print(f"n={cfg.n}, n0={cfg.n0}, confidence {100 * (1 - cfg.alpha_conf):.2f}% per certificate. {results['statistics']}")
    print(f"wrote {out} (+ TSV / PNG beside it)")
    return 0
