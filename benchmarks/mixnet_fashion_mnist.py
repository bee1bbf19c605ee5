"""Adaptive vs fixed-alpha smoothing at equal clean accuracy on Fashion-MNIST (l_inf, eps = 0.1).

g = the shared standard small CNN, h = the shared PGD-trained small CNN (benchmarks/common.py).
Steps: train a small mixing network against on-the-fly attacks (setting C by default: APGD-CE +
targeted APGD-DLR with the randomly weighted alpha term), calibrate its shift on held-out test
examples 5000.. to a clean accuracy between h's and g's, find the fixed alpha with the same clean
accuracy, then attack both (and g, h) on the first test examples: gray-box PGD-20 (A), white-box
PGD-20 (B), adaptive AutoAttack (D) and optionally AutoAttack (C). The paper claims the adaptive
classifier is more robust than the fixed-alpha one at equal clean accuracy.

    PYTHONPATH=benchmarks python benchmarks/mixnet_fashion_mnist.py [--quick]

Defaults (about 10 minutes on an idle 2-core CPU): 20000 training images, 3 epochs of batch 100,
training attacks of chi-squared(15) steps; evaluation on 500 test images with adaptive AutoAttack
cut to APGD 50 steps and 3 target classes (the full 100 steps / 9 targets is --apgd-steps 100
--n-target-classes 9). ``--range-width 0`` drops the row with a confined alpha range.

Writes benchmarks/results/mixnet_fashion_mnist/{results.json, mixnet*.safetensors}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adasmooth.models.checkpoint import checkpoint_paths, save_checkpoint
from adasmooth.data.base import DATASET_STATS, Dataset, load_dataset
from adasmooth.mixing.adaptive import load_adaptive_classifier
from adasmooth.evaluate.calibrate import calibrate_adaptive, calibrate_fixed_alpha, fixed_alpha_classifier
from adasmooth.evaluate.tables import report_table
from adasmooth.train.mixnet import MixnetTrainConfig, clean_accuracy, train_mixnet
from adasmooth.models.base import create_model
from adasmooth.core.io import format_table, write_result

import common

OUT = common.RESULTS / "mixnet_fashion_mnist"


def _wait_for(name: str, timeout_s: float) -> bool:
    weights, _ = checkpoint_paths(common.CACHE / name)
    t0 = time.time()
    while not weights.is_file():
        if time.time() - t0 > timeout_s:
            return False
        time.sleep(30)
    return True


def _snapshot_checkpoint(name: str) -> tuple[str, str]:
    """The last finished epoch of a base model still in training, exported as a checkpoint.

    Only for when the shared cache is not ready: nothing is trained here, the weights are the ones
    the shared training wrote after its last complete epoch.
    """
    resume = common.CACHE / f"{name}.resume.pt"
    if not resume.is_file():
        raise FileNotFoundError(f"neither {name}.safetensors nor {resume.name} in {common.CACHE}")
    state = torch.load(resume, map_location="cpu", weights_only=True)
    mean, std = DATASET_STATS["fashion-mnist"]
    model = create_model("small-cnn", 10, in_channels=1, mean=mean, std=std, width=16)
    model.load_state_dict(state["model"])
    path = OUT / f"{name}-snapshot-epoch{int(state['epoch'])}"
    save_checkpoint(model, path, {"dataset": "fashion-mnist", "snapshot_of": name, "epoch": int(state["epoch"])})
    return str(path), f"snapshot after epoch {int(state['epoch'])} of {name}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["A", "B", "C"], default="C", help="training-time attack setting")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--attack-steps", type=int, default=15, help="mean steps of the training attacks")
    ap.add_argument("--widths", default="16,32,64")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--target-between", type=float, default=0.5,
                    help="target clean accuracy = acc(h) + this fraction of the gap to acc(g)")
    ap.add_argument("--calib-examples", type=int, default=2000, help="test examples 5000.. used to calibrate")
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--settings", default="A,B,D", help="evaluation columns (C = reference AutoAttack, slow)")
    ap.add_argument("--apgd-steps", type=int, default=50)
    ap.add_argument("--n-target-classes", type=int, default=3)
    ap.add_argument("--wait-s", type=float, default=0, help="wait this long for the cached fmnist-pgd model")
    ap.add_argument("--allow-snapshot", action="store_true",
                    help="if fmnist-pgd is not cached yet, use its last finished epoch")
    ap.add_argument("--range-width", type=float, default=0.1,
                    help="also an adaptive row with alpha confined to (alpha_min, alpha_min + this), alpha_min "
                         "calibrated to the same clean accuracy (paper App. D.1)")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished mixing network of an earlier run")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.epochs, args.eval_examples, args.calib_examples = 300, 1, 40, 300
        args.apgd_steps, args.n_target_classes = 10, 2
    OUT.mkdir(parents=True, exist_ok=True)
    eps, seed = 0.1, 0
    t_start = time.time()

    _, std_info = common.base_model("fmnist-std")
    std_path = str(common.CACHE / "fmnist-std")
    notes = []
    if _wait_for("fmnist-pgd", args.wait_s):
        common.base_model("fmnist-pgd")
        rob_path = str(common.CACHE / "fmnist-pgd")
    elif args.allow_snapshot:
        rob_path, note = _snapshot_checkpoint("fmnist-pgd")
        notes.append(f"h is the {note} (the cached final model was not ready)")
        print("NOTE:", notes[-1])
    else:
        raise SystemExit("fmnist-pgd is not cached yet: wait (--wait-s) or pass --allow-snapshot")

    data_dir = str(common.data_dir())
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    calib = Dataset(test.x[5000:5000 + args.calib_examples], test.y[5000:5000 + args.calib_examples], 10,
                    "fashion-mnist", "test")
    evald = test.subset(args.eval_examples)

    cfg = MixnetTrainConfig(
        std=std_path, rob=rob_path, dataset="fashion-mnist", data_dir=data_dir,
        widths=[int(w) for w in args.widths.split(",")], blocks=[1, 1, 1], setting=args.setting, eps=eps,
        attack_steps=args.attack_steps, epochs=args.epochs, batch_size=args.batch_size, n_train=args.n_train,
        lr=args.lr, eval_examples=min(200, args.eval_examples), eval_pgd_steps=10, seed=seed, device="cpu",
        output=str(OUT / f"mixnet-{args.setting}"), progress=not args.no_progress,
    )
    t0 = time.time()
    sidecar = Path(cfg.output + ".json")
    if args.reuse and sidecar.is_file() and "metrics" in json.loads(sidecar.read_text()):
        meta = json.loads(sidecar.read_text())
        notes.append(f"mixing network reused from {cfg.output} (trained in an earlier run)")
    else:
        meta = train_mixnet(cfg, train_data=train, eval_data=test)
    train_s = time.time() - t0
    print(f"mixing network trained in {train_s:.0f} s: {meta['metrics']}")

    model, _ = load_adaptive_classifier(cfg.output)
    g, h = model.std_model, model.rob_model
    acc_g, acc_h = clean_accuracy(g, calib), clean_accuracy(h, calib)
    target = acc_h + args.target_between * (acc_g - acc_h)
    cal = calibrate_adaptive(model, calib, target)
    fixed = calibrate_fixed_alpha(g, h, calib, target)
    print(f"calibration on {len(calib)} test examples 5000..: g {acc_g:.2f}%, h {acc_h:.2f}%, target {target:.2f}%; "
          f"adaptive shift {cal['value']:.3f} -> {cal['clean_acc']:.2f}%, fixed alpha {fixed['alpha']:.4f} -> "
          f"{fixed['clean_acc']:.2f}%")
    from adasmooth.mixing.adaptive import save_adaptive_classifier

    save_adaptive_classifier(model, cfg.output + "-calibrated", {"dataset": "fashion-mnist", "setting": args.setting,
                                                                 "calibration": cal})
    models = {"g (standard)": g, "h (robust)": h, f"adaptive ({args.setting})": model}
    ranged = None
    if args.range_width:
        ranged_model, _ = load_adaptive_classifier(cfg.output)
        ranged = calibrate_adaptive(ranged_model, calib, target, param="alpha_min", range_width=args.range_width)
        lo = ranged["eval_head"]["alpha_min"]
        print(f"adaptive with alpha in ({lo:.4f}, {lo + args.range_width:.4f}) -> {ranged['clean_acc']:.2f}%")
        models[f"adaptive ({args.setting}) a in [{lo:.3f},{lo + args.range_width:.3f}]"] = ranged_model
    fixed_name = f"fixed alpha={fixed['alpha']:.3f}"
    models[fixed_name] = fixed_alpha_classifier(g, h, fixed["alpha"])
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    t0 = time.time()
    rows = report_table(models, evald, eps, "linf", settings, batch_size=250, seed=seed,
                        progress=not args.no_progress,
                        attack_options={"apgd_steps": args.apgd_steps, "n_target_classes": args.n_target_classes})
    eval_s = time.time() - t0
    print(f"\nFashion-MNIST, l_inf eps={eps}, first {len(evald)} test examples "
          f"(A gray-box PGD-20, B white-box PGD-20, C AutoAttack, D adaptive AutoAttack, "
          f"APGD {args.apgd_steps} steps, {args.n_target_classes} targets):")
    print(format_table(rows))
    fx = rows[-1]
    for ad in rows[2:-1]:
        for s in settings:
            print(f"setting {s}: {ad['model']} {ad[s]:.2f}% vs fixed {fx[s]:.2f}% "
                  f"(difference {ad[s] - fx[s]:+.2f} points; clean {ad['clean']:.2f}% vs {fx['clean']:.2f}%)")
    results = {"rows": rows, "calibration": {"adaptive": cal, "adaptive_ranged": ranged, "fixed": fixed, "std_acc": acc_g, "rob_acc": acc_h,
                                             "target": target, "examples": len(calib)},
               "training": {"metrics": meta["metrics"], "history": meta["training"]["history"], "seconds": train_s},
               "eval_seconds": eval_s, "total_seconds": time.time() - t_start, "notes": notes,
               "std_checkpoint": std_path, "rob_checkpoint": rob_path, "std_metrics": std_info.get("metrics")}
    name = "results-quick" if args.quick else "results"
    if args.range_width:
        name += f"-range{args.range_width:g}"
    path = write_result(OUT / f"{name}.json", results, vars(args), seed)
    print(f"wrote {path} ({time.time() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
