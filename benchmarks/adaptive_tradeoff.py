"""Does adaptive smoothing beat a fixed alpha? The whole clean / worst-case trade-off, four methods, paired.

For each data set (Fashion-MNIST l_inf eps 0.1 and MNIST l_inf eps 0.3 by default):

1. g and h: the shared small CNNs of benchmarks/common.py (standard; PGD-trained on Fashion-MNIST,
   TRADES-trained on MNIST, where PGD training of this small network does not leave chance).
2. Calibration images: the first ``--calib-examples`` of the held-out part of the training set (val
   split, 10 %, seed 0), the images the mixing networks never train on. Evaluation images: the first
   ``--eval-examples`` test images, the same for every method.
3. MixedNUTS's training-free fit: h's minimum-margin APGD points on the calibration images.
4. Two mixing networks, trained with the paper's recipe sized for a CPU (setting C: one APGD-CE and
   ``--n-targets`` targeted APGD-DLR copies of each input, chi-squared(``--attack-steps``) steps,
   ``--extra-clean`` extra clean batches, EMA 0.95, exponential warm-up, best epoch kept):
   "adaptive" (Eq. 3.4) and "nonlinear + adaptive" (MixedNUTS map of h, hardmax g).
5. For every target clean accuracy (``--targets``: fractions of the gap between h and g on the
   calibration images) every method is calibrated: fixed alpha (bisection), nonlinear ((s, c, p, alpha)
   at the target), and both adaptive ones with ``calibrate``'s default: alpha confined to a range whose
   floor and width are chosen by setting D's worst case on the calibration images.
6. Each calibrated classifier is attacked on the evaluation images with A, B, D, surrogate, std and
   rob transfer and the reference AutoAttack (pyautoattack, end to end) in a cascade (each attack only on
   the images every earlier attack left correct, so the worst case is exact and cheaper).
7. Against fixed alpha at the same target: the paired difference of worst-case accuracy on the same
   images with a 95 % interval. The goal of issue 20: adaptive >= fixed + 3 points somewhere, interval
   excluding 0. The interval is Agresti-Min's for matched proportions
   (adasmooth.evaluate.paired).

    PYTHONPATH=src:benchmarks python benchmarks/adaptive_tradeoff.py [--quick] [--datasets fashion-mnist]

On one core of a shared 2-core machine (ADASMOOTH_THREADS=1) the defaults took about 3 hours for
Fashion-MNIST (two mixing networks, 12 minutes each; 14 measured rows, 6-11 minutes each, more for the
strongest classifiers); ``--targets 0.5`` measures the middle target alone. ``--quick`` is a
smoke run of a few minutes. Writes benchmarks/results/adaptive_tradeoff/{results-<datasets>.json,
tradeoff-<datasets>.png} (and, after every measured row, results-<datasets>-partial.json; ``--resume``
keeps those rows after an interruption and measures only the missing ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn

import torch

from adasmooth.core.io import format_table, write_result
from adasmooth.core.plotting import pyplot, save_figure
from adasmooth.data.base import Dataset, load_dataset
from adasmooth.evaluate.calibrate import _base_logits
from adasmooth.evaluate.mixednuts import grid_search_nonlinear, nonlinear_grid, robust_margin_logits
from adasmooth.evaluate.paired import paired_difference
from adasmooth.evaluate.robustness import evaluate_robustness
from adasmooth.mixing import MixedClassifier
from adasmooth.mixing.nonlinear import NonlinearParams
from adasmooth.train.mixnet import MixnetTrainConfig, clean_accuracy, train_mixnet

import common

OUT = common.RESULTS / "adaptive_tradeoff"
AA = common.REFERENCE_AUTOATTACK
# cheapest first: the cascade runs each later attack only on the images still correct
ATTACK_ORDER = ["std", "rob", "A", "B", "surrogate", "D", AA]
METHODS = ("fixed alpha", "nonlinear", "adaptive", "nonlinear + adaptive")
DATASETS = {"fashion-mnist": ("fmnist-std", "fmnist-pgd", 0.1), "mnist": ("mnist-std", "mnist-trades", 0.3)}


def _attack_options(args) -> dict[str, Any]:
    return {"apgd_steps": args.apgd_steps, "n_target_classes": args.n_target_classes, "pgd_steps": args.pgd_steps}


def _evaluate(model, data, eps, args) -> dict[str, Any]:
    t0 = time.time()
    rep = evaluate_robustness(model, data, attacks=ATTACK_ORDER, eps=eps, batch_size=250, seed=0,
                              progress=not args.no_progress, cascade=True, attack_options=_attack_options(args))
    worst = rep.worst_case()
    broken_first = {a: sum(1 for v in rep.robust[a] if v is False) for a in ATTACK_ORDER}
    return {"clean": rep.accuracy(), "worst": 100.0 * sum(worst) / rep.n, "per_image_worst": [int(v) for v in worst],
            "broken_by_cascade": broken_first, "seconds": time.time() - t0}


def _train_mixnets(name: str, std: str, rob: str, eps: float, params: NonlinearParams, args) -> dict[str, str]:
    paths = {}
    for method, rule in (("adaptive", "prob"), ("nonlinear + adaptive", "nonlinear")):
        if method not in _methods(args):
            continue
        out = OUT / f"{name}-mixnet-{rule}"
        paths[method] = str(out)
        if (args.reuse or args.resume) and (OUT / f"{out.name}.safetensors").is_file():
            continue
        cfg = MixnetTrainConfig(
            std=std, rob=rob, dataset=name, data_dir=str(common.data_dir()), eps=eps, recipe="paper",
            n_targets=args.n_targets, attack_steps=args.attack_steps, extra_clean=args.extra_clean,
            features=args.features, widths=[int(w) for w in args.widths.split(",")], blocks=[1, 1, 1],
            epochs=args.epochs, batch_size=args.batch_size, n_train=args.n_train, lr=args.lr,
            monitor_examples=args.monitor_examples, rule=rule, nonlinear=params, eval_examples=100,
            eval_pgd_steps=10, seed=0, device=args.device, output=str(out), progress=not args.no_progress)
        meta = train_mixnet(cfg)
        print(f"  trained {method}: kept epoch {meta['training']['kept_epoch']}, "
              f"{meta['training']['seconds']:.0f} s; per-epoch held-out: "
              + "; ".join(f"e{r['epoch']} att {r['monitor']['attacked_acc']:.1f} auc {r['monitor']['detection_auc']:.2f}"
                          for r in meta["training"]["history"] if "monitor" in r), flush=True)
    return paths


def run_dataset(name: str, args) -> dict[str, Any]:
    std_name, rob_name, eps = DATASETS[name]
    eps = args.eps if args.eps is not None else eps
    t_start = time.time()
    g, _ = common.base_model(std_name, args.device)
    h, _ = common.base_model(rob_name, args.device)
    std, rob = str(common.CACHE / std_name), str(common.CACHE / rob_name)
    data_dir = str(common.data_dir())
    val = load_dataset(name, "val", data_dir, 0.1, 0)
    calib = Dataset(val.x[:args.calib_examples], val.y[:args.calib_examples], val.num_classes, name, "val")
    evald = load_dataset(name, "test", data_dir).subset(args.eval_examples)
    acc_g, acc_h = clean_accuracy(g, calib), clean_accuracy(h, calib)
    print(f"\n{name}, l_inf eps={eps}: g {acc_g:.2f}% / h {acc_h:.2f}% clean on {len(calib)} calibration images",
          flush=True)

    attacked, wrong = robust_margin_logits(h, calib, eps, "linf", args.apgd_steps, 250, seed=0)
    grid = nonlinear_grid(args.grid_size)
    fit = grid_search_nonlinear(attacked, wrong, grid, args.beta)
    params = NonlinearParams(s=fit["s"], c=fit["c"], p=fit["p"])
    t0 = time.time()
    mixnet = _train_mixnets(name, std, rob, eps, params, args)
    train_seconds = time.time() - t0
    ctx = {"g": g, "h": h, "calib": calib, "attacked": attacked, "grid": grid, "mixnet": mixnet, "device": args.device,
           "logits": _base_logits(g, h, calib),
           "range": {"widths": [float(w) for w in args.range_widths.split(",")], "eps": eps,
                     "attack_examples": args.range_attack_examples, "apgd_steps": args.apgd_steps,
                     "n_target_classes": args.n_target_classes, "batch_size": 250}}

    rows: list[dict[str, Any]] = []
    earlier = _earlier_rows(name, args) if args.resume else {}
    for label, alpha in (("g (standard)", 0.0), ("h (robust)", 1.0)):
        r = earlier.get((label, None)) or _evaluate(MixedClassifier(g, h, alpha).eval(), evald, eps, args)
        rows.append({**r, "method": label, "target": None})
    for frac in [float(f) for f in args.targets.split(",")]:
        target = acc_h + frac * (acc_g - acc_h)
        fixed_outcomes = None
        for method in METHODS:  # earlier rows of methods not chosen now are kept as they are
            if (method, frac) in earlier:
                row = earlier[(method, frac)]
                r = row
            elif method not in _methods(args):
                continue
            else:
                model, fit_info = common.calibrated_mixture(method, target, ctx)
                r = _evaluate(model, evald, eps, args)
                row = {"method": method, "fraction": frac, "target": target, **r, "fit": _plain(fit_info)}
            if method == "fixed alpha":
                fixed_outcomes = r["per_image_worst"]
            elif fixed_outcomes is None:
                _fail(f"--methods: {method} is compared with fixed alpha, which is neither among "
                      "the methods nor in an earlier run's rows (--resume)")
            else:
                paired = paired_difference(r["per_image_worst"], fixed_outcomes)
                diff, (lo, hi) = paired["difference"], paired["interval"]
                row["vs_fixed"] = {"difference": diff, "low": lo, "high": hi}
            rows.append(row)
            write_result(OUT / f"{_run_name(args)}-partial.json", {"dataset": name, "rows": rows}, vars(args), 0)
            print(f"  target {target:.2f}% ({frac:g}): {method:22s} clean {r['clean']:.2f}  worst {r['worst']:.2f}"
                  + (f"  vs fixed {diff:+.2f} [{lo:+.2f}, {hi:+.2f}]" if "vs_fixed" in row else "")
                  + f"  ({r['seconds']:.0f} s)", flush=True)
    return {"dataset": name, "eps": eps, "norm": "linf", "std_calib_acc": acc_g, "rob_calib_acc": acc_h,
            "calib_examples": len(calib), "eval_examples": len(evald), "beta_fit": _plain(fit),
            "mixnet_train_seconds": train_seconds, "rows": rows, "seconds": time.time() - t_start}


# options that do not change a measured row: a resumed run may differ in these
_RESUME_FREE = ("targets", "methods", "reuse", "resume", "no_progress")


def _fail(message: str) -> NoReturn:
    """A bad option or file: one line, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _methods(args) -> list[str]:
    """The methods to measure (``--methods``), in the benchmark's order; exit 2 on an unknown name."""
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        _fail(f"--methods {args.methods!r}: choose among {', '.join(METHODS)}")
    return [m for m in METHODS if m in chosen]


def _earlier_rows(name: str, args) -> dict[tuple, dict]:
    """Rows of an interrupted run (its partial file), keyed by (method, fraction); {} when there is none.

    Refuses (exit 2) a partial file made with other options: its rows would not be comparable."""
    path = OUT / f"{_run_name(args)}-partial.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
        config, rows = saved["config"], saved["results"]["rows"]
    except (ValueError, KeyError, TypeError) as err:
        _fail(f"{path}: not a partial result of this benchmark ({err}); delete it or drop --resume")
    if saved["results"].get("dataset") != name:
        return {}
    differ = sorted(k for k, v in vars(args).items() if k not in _RESUME_FREE and config.get(k, v) != v)
    if differ:
        _fail(f"{path} was measured with other options ({', '.join(differ)}); "
              "rerun them as they were or drop --resume")
    print(f"  resuming: {len(rows)} rows measured earlier ({path.name})", flush=True)
    return {(r["method"], r.get("fraction")): r for r in rows}


def _run_name(args) -> str:
    """results[-quick]-<datasets>: parallel runs on different data sets write different files."""
    return "results" + ("-quick" if args.quick else "") + "-" + args.datasets.replace(",", "-")


def _plain(d: dict) -> dict:
    """JSON-friendly copy: drop bulky arrays."""
    return {k: v for k, v in d.items() if k not in ("objectives",) and not hasattr(v, "shape")}


def plot(results: list[dict], path, args):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    markers = {"fixed alpha": "o-", "nonlinear": "s-", "adaptive": "^-", "nonlinear + adaptive": "v-"}
    for ax, res in zip(axes[0], results):
        n = res["eval_examples"]
        for method in METHODS:
            pts = sorted((r["clean"], r["worst"], r["fraction"]) for r in res["rows"] if r["method"] == method)
            if not pts:
                continue
            xs, ys, fr = zip(*pts)
            err = [1.96 * (y * (100 - y) / n) ** 0.5 for y in ys]  # normal interval of each accuracy
            ax.errorbar(xs, ys, yerr=err, fmt=markers[method], capsize=3, label=method)
            if method == "fixed alpha":
                for x, y, f in pts:
                    ax.annotate(f"target {f:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        for r in res["rows"]:
            if r["target"] is None:
                ax.plot(r["clean"], r["worst"], "kx")
                ax.annotate(r["method"], (r["clean"], r["worst"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel(f"clean accuracy (%), {n} test images")
        ax.set_ylabel("worst-case robust accuracy (%)")
        ax.set_title(f"{res['dataset']}, l_inf eps={res['eps']}: worst case over std, rob, A, B, surrogate, D and\n"
                     f"AutoAttack (pyautoattack; APGD {args.apgd_steps} steps, {args.n_target_classes} targets, "
                     f"Square {args.square_queries} queries); bars: 95 % intervals", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="fashion-mnist,mnist")
    ap.add_argument("--eps", type=float, default=None, help="one radius for every data set (default 0.1 / 0.3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--targets", default="0.5,0.25,0.75", help="target clean accuracies: fractions of the h-g gap "
                    "(measured in this order: the middle one first)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS)
                    + " (fixed alpha is the reference of the others: measure it too, or have it from --resume); "
                    "runs of different methods can share one result through --resume")
    ap.add_argument("--calib-examples", type=int, default=1000)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--range-widths", default="0.02,0.05,0.1,0.2,0.4,1.0")
    ap.add_argument("--range-attack-examples", type=int, default=200)
    # mixing-network training: the paper's recipe, sized for a CPU
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-targets", type=int, default=2)
    ap.add_argument("--attack-steps", type=int, default=20)
    ap.add_argument("--extra-clean", type=int, default=2)
    ap.add_argument("--features", default="both", choices=["both", "rob", "std"])
    ap.add_argument("--widths", default="16,32,64")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--monitor-examples", type=int, default=200)
    # evaluation attacks
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--apgd-steps", type=int, default=20)
    ap.add_argument("--n-target-classes", type=int, default=3)
    ap.add_argument("--square-queries", type=int, default=500)
    ap.add_argument("--grid-size", type=int, default=8)
    ap.add_argument("--beta", type=float, default=98.5)
    ap.add_argument("--reuse", action="store_true", help="reuse mixing networks of an earlier run")
    ap.add_argument("--resume", action="store_true", help="keep the rows of an interrupted run (its partial "
                    "file; same options required) and its mixing networks; measure only what is missing")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.epochs, args.eval_examples, args.calib_examples, args.monitor_examples = 200, 1, 40, 200, 40
        args.apgd_steps, args.n_target_classes, args.grid_size, args.square_queries = 5, 2, 3, 50
        args.pgd_steps, args.attack_steps, args.range_attack_examples, args.targets = 3, 3, 40, "0.5"
        args.range_widths = "0.1,1.0"
    _methods(args)  # refuse an unknown name before hours of work
    torch.set_num_threads(int(os.environ.get("ADASMOOTH_THREADS", "1")))
    common.SQUARE_QUERIES["value"] = args.square_queries
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = [run_dataset(name, args) for name in args.datasets.split(",")]
    for res in results:
        table = [{"method": r["method"], "target": "" if r["target"] is None else f"{r['target']:.2f}",
                  "clean": r["clean"], "worst": r["worst"],
                  "vs fixed (95% interval)": (f"{r['vs_fixed']['difference']:+.2f} [{r['vs_fixed']['low']:+.2f}, "
                                              f"{r['vs_fixed']['high']:+.2f}]") if "vs_fixed" in r else "",
                  "seconds": r["seconds"]} for r in res["rows"]]
        print(f"\n{res['dataset']}, l_inf eps={res['eps']}, {res['eval_examples']} test images (g {res['std_calib_acc']:.2f}% "
              f"/ h {res['rob_calib_acc']:.2f}% clean on {res['calib_examples']} calibration images):")
        print(format_table(table))
        best = max((r for r in res["rows"] if r["method"] == "adaptive"), key=lambda r: r["vs_fixed"]["low"],
                   default=None)
        if best is not None:
            v = best["vs_fixed"]
            met = v["difference"] >= 3 and v["low"] > 0
            print(f"goal (adaptive >= fixed + 3 points, interval above 0): {'MET' if met else 'NOT met'}; best "
                  f"target {best['target']:.2f}%: {v['difference']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]")
    name = _run_name(args)
    path = write_result(OUT / f"{name}.json", {"datasets": results, "seconds": time.time() - t0}, vars(args), 0)
    png = plot(results, OUT / f"{name.replace('results', 'tradeoff')}.png", args)
    print(f"wrote {path} and {png} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
