"""Alpha sweep on Fashion-MNIST (paper Section 5.1.1, Figure 4 shape) with the shared small CNNs.

g = "fmnist-std" (standard training), h = "fmnist-pgd" (PGD-AT, l_inf eps 0.1), both from
``common.base_model``. PGD-20, l_inf, eps = 0.1, on the first N test examples (default 1000).
Prints the table and writes JSON, CSV and the two plots into benchmarks/results/sweep_fashion_mnist/.

    PYTHONPATH=benchmarks python benchmarks/sweep_fashion_mnist.py [--n-examples 1000] [--variants prob,logit]

The shared base models may still be training in another process; this script waits for their files
instead of training a second copy.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import CACHE, RESULTS, base_model, data_dir

from adasmooth.models.checkpoint import checkpoint_paths
from adasmooth.cli.sweep import write_outputs
from adasmooth.data.base import load_dataset
from adasmooth.core.io import format_table
from adasmooth.evaluate.sweep import SweepConfig, alpha_sweep

OUT = RESULTS / "sweep_fashion_mnist"
ALPHAS = sorted({round(0.1 * i, 10) for i in range(11)} | {0.45, 0.55})


def wait_for(name: str, timeout_s: float, poll_s: float = 20.0) -> None:
    weights, sidecar = checkpoint_paths(CACHE / name)
    start = time.time()
    while not (weights.is_file() and sidecar.is_file()):
        waited = time.time() - start
        if waited > timeout_s:
            raise SystemExit(f"{weights} did not appear within {timeout_s:.0f} s; run benchmarks/common.py {name}")
        if int(waited) % 300 < poll_s:
            print(f"waiting for {weights} (being trained elsewhere; {waited / 60:.0f} min so far)", flush=True)
        time.sleep(poll_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-examples", type=int, default=1000)
    p.add_argument("--variants", default="prob,logit,grad_max_g")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--wait-timeout", type=float, default=4 * 3600, help="seconds to wait for the base models")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: for this small CNN more threads mostly spin on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    for name in ("fmnist-std", "fmnist-pgd"):
        wait_for(name, args.wait_timeout)
    g, g_info = base_model("fmnist-std")
    h, h_info = base_model("fmnist-pgd")
    data = load_dataset("fashion-mnist", "test", data_dir()).subset(args.n_examples)
    cfg = SweepConfig(std=str(CACHE / "fmnist-std"), rob=str(CACHE / "fmnist-pgd"), dataset="fashion-mnist",
                      data_dir=str(data_dir()), alphas=ALPHAS, eps=0.1, norm="linf", steps=20,
                      variants=args.variants.split(","), n_examples=len(data), batch_size=args.batch_size, seed=0,
                      device="cpu", output=str(OUT), progress=not args.no_progress)
    cfg.validate()
    print(f"Fashion-MNIST sweep: {len(data)} test examples, PGD-20 l_inf eps=0.1, {len(ALPHAS)} alphas, "
          f"variants {cfg.variants}")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"g: {g_info['metrics']}\nh: {h_info['metrics']}")

    alpha_times: list[float] = []
    t_start = time.time()

    def checkpoint(partial) -> None:
        alpha_times.append(time.time())
        write_outputs(OUT, partial, cfg, cfg.seed, progress_note=f"partial: {len(partial.rows)} rows", plots=False)

    result = alpha_sweep(g, h, data, cfg.alphas, cfg.eps, norm=cfg.norm, steps=cfg.steps, variants=cfg.variants,
                         batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress, on_alpha=checkpoint)
    total = time.time() - t_start
    paths = write_outputs(OUT, result, cfg, cfg.seed, progress_note="complete")

    ref = result.reference
    print(f"\ng alone: clean {ref['g_clean_acc']:.2f}%, PGD-20 on g {ref['g_std_attack_acc']:.2f}%, "
          f"PGD-20 crafted on h {ref['g_rob_attack_acc']:.2f}%")
    print(f"h alone: clean {ref['h_clean_acc']:.2f}%, PGD-20 on h {ref['h_rob_attack_acc']:.2f}%, "
          f"PGD-20 crafted on g {ref['h_std_attack_acc']:.2f}%")
    order = {v: i for i, v in enumerate(cfg.variants)}
    print(format_table(sorted(result.rows, key=lambda r: (order[r["variant"]], r["alpha"]))))

    prob = {r["alpha"]: r for r in result.rows if r["variant"] == "prob"}
    if {0.4, 0.5, 0.6, 0.7} <= set(prob):
        print("\nFigure 4 shape (prob): alpha   clean   MIX")
        for a in (0.4, 0.5, 0.6, 0.7, 1.0):
            print(f"                      {a:5.2f}  {prob[a]['clean_acc']:6.2f}  {prob[a]['mix_attack_acc']:6.2f}")
        rise = prob[0.7]["mix_attack_acc"] - prob[0.4]["mix_attack_acc"]
        fall = prob[0.4]["clean_acc"] - prob[0.7]["clean_acc"]
        print(f"alpha 0.4 -> 0.7: MIX-attacked accuracy {rise:+.2f} points, clean accuracy {-fall:+.2f} points")

    first_alpha = alpha_times[0] - t_start if alpha_times else float("nan")
    per_alpha = (alpha_times[-1] - alpha_times[0]) / max(1, len(alpha_times) - 1) if len(alpha_times) > 1 else first_alpha
    print(f"\ntime: {total:.1f} s in all; first alpha (incl. crafting STD and ROB once) {first_alpha:.1f} s, "
          f"then {per_alpha:.1f} s per alpha for {len(cfg.variants)} variant(s)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
