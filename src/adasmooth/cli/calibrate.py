"""``adasmooth calibrate``: set the mixing network's shift (or alpha range) for a target clean accuracy,
find the fixed alpha with the same clean accuracy, and optionally print the Table 2/3 comparison."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..core.config import merge_cli
from .common import add_common, add_data, add_threat, cli_values, parse_floats


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, output_default="<checkpoint>-calibrated")
    add_data(p)
    add_threat(p)
    p.add_argument("checkpoints", nargs="*", help="adaptive classifier checkpoint(s) from train-mixnet")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-acc", type=float, default=None, help="clean accuracy (%%) to reach")
    target.add_argument("--target-between", type=float, default=None,
                        help="target = acc(h) + this fraction of acc(g) - acc(h) on the calibration data")
    p.add_argument("--param", choices=["shift", "alpha_min"], default=None,
                   help="what to tune: the sigmoid shift (default) or alpha_min with a fixed range width")
    p.add_argument("--scale", type=float, default=None, help="eval-time sigmoid scale")
    p.add_argument("--alpha-range", type=parse_floats, default=None, help="eval-time alpha range MIN,MAX")
    p.add_argument("--range-width", type=float, default=None, help="alpha_max - alpha_min with --param alpha_min")
    p.add_argument("--split", choices=["val", "test"], default=None,
                   help="calibration data: held-out training part (val, default) or a test slice")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out part of the training set (default 0.1)")
    p.add_argument("--calib-offset", type=int, default=None, help="first calibration example of the split")
    p.add_argument("--calib-examples", type=int, default=None, help="number of calibration examples (default all)")
    p.add_argument("--report", action="store_const", const=True, default=None,
                   help="also evaluate g, h, the adaptive and the fixed-alpha classifiers under settings A-D")
    p.add_argument("--report-settings", type=lambda t: [s.strip() for s in t.split(",") if s.strip()], default=None,
                   help="columns of the report (default A,B,C,D)")
    p.add_argument("--eval-examples", type=int, default=None, help="test examples in the report (default 500)")
    p.add_argument("--eval-offset", type=int, default=None, help="first test example of the report")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", default=None, help="result JSON (default <output>.calibration.json)")


def run(args: argparse.Namespace) -> int:
    from ..evaluate.calibrate import CalibrateConfig, run_calibration
    from ..core.io import format_table, write_result

    keys = [f.name for f in dataclasses.fields(CalibrateConfig)]
    values = cli_values(args, keys)
    values["mixnet"] = args.checkpoints or None
    cfg = merge_cli(CalibrateConfig, args.config, values)
    results = run_calibration(cfg)
    print(f"target clean accuracy {results['target_acc']:.2f}% on {results['calibration']['examples']} "
          f"{cfg.split} examples (g {results['calibration']['std_clean_acc']:.2f}%, "
          f"h {results['calibration']['rob_clean_acc']:.2f}%)")
    for a in results["adaptive"]:
        print(f"  {a['checkpoint']}: {a['param']} = {a['value']:.4f} -> clean {a['clean_acc']:.2f}% "
              f"(mean alpha {a['alpha_mean']:.3f}){'' if a['reached'] else ' [target NOT reached]'}; "
              f"wrote {a['calibrated']}.safetensors")
    f = results["fixed"]
    print(f"  fixed alpha = {f['alpha']:.4f} -> clean {f['clean_acc']:.2f}%{'' if f['reached'] else ' [target NOT reached]'}")
    if "report" in results:
        r = results["report"]
        print(f"\nclean and attacked accuracy (%) on {r['examples']} test examples, {r['norm']} eps={r['eps']}:")
        print(format_table(r["rows"]))
    out = args.json or (results["adaptive"][0]["calibrated"] + ".calibration.json")
    write_result(Path(out), results, cfg, cfg.seed)
    print(f"wrote {out}")
    return 0
