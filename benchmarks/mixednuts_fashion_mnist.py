"""Fixed alpha vs nonlinear (MixedNUTS) vs adaptive vs nonlinear + adaptive on Fashion-MNIST (l_inf, eps 0.1).

g = the shared standard small CNN, h = the shared PGD-trained small CNN (benchmarks/common.py).

1. MixedNUTS calibration, training-free: h's margins on the calibration images (test images
   5000.., 1000 by default) attacked with APGD-CE + APGD-T (minimum-margin), the 8 x 8 x 8 (s, c, p)
   grid for beta = 98.5; its (s, c, p) is the map of the nonlinear + adaptive classifier.
2. Two mixing networks (setting B training attacks, with PGD momentum decay U(0, 0.9) and one
   extra clean batch per batch): "adaptive" (Eq. 3.4) and "nonlinear + adaptive" (hardmax g,
   transformed h).
3. Each of the four classifiers calibrated to the same clean accuracy, halfway between h and g
   (fixed: alpha; nonlinear: (s, c, p, alpha) at the target; adaptive ones: ``calibrate``'s default,
   alpha confined to the range whose floor and width setting D attacks least on the calibration images).
4. Each attacked on the first test images with A, B, D, surrogate, std and rob transfer, and the
   reference AutoAttack (pyautoattack standard, end to end); the worst case over all of them.
5. The clean accuracy each reaches at 95 % of h's robust accuracy: the same calibrations at more
   targets (``--curve``, fractions of the g - h gap), attacked with everything but the reference
   AutoAttack (the slowest), h itself as the point at fraction 0, and the crossing interpolated
   linearly between measured (clean, robust) points.

    PYTHONPATH=src:benchmarks python benchmarks/mixednuts_fashion_mnist.py [--quick] [--device cuda]

Defaults are sized for one CPU core in under 25 minutes (ADASMOOTH_THREADS=1): 200 test images,
mixing networks trained on 2000 images for 2 epochs, APGD cut to 20 steps and 2 target classes
everywhere (AutoAttack's APGD-T and FAB-T too, its Square to 1000 queries).
Writes benchmarks/results/mixednuts_fashion_mnist/results.json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from adasmooth.core.io import format_table, write_result
from adasmooth.data.base import Dataset, load_dataset
from adasmooth.evaluate.calibrate import _base_logits
from adasmooth.evaluate.mixednuts import grid_search_nonlinear, nonlinear_grid, robust_margin_logits
from adasmooth.evaluate.robustness import evaluate_robustness
from adasmooth.mixing.nonlinear import NonlinearParams
from adasmooth.train.mixnet import MixnetTrainConfig, clean_accuracy, train_mixnet

import common

OUT = common.RESULTS / "mixednuts_fashion_mnist"
AA = common.REFERENCE_AUTOATTACK
MIXED_ATTACKS = ["A", "B", "D", "surrogate", "std", "rob", AA]
BASE_ATTACKS = ["pgd", "apgd-ce", "apgd-t", AA]
METHODS = ("fixed alpha", "nonlinear", "adaptive", "nonlinear + adaptive")




def _worst(report, attacks) -> float:
    ok = [c and all(report.robust[a][i] is not False for a in attacks) for i, c in enumerate(report.clean_correct)]
    return 100.0 * sum(ok) / max(1, len(ok))


def _evaluate(model, data, attacks, args, progress) -> dict[str, Any]:
    t0 = time.time()
    rep = evaluate_robustness(model, data, attacks=attacks, eps=args.eps, batch_size=250, seed=0, progress=progress,
                              attack_options={"apgd_steps": args.apgd_steps, "n_target_classes": args.n_target_classes})
    row = {"clean": rep.accuracy(), **{a: rep.accuracy(a) for a in attacks}, "worst": _worst(rep, attacks),
           "worst_without_autoattack": _worst(rep, [a for a in attacks if a != AA]),
           "seconds": time.time() - t0}
    return row


def _clean_at(points: list[tuple[float, float]], robust_target: float) -> float | None:
    """The highest clean accuracy at which the robust accuracy is still >= ``robust_target``: the best
    measured point that reaches it, or a crossing interpolated linearly between neighbouring measured
    (clean, robust) points (sorted by clean accuracy); None when no point reaches it."""
    pts = sorted(points)
    best = max((c for c, r in pts if r >= robust_target), default=None)
    for (c0, r0), (c1, r1) in zip(pts, pts[1:]):
        if r0 >= robust_target > r1:
            crossing = c0 + (c1 - c0) * (r0 - robust_target) / (r0 - r1)
            best = crossing if best is None else max(best, crossing)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--attack-steps", type=int, default=5, help="mean steps of the training attacks")
    ap.add_argument("--extra-clean", type=int, default=1, help="extra clean batches per batch in mixnet training")
    ap.add_argument("--ema-decay", type=float, default=None, help="EMA of the mixing-network weights (e.g. 0.8)")
    ap.add_argument("--widths", default="16,32,64")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--target-between", type=float, default=0.5)
    ap.add_argument("--curve", default="0.25", help="more targets (fractions of the gap) for the 95%% point")
    ap.add_argument("--calib-examples", type=int, default=1000)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--apgd-steps", type=int, default=20)
    ap.add_argument("--n-target-classes", type=int, default=2)
    ap.add_argument("--square-queries", type=int, default=1000, help="query budget of AutoAttack's Square")
    ap.add_argument("--grid-size", type=int, default=8)
    ap.add_argument("--beta", type=float, default=98.5)
    ap.add_argument("--reuse", action="store_true", help="reuse mixing networks of an earlier run")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.epochs, args.eval_examples, args.calib_examples = 200, 1, 40, 200
        args.apgd_steps, args.n_target_classes, args.grid_size, args.square_queries = 5, 2, 3, 100
    torch.set_num_threads(int(os.environ.get("ADASMOOTH_THREADS", "1")))
    progress = not args.no_progress
    common.SQUARE_QUERIES["value"] = args.square_queries
    device = torch.device(args.device)
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    g, _ = common.base_model("fmnist-std", args.device)
    h, _ = common.base_model("fmnist-pgd", args.device)
    std_path, rob_path = str(common.CACHE / "fmnist-std"), str(common.CACHE / "fmnist-pgd")
    data_dir = str(common.data_dir())
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    calib = Dataset(test.x[5000:5000 + args.calib_examples], test.y[5000:5000 + args.calib_examples], 10,
                    "fashion-mnist", "test")
    evald = test.subset(args.eval_examples)
    acc_g, acc_h = clean_accuracy(g, calib), clean_accuracy(h, calib)

    # 1. MixedNUTS, training-free
    t0 = time.time()
    attacked, wrong = robust_margin_logits(h, calib, args.eps, "linf", args.apgd_steps, 250, seed=0)
    grid = nonlinear_grid(args.grid_size)
    fit = grid_search_nonlinear(attacked, wrong, grid, args.beta)
    timings["nonlinear calibration"] = time.time() - t0
    print(f"MixedNUTS beta {args.beta}: s={fit['s']:.4g} c={fit['c']:.4g} p={fit['p']:.4g} alpha={fit['alpha']:.6f}, "
          f"objective {100 * fit['objective']:.2f}% ({len(attacked)} attacked-correct, {len(wrong)} clean-wrong)")
    params = NonlinearParams(s=fit["s"], c=fit["c"], p=fit["p"])

    # 2. mixing networks
    mixnet = {}
    training = {}
    for method, rule in (("adaptive", "prob"), ("nonlinear + adaptive", "nonlinear")):
        out = OUT / ("mixnet-" + rule + (f"-ema{args.ema_decay:g}" if args.ema_decay else ""))
        mixnet[method] = str(out)
        t0 = time.time()
        if not (args.reuse and (out.parent / (out.name + ".safetensors")).is_file()):
            cfg = MixnetTrainConfig(
                std=std_path, rob=rob_path, dataset="fashion-mnist", data_dir=data_dir, setting="B", eps=args.eps,
                widths=[int(w) for w in args.widths.split(",")], blocks=[1, 1, 1], attack_steps=args.attack_steps,
                recipe="cheap", epochs=args.epochs, batch_size=args.batch_size, n_train=args.n_train, lr=args.lr,
                extra_clean=args.extra_clean, ema_decay=args.ema_decay, rule=rule, nonlinear=params,
                eval_examples=100, eval_pgd_steps=10, seed=0, device=args.device, output=str(out), progress=progress)
            training[method] = train_mixnet(cfg, train_data=train, eval_data=test)["metrics"]
        timings[f"train {method}"] = time.time() - t0

    ctx = {"device": device, "g": g, "h": h, "calib": calib, "attacked": attacked, "grid": grid, "mixnet": mixnet,
           "logits": _base_logits(g, h, calib),
           "range": {"eps": args.eps, "attack_examples": min(200, len(calib)), "apgd_steps": args.apgd_steps,
                     "n_target_classes": args.n_target_classes}}

    # 3-4. the main point: every classifier at the same clean accuracy, every attack
    target = acc_h + args.target_between * (acc_g - acc_h)
    rows, fits = {}, {}
    for name, model, attacks in (("g (standard)", g, BASE_ATTACKS), ("h (robust)", h, BASE_ATTACKS)):
        rows[name] = _evaluate(model, evald, attacks, args, progress)
    for method in METHODS:
        model, fits[method] = common.calibrated_mixture(method, target, ctx)
        rows[method] = _evaluate(model, evald, MIXED_ATTACKS, args, progress)
        print(f"{method}: {fits[method]} -> {rows[method]}")

    # 5. the clean accuracy at 95 % of h's robust accuracy
    robust_goal = 0.95 * rows["h (robust)"]["worst_without_autoattack"]
    h_point = (rows["h (robust)"]["clean"], rows["h (robust)"]["worst_without_autoattack"])
    curve = {m: [h_point, (rows[m]["clean"], rows[m]["worst_without_autoattack"])] for m in METHODS}
    curve_fits: dict[str, list] = {m: [] for m in METHODS}
    for frac in [float(f) for f in args.curve.split(",") if f.strip()]:
        t = acc_h + frac * (acc_g - acc_h)
        for method in METHODS:
            model, f = common.calibrated_mixture(method, t, ctx)
            r = _evaluate(model, evald, [a for a in MIXED_ATTACKS if a != AA], args, progress)
            curve[method].append((r["clean"], r["worst"]))
            curve_fits[method].append({"fraction": frac, "target": t, "fit": f, "row": r})
    clean_at_95 = {m: _clean_at(curve[m], robust_goal) for m in METHODS}

    columns = ["model", "clean", *dict.fromkeys(a for r in rows.values() for a in r if a not in (
        "clean", "worst", "worst_without_autoattack", "seconds")), "worst", "worst_without_autoattack", "seconds"]
    table = [{"model": name, **r} for name, r in rows.items()]
    print(f"\nFashion-MNIST, l_inf eps={args.eps}, first {len(evald)} test images; calibration on {len(calib)} test images "
          f"5000..: g {acc_g:.2f}%, h {acc_h:.2f}%, target clean {target:.2f}%. APGD {args.apgd_steps} steps, "
          f"{args.n_target_classes} target classes (AutoAttack too, with Square {args.square_queries} queries).")
    print(format_table(table, columns))
    print(f"\nclean accuracy at 95% of h's robust accuracy ({robust_goal:.2f}%, worst case without the reference "
          "AutoAttack), interpolated over (clean, robust) points:")
    for m in METHODS:
        pts = ", ".join(f"({c:.1f}, {r:.1f})" for c, r in sorted(curve[m]))
        v = clean_at_95[m]
        print(f"  {m:22s} {'never reached' if v is None else f'{v:.2f}%'}   points {pts}")
    results = {"rows": rows, "fits": fits, "beta_fit": {k: v for k, v in fit.items() if k != "objectives"},
               "target": target, "std_calib_acc": acc_g, "rob_calib_acc": acc_h, "robust_goal_95": robust_goal,
               "clean_at_95": clean_at_95, "curve": {m: sorted(curve[m]) for m in METHODS}, "curve_fits": curve_fits,
               "mixnet_training": training, "timings": timings, "total_seconds": time.time() - t_start,
               "eval_examples": len(evald), "calib_examples": len(calib)}
    name = "results-quick" if args.quick else "results" + (f"-ema{args.ema_decay:g}" if args.ema_decay else "")
    path = write_result(OUT / f"{name}.json", results, vars(args), 0)
    print(f"wrote {path} ({time.time() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
