"""``adasmooth sweep``: clean / STD / ROB / MIX accuracy of fixed-alpha mixtures of two checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .common import add_common, add_data, add_threat, cli_values, parse_floats


def _variant_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sweep`` and ``demo``."""
    p.add_argument("--alphas", type=parse_floats, default=None,
                   help="alphas as '0,0.5,1' or start:stop:step '0:1:0.1' (default 0:1:0.1)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 20)")
    p.add_argument("--step-size", type=float, default=None, help="PGD step size (default 2.5 * eps / steps)")
    p.add_argument("--variants", type=_variant_list, default=None,
                   help="comma-separated mixing variants: prob (Eq. 3.4), logit, grad_g, grad_max_g, grad_ratio")
    p.add_argument("--n-examples", type=int, default=None, help="use the first N test examples")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--std-scale", type=float, default=None, help="logit scale s_g of the standard model")
    p.add_argument("--rob-scale", type=float, default=None, help="logit scale s_h of the robust model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, output_default="runs/sweep (a folder)")
    p.add_argument("--std", default=None, help="checkpoint of the standard model g (from train-base)")
    p.add_argument("--rob", default=None, help="checkpoint of the robust model h (from train-base)")
    add_data(p)
    add_threat(p)
    add_sweep_options(p)


def _training_value(info: dict[str, Any], key: str) -> Any:
    return (info.get("training") or {}).get("config", {}).get(key)


def load_pair(std_path: str, rob_path: str, device) -> tuple[Any, dict, Any, dict]:
    """Both checkpoints, after checking that they can be mixed."""
    from ..models.checkpoint import load_checkpoint

    g, g_info = load_checkpoint(std_path, device)
    h, h_info = load_checkpoint(rob_path, device)
    if g_info["num_classes"] != h_info["num_classes"]:
        raise ValueError(f"the checkpoints disagree on the class count: {std_path} has {g_info['num_classes']}, "
                         f"{rob_path} has {h_info['num_classes']}")
    ds_g, ds_h = g_info.get("dataset"), h_info.get("dataset")
    if ds_g and ds_h and ds_g != ds_h:
        raise ValueError(f"the checkpoints were trained on different data sets: {std_path} on {ds_g}, "
                         f"{rob_path} on {ds_h}")
    return g, g_info, h, h_info


def write_outputs(out_dir: Path, result, config, seed: int, progress_note: str | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """JSON (with config, seed, provenance), CSV and (with ``plots``) the two plots of a sweep."""
    from ..evaluate.plots import plot_accuracy_vs_alpha, plot_tradeoff
    from ..core.io import write_csv, write_result
    from ..evaluate.sweep import variant_labels

    payload = {"rows": result.rows, "reference": result.reference, "n_examples": result.n_examples}
    if progress_note:
        payload["status"] = progress_note
    paths = {"json": write_result(out_dir / "sweep.json", payload, config, seed)}
    if result.rows:
        paths["csv"] = write_csv(out_dir / "sweep.csv", result.rows)
    if result.rows and plots:
        first = result.rows[0]["variant"]
        paths["accuracy_vs_alpha"] = plot_accuracy_vs_alpha(
            result.rows, result.reference, out_dir / "accuracy_vs_alpha.png", variant=first,
            title=f"h_alpha = mix of g and h ({first}), {result.n_examples} test examples")
        paths["tradeoff"] = plot_tradeoff(
            result.rows, out_dir / "tradeoff.png", result.reference,
            labels=variant_labels(), title="MIX-attacked vs clean accuracy")
    return paths


def run_sweep(cfg, g=None, h=None, g_info=None, h_info=None) -> tuple[Any, dict[str, Path]]:
    """Load what ``cfg`` names (unless given), sweep, write outputs after every alpha; print the table."""
    from ..data import load_dataset
    from ..core.io import format_table
    from ..evaluate.sweep import alpha_sweep
    from ..core.runtime import resolve_device, seed_everything

    device = resolve_device(cfg.device)
    if g is None or h is None:
        if not cfg.std or not cfg.rob:
            raise ValueError("give both checkpoints: --std CKPT (standard model g) and --rob CKPT (robust model h)")
        g, g_info, h, h_info = load_pair(cfg.std, cfg.rob, device)
    g_info, h_info = g_info or {}, h_info or {}
    dataset = cfg.dataset or g_info.get("dataset") or h_info.get("dataset")
    if not dataset:
        raise ValueError("the checkpoints record no data set; give --dataset")
    eps = cfg.eps if cfg.eps is not None else _training_value(h_info, "eps")
    if eps is None:
        raise ValueError("the robust checkpoint records no eps; give --eps")
    norm = cfg.norm or _training_value(h_info, "norm") or "linf"
    cfg = dataclasses.replace(cfg, dataset=dataset, eps=float(eps), norm=norm)
    data = load_dataset(dataset, "test", cfg.data_dir).subset(cfg.n_examples)
    n_classes = g_info.get("num_classes", data.num_classes)
    if n_classes != data.num_classes:
        raise ValueError(f"{dataset} has {data.num_classes} classes but the checkpoints have {n_classes}")
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output)
    print(f"sweep: {len(cfg.alphas)} alphas x {len(cfg.variants)} variant(s) on {len(data)} {dataset} test examples, "
          f"PGD-{cfg.steps} {norm} eps={cfg.eps}")

    def save_partial(partial) -> None:
        write_outputs(out_dir, partial, cfg, cfg.seed, progress_note=f"partial: {len(partial.rows)} rows",
                      plots=False)

    result = alpha_sweep(g.to(device), h.to(device), data, cfg.alphas, cfg.eps, cfg.norm, cfg.steps, cfg.step_size,
                         cfg.variants, cfg.batch_size, cfg.seed, cfg.std_scale, cfg.rob_scale, cfg.progress,
                         on_alpha=save_partial)
    paths = write_outputs(out_dir, result, cfg, cfg.seed, progress_note="complete")
    ref = result.reference
    print(f"g alone: clean {ref['g_clean_acc']:.2f}%, under PGD on g {ref['g_std_attack_acc']:.2f}%;  "
          f"h alone: clean {ref['h_clean_acc']:.2f}%, under PGD on h {ref['h_rob_attack_acc']:.2f}%")
    order = {v: i for i, v in enumerate(cfg.variants)}
    print(format_table(sorted(result.rows, key=lambda r: (order[r["variant"]], r["alpha"]))))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return result, paths


def run(args: argparse.Namespace) -> int:
    from ..core.config import merge_cli
    from ..evaluate.sweep import SweepConfig

    keys = [f.name for f in dataclasses.fields(SweepConfig)]
    cfg = merge_cli(SweepConfig, args.config, cli_values(args, keys))
    run_sweep(cfg)
    return 0
