"""Our APGD-CE / APGD-T against the reference (pyautoattack) on the shared Fashion-MNIST PGD model.

Same model (benchmarks/common.py "fmnist-pgd"), same first 500 test images, l_inf eps = 0.1, same
seed. Prints robust accuracy, wall and CPU time of each, and the time ratios (ours / reference).
Target: robust accuracy within 0.5 points at no more than the reference's time.

The reference attacks are timed through their own attack objects (``APGDAttack.perturb`` on the
correctly classified inputs), so AutoAttack's start-up checks do not count against it; ours is timed
on all 500 inputs, clean forward pass included. Runs alternate (ours, reference) to share machine load.

    PYTHONPATH=benchmarks python benchmarks/apgd_vs_autoattack.py [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import CACHE, RESULTS, base_model, data_dir

from adasmooth.attacks import APGD, APGDTargeted
from adasmooth.data.base import load_dataset
from adasmooth.core.io import format_table, write_result

OUT = RESULTS / "apgd_vs_autoattack"


def wait_for_model(name: str, timeout_s: float) -> None:
    """The shared base models are trained by another job; wait for the file instead of training a copy."""
    path = CACHE / f"{name}.safetensors"
    start = time.time()
    while not path.is_file():
        if time.time() - start > timeout_s:
            raise SystemExit(f"{path} did not appear within {timeout_s:.0f} s; run `python benchmarks/common.py {name}`")
        print(f"waiting for {path} ...", flush=True)
        time.sleep(30)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-pgd", help="a base model of benchmarks/common.py")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (the fastest counts)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings on a shared box)")
    p.add_argument("--wait", type=float, default=3600, help="seconds to wait for the cached model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    wait_for_model(args.model, args.wait)
    model, info = base_model(args.model)
    model.eval()
    data = load_dataset("fashion-mnist", "test", data_dir()).subset(args.n)
    x, y = data.x, data.y
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    xc, yc = x[correct], y[correct]
    clean = 100.0 * float(correct.float().mean())

    def ours_ce():
        return APGD(model, args.eps, steps=100, restarts=1, loss="ce", seed=args.seed)(x, y)

    def ours_t():
        return APGDTargeted(model, args.eps, steps=100, n_target_classes=9, seed=args.seed)(x, y)

    def with_clean(adv_correct):
        out = x.clone()
        out[correct] = adv_correct.detach()
        return out

    def ref_ce():
        atk = APGDAttack(model, n_iter=100, norm="Linf", n_restarts=1, eps=args.eps, seed=args.seed, loss="ce",
                         rho=0.75, device="cpu")
        return with_clean(atk.perturb(xc, yc))

    def ref_t():
        atk = APGDAttack_targeted(model, n_iter=100, norm="Linf", n_restarts=1, eps=args.eps, seed=args.seed,
                                  rho=0.75, n_target_classes=9, device="cpu")
        return with_clean(atk.perturb(xc, yc))

    runs = {"apgd-ce": (ours_ce, ref_ce), "apgd-t": (ours_t, ref_t)}
    rows, results = [], {"clean_accuracy": clean, "n": args.n, "eps": args.eps, "seed": args.seed,
                         "threads": args.threads, "model": args.model, "model_metrics": info.get("metrics")}
    for name, (ours, ref) in runs.items():
        best = {"ours": [float("inf"), float("inf")], "reference": [float("inf"), float("inf")]}
        acc = {}
        for _ in range(args.repeats):
            for who, fn in (("ours", ours), ("reference", ref)):
                x_adv, wall, cpu = timed(fn)
                acc[who] = robust_acc(model, x_adv, y)
                best[who] = [min(best[who][0], wall), min(best[who][1], cpu)]
                linf = float((x_adv - x).abs().flatten(1).amax(1).max())
                assert linf <= args.eps + 1e-6, f"{who} {name} left the ball: {linf}"
        entry = {
            "robust_ours": acc["ours"], "robust_reference": acc["reference"],
            "difference_points": acc["ours"] - acc["reference"],
            "wall_ours_s": best["ours"][0], "wall_reference_s": best["reference"][0],
            "cpu_ours_s": best["ours"][1], "cpu_reference_s": best["reference"][1],
            "wall_ratio": best["ours"][0] / best["reference"][0], "cpu_ratio": best["ours"][1] / best["reference"][1],
        }
        results[name] = entry
        rows.append({"attack": name, "robust ours %": entry["robust_ours"], "robust ref %": entry["robust_reference"],
                     "diff pts": entry["difference_points"], "wall ours s": entry["wall_ours_s"],
                     "wall ref s": entry["wall_reference_s"], "wall ratio": entry["wall_ratio"],
                     "cpu ours s": entry["cpu_ours_s"], "cpu ref s": entry["cpu_reference_s"],
                     "cpu ratio": entry["cpu_ratio"]})
        write_result(OUT / "results.json", results, config=vars(args), seed=args.seed)  # partial results survive
    print(f"{args.model}, {args.n} Fashion-MNIST test images, linf eps={args.eps}, seed {args.seed}, "
          f"{args.threads} thread(s); clean accuracy {clean:.2f}%")
    print(format_table(rows))
    ok = all(abs(results[n]["difference_points"]) <= 0.5 and results[n]["cpu_ratio"] <= 1.0 for n in runs)
    print("target (within 0.5 points, time ratio <= 1):", "met" if ok else "NOT met")
    print(f"wrote {Path(OUT / 'results.json')}")


if __name__ == "__main__":
    main()
