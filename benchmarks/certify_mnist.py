"""Certified robustness on MNIST: randomized smoothing alone vs the mixed classifier (paper Figure 6).

h: the shared Gaussian-noise-trained small CNNs (sigma 0.25 and 0.5); g: the shared standard CNN.
For every test input, n0 selection and n estimation draws per smoothed model; from the same counts:

- Cohen et al.'s certificate of the smoothed h alone (one-sided Clopper-Pearson, failure prob. alpha);
- the mixture's certificates (Theorem A.2 and Theorem 3.5 with Lip = sqrt(2/pi)/sigma), made valid by
  simultaneous Clopper-Pearson bounds (Bonferroni) at the same alpha;
- Figure 6: at the clean accuracy of RS sigma=0.25 alone, the largest alpha for each sigma that keeps
  that clean accuracy, and the Pareto frontier over them.

Run: ``PYTHONPATH=benchmarks python benchmarks/certify_mnist.py`` (about 10 minutes on 2 CPU cores).
Writes benchmarks/results/certify_mnist/{certify_mnist.json, run_*.tsv, run_curves.png, run_frontier_*.png}.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import CACHE, RESULTS, base_model, data_dir
from adasmooth.certify.report import certify_smoothed_models, summary_rows
from adasmooth.models.checkpoint import checkpoint_paths
from adasmooth.data.base import load_dataset
from adasmooth.core.io import format_table, write_result

OUT = RESULTS / "certify_mnist"
MODELS = {0.25: "mnist-gauss-0.25", 0.5: "mnist-gauss-0.5"}
SHOW_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def wait_for(name: str, timeout_s: float) -> None:
    """The shared models are trained by another job: wait for its file instead of training a copy."""
    weights, _ = checkpoint_paths(CACHE / name)
    start = time.time()
    while not weights.is_file():
        if time.time() - start > timeout_s:
            print(f"{weights} still missing after {timeout_s:.0f} s; training it here")
            return
        time.sleep(20)


def raw_forward_rate(model, x, batch_size: int, repeats: int = 5) -> float:
    """Noisy samples per second of plain batched forward passes: the ceiling for certification."""
    batch = x.unsqueeze(0).expand(batch_size, *x.shape)
    with torch.no_grad():
        model(batch + torch.randn_like(batch))
        start = time.perf_counter()
        for _ in range(repeats):
            model(batch + torch.randn_like(batch)).argmax(1)
    return batch_size * repeats / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="estimation draws per input")
    p.add_argument("--n0", type=int, default=100, help="selection draws per input")
    p.add_argument("--n-examples", type=int, default=400)
    p.add_argument("--skip", type=int, default=25, help="certify every k-th test image (spreads the classes)")
    p.add_argument("--alpha-conf", type=float, default=0.001, help="failure probability of each certificate")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--alphas", default="0.9", help="fixed mixing weights also reported for every sigma")
    p.add_argument("--wait", type=float, default=3600, help="seconds to wait for the shared models")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)

    for name in (*MODELS.values(), "mnist-std"):
        wait_for(name, args.wait)
    models = {sigma: base_model(name)[0] for sigma, name in MODELS.items()}
    std_model, std_info = base_model("mnist-std")
    data = load_dataset("mnist", "test", data_dir())
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    radii = [round(0.05 * i, 4) for i in range(31)]

    rate = raw_forward_rate(models[0.25], data.x[0], args.batch_size)
    results, _ = certify_smoothed_models(
        models, data, data.num_classes, std_model=std_model, alphas=alphas, n0=args.n0, n=args.n,
        alpha_conf=args.alpha_conf, batch_size=args.batch_size, radii=radii, skip=args.skip,
        max_examples=args.n_examples, prefix=OUT / "run", seed=0, progress=not args.no_progress,
    )
    results["raw_forward_samples_per_second"] = rate
    results["g_clean_accuracy_checkpoint"] = std_info["metrics"]["clean_acc"]
    write_result(OUT / "certify_mnist.json", results, vars(args), seed=0)

    print(f"MNIST, {results['models'][0]['examples']} test images (every {args.skip}th), n0={args.n0}, n={args.n}, "
          f"failure probability {args.alpha_conf} per certificate (confidence {100 * (1 - args.alpha_conf):.1f}%)")
    print("certified accuracy (%) at l_2 radius; 'clean' is the clean accuracy of the classifier")
    print(format_table(summary_rows(results, SHOW_RADII), precision=1))
    for bound, front in results["frontier"].items():
        chosen = ", ".join(f"sigma={c['sigma']:g}: alpha={c['alpha']:g} (clean {c['clean_accuracy']:.1f}%)"
                           for c in front["candidates"])
        print(f"frontier [{bound}] at clean accuracy {front['target_clean_accuracy']:.1f}%: {chosen}")
    for m in results["models"]:
        print(f"sigma={m['sigma']:g}: {m['noisy_samples_per_second']:.0f} noisy samples/s, "
              f"{m['images_per_second']:.3f} images/s ({m['seconds']:.0f} s); Cohen abstains on {m['cohen_abstain_pct']:.1f}%")
    ratio = results["models"][0]["noisy_samples_per_second"] / rate
    print(f"raw batched forward passes: {rate:.0f} samples/s; certify reaches {100 * ratio:.0f}% of that")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
