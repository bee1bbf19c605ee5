"""``adasmooth calibrate``: confine the mixing network's alpha to the range (floor and width) that survives
setting D best at a target clean accuracy (or set its shift / floor), find the fixed alpha with the same clean
accuracy, compare the two under the same attack, and optionally print the Table 2/3 comparison."""

from __future__ import annotations

from pathlib import Path

from ..evaluate.calibrate import CalibrateConfig
from .common import checkpoint_files, narrate

CONFIG = CalibrateConfig


def files(cfg: CalibrateConfig) -> tuple[list, list]:
    from ..evaluate.calibrate import calibrated_output

    outputs = checkpoint_files(*(calibrated_output(cfg, m) for m in cfg.mixnet))
    if cfg.mixnet:
        outputs.append(calibrated_output(cfg, cfg.mixnet[0]) + ".calibration.json")
    return checkpoint_files(*cfg.mixnet), outputs


def describe_comparison(c: dict) -> str:
    """Both accuracies under the calibration attack, the paired interval, and the verdict in one line."""
    att = c["attack"]
    where = f"setting D on {att['examples']} calibration images"
    lo, hi = c["interval"]
    lines = [f"  {where} ({att['norm']} eps={att['eps']:g}, APGD {att['apgd_steps']} steps): adaptive "
             f"{c['adaptive_acc']:.1f}%, fixed alpha {c['fixed_alpha']:.4f} {c['fixed_acc']:.1f}%; difference "
             f"{c['difference']:+.1f} points, {100 * c['confidence']:g}% paired interval [{lo:+.1f}, {hi:+.1f}]"]
    if c["verdict"] == "better":
        lines.append(f"  adaptive is better than fixed alpha {c['fixed_alpha']:.4f} here ({where})")
    else:
        word = "NOT clearly better" if c["verdict"] == "not clearly better" else "NOT better"
        lines.append(f"  adaptive is {word} than fixed alpha {c['fixed_alpha']:.4f} here ({where}: "
                     f"{c['adaptive_acc']:.1f}% vs {c['fixed_acc']:.1f}%); use a fixed alpha: {c['use_instead']}")
    return "\n".join(lines)


def run(cfg: CalibrateConfig) -> int:
    from ..core.io import format_table, write_result
    from ..evaluate.calibrate import run_calibration

    results = run_calibration(cfg)
    target = "none" if results["target_acc"] is None else f"{results['target_acc']:.2f}%"
    print(f"target clean accuracy {target} on {results['calibration']['examples']} "
          f"{cfg.split} examples (g {results['calibration']['std_clean_acc']:.2f}%, "
          f"h {results['calibration']['rob_clean_acc']:.2f}%)")
    f = results.get("fixed")
    if f is not None:
        print(f"  fixed alpha = {f['alpha']:.4f} -> clean {f['clean_acc']:.2f}%{'' if f['reached'] else ' [target NOT reached]'}")
    for a in results["adaptive"]:
        if a["param"] == "range":
            print(f"  {a['checkpoint']}: alpha range of each width, floor at the target, then setting D on the first "
                  f"{a['attack']['examples']} calibration images:")
            print(format_table([{"width": c["width"], "alpha_min": c["alpha_min"], "alpha_max": c["alpha_max"],
                                 "clean %": c["clean_acc"], "robust %": c["robust_acc"],
                                 "chosen": "<-" if c["width"] == a["width"] else ""} for c in a["candidates"]]))
            head = f"range [{a['eval_head']['alpha_min']:.4f}, {a['eval_head']['alpha_max']:.4f}]"
        else:
            head = f"{a['param']} = {a['value']:.4f}"
        print(f"  {a['checkpoint']}: {head} -> clean {a['clean_acc']:.2f}% "
              f"(mean alpha {a['alpha_mean']:.3f}){'' if a['reached'] else ' [target NOT reached]'}; "
              f"wrote {a['calibrated']}.safetensors")
        print(describe_comparison(a["comparison"]))
    if "nonlinear" in results:
        from ..evaluate.calibrate import describe_nonlinear

        print(describe_nonlinear(results["nonlinear"]))
    if "report" in results:
        r = results["report"]
        print(f"\nclean and attacked accuracy (%) on {r['examples']} test examples, {r['norm']} eps={r['eps']}:")
        print(format_table(r["rows"]))
    out = results["results_file"]
    write_result(Path(out), results, cfg, cfg.seed)
    narrate(f"wrote {out}")
    return 0
