"""``adasmooth sweep``: clean / STD / ROB / MIX accuracy of fixed-alpha mixtures of two checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..evaluate.sweep import SweepConfig
from ..models.checkpoint import check_input_shape, recorded_dataset, recorded_threat, load_checkpoint_data
from .common import checkpoint_files, narrate

CONFIG = SweepConfig
OUTPUT_FILES = ("sweep.json", "sweep.csv", "accuracy_vs_alpha.png", "tradeoff.png")


def files(cfg: SweepConfig) -> tuple[list, list]:
    return checkpoint_files(cfg.std, cfg.rob), [Path(cfg.output) / name for name in OUTPUT_FILES]


def load_pair(std_path: str, rob_path: str, device, model_dir: str | None = None) -> tuple[Any, dict, Any, dict]:
    """Both models (any model spec), after checking that they can be mixed."""
    from ..models.loader import load_model

    g, g_info = load_model(std_path, device, model_dir=model_dir)
    h, h_info = load_model(rob_path, device, model_dir=model_dir)
    if None not in (g_info["num_classes"], h_info["num_classes"]) and g_info["num_classes"] != h_info["num_classes"]:
        raise ValueError(f"the checkpoints disagree on the class count: {std_path} has {g_info['num_classes']}, "
                         f"{rob_path} has {h_info['num_classes']}")
    return g, g_info, h, h_info


def write_outputs(out_dir: Path, result, config, seed: int, progress_note: str | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """JSON (with config, seed, provenance), CSV and (with ``plots``) the two plots of a sweep."""
    from ..evaluate.plots import describe_attack, plot_accuracy_vs_alpha, plot_tradeoff
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
        attack = describe_attack(config.steps, config.norm, config.eps)
        paths["accuracy_vs_alpha"] = plot_accuracy_vs_alpha(
            result.rows, result.reference, out_dir / "accuracy_vs_alpha.png", variant=first,
            attack=attack, n_examples=result.n_examples)
        paths["tradeoff"] = plot_tradeoff(
            result.rows, out_dir / "tradeoff.png", result.reference, labels=variant_labels(),
            attack=attack, n_examples=result.n_examples)
    return paths


def run_sweep(cfg, g=None, h=None, g_info=None, h_info=None) -> tuple[Any, dict[str, Path]]:
    """Load what ``cfg`` names (unless given), sweep, write outputs after every alpha; print the table."""
    from ..core.io import format_table
    from ..evaluate.sweep import alpha_sweep
    from ..core.runtime import resolve_device, seed_everything

    device = resolve_device(cfg.device)
    if g is None or h is None:
        if not cfg.std or not cfg.rob:
            raise ValueError("give both checkpoints: --std CKPT (standard model g) and --rob CKPT (robust model h)")
        g, g_info, h, h_info = load_pair(cfg.std, cfg.rob, device, cfg.model_dir)
    infos = {cfg.std or "g": g_info or {}, cfg.rob or "h": h_info or {}}
    dataset = recorded_dataset(cfg.dataset, infos, cfg.force_dataset)
    eps, norm = recorded_threat(cfg.eps, cfg.norm, h_info or {}, cfg.rob or "h")
    image, data = load_checkpoint_data(cfg, infos, dataset, "test")
    cfg = dataclasses.replace(cfg, dataset=dataset, eps=eps, norm=norm, image=image)
    data = data.subset(cfg.n_examples)
    check_input_shape(infos, data.input_shape, dataset)
    n_classes = (g_info or {}).get("num_classes") or data.num_classes
    if n_classes != data.num_classes:
        raise ValueError(f"{dataset} has {data.num_classes} classes but the checkpoints have {n_classes}")
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output)
    narrate(f"sweep: {len(cfg.alphas)} alphas x {len(cfg.variants)} variant(s) on {len(data)} {dataset} test examples, "
          f"PGD-{cfg.steps} {norm} eps={cfg.eps}")

    def save_partial(partial) -> None:
        write_outputs(out_dir, partial, cfg, cfg.seed, progress_note=f"partial: {len(partial.rows)} rows",
                      plots=False)

    result = alpha_sweep(g.to(device), h.to(device), data, cfg.alphas, cfg.eps, norm=cfg.norm, steps=cfg.steps,
                         step_size=cfg.step_size, variants=cfg.variants, batch_size=cfg.batch_size, seed=cfg.seed,
                         std_scale=cfg.std_scale, rob_scale=cfg.rob_scale, progress=cfg.progress,
                         rule_params=cfg.rule_params, on_alpha=save_partial)
    paths = write_outputs(out_dir, result, cfg, cfg.seed, progress_note="complete")
    ref = result.reference
    print(f"g alone: clean {ref['g_clean_acc']:.2f}%, under PGD on g {ref['g_std_attack_acc']:.2f}%;  "
          f"h alone: clean {ref['h_clean_acc']:.2f}%, under PGD on h {ref['h_rob_attack_acc']:.2f}%")
    order = {v: i for i, v in enumerate(cfg.variants)}
    print(format_table(sorted(result.rows, key=lambda r: (order[r["variant"]], r["alpha"]))))
    narrate("wrote " + ", ".join(str(p) for p in paths.values()))
    return result, paths


def run(cfg: SweepConfig) -> int:
    run_sweep(cfg)
    return 0
