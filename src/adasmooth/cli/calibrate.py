"""``adasmooth calibrate``: set the mixing network's shift (or alpha range) for a target clean accuracy,
find the fixed alpha with the same clean accuracy, and optionally print the Table 2/3 comparison."""

from __future__ import annotations

from pathlib import Path

from ..evaluate.calibrate import CalibrateConfig
from .common import checkpoint_files

CONFIG = CalibrateConfig


def files(cfg: CalibrateConfig) -> tuple[list, list]:
    from ..evaluate.calibrate import calibrated_output

    outputs = checkpoint_files(*(calibrated_output(cfg, m) for m in cfg.mixnet))
    if cfg.mixnet:
        outputs.append(calibrated_output(cfg, cfg.mixnet[0]) + ".calibration.json")
    return checkpoint_files(*cfg.mixnet), outputs


def run(cfg: CalibrateConfig) -> int:
    from ..core.io import format_table, write_result
    from ..evaluate.calibrate import run_calibration

    results = run_calibration(cfg)
    target = "none" if results["target_acc"] is None else f"{results['target_acc']:.2f}%"
    print(f"target clean accuracy {target} on {results['calibration']['examples']} "
          f"{cfg.split} examples (g {results['calibration']['std_clean_acc']:.2f}%, "
          f"h {results['calibration']['rob_clean_acc']:.2f}%)")
    for a in results["adaptive"]:
        print(f"  {a['checkpoint']}: {a['param']} = {a['value']:.4f} -> clean {a['clean_acc']:.2f}% "
              f"(mean alpha {a['alpha_mean']:.3f}){'' if a['reached'] else ' [target NOT reached]'}; "
              f"wrote {a['calibrated']}.safetensors")
    f = results.get("fixed")
    if f is not None:
        print(f"  fixed alpha = {f['alpha']:.4f} -> clean {f['clean_acc']:.2f}%{'' if f['reached'] else ' [target NOT reached]'}")
    if "nonlinear" in results:
        from ..evaluate.calibrate import describe_nonlinear

        print(describe_nonlinear(results["nonlinear"]))
    if "report" in results:
        r = results["report"]
        print(f"\nclean and attacked accuracy (%) on {r['examples']} test examples, {r['norm']} eps={r['eps']}:")
        print(format_table(r["rows"]))
    out = results["results_file"]
    write_result(Path(out), results, cfg, cfg.seed)
    print(f"wrote {out}")
    return 0
