"""PGD adversarial training of the small CNN on Fashion-MNIST with and without training augmentation.

Same seed, epochs, data and hyperparameters (l_inf eps = 0.1, PGD-5 training attack); only
``augment`` changes: ``none``, ``crop`` (random crop with 4-pixel zero padding) and ``crop-flip``
(the CIFAR recipe: crop + horizontal flip). Flips are questionable for Fashion-MNIST: its test images
are never mirrored (shoes all point the same way), so a flip adds views the test set does not hold;
``crop`` is the variant without them. Measured on the first ``--eval`` test images: clean and PGD-20
accuracy (train-base's own final measurement).

    PYTHONPATH=src python benchmarks/augmentation_fashion_mnist.py [--epochs 10] [--n-train 60000]

Writes benchmarks/results/augmentation_fashion_mnist/results.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from adasmooth.core.io import format_table, write_result
from adasmooth.train.loop import TrainConfig, train_base

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "augmentation_fashion_mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--eval", type=int, default=2000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--augment", default="none,crop,crop-flip")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=os.environ.get("ADASMOOTH_DATA", str(ROOT.parent.parent / "shared" / "data")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("ADASMOOTH_THREADS", "2")))
    rows = []
    for augment in args.augment.split(","):
        cfg = TrainConfig(dataset="fashion-mnist", data_dir=args.data_dir, arch="small-cnn",
                          model_kwargs={"width": args.width}, method="pgd", eps=0.1, attack_steps=5,
                          epochs=args.epochs, batch_size=128, lr=0.05, n_train=args.n_train, augment=augment,
                          eval_examples=args.eval, eval_pgd_steps=20, seed=args.seed, device=args.device,
                          progress=False, resume=False, output=str(OUT / f"pgd-{augment}"))
        t0 = time.perf_counter()
        meta = train_base(cfg)
        m = meta["metrics"]
        rows.append({"augment": augment, "clean %": m["clean_acc"], "PGD-20 %": m["pgd20_acc"],
                     "final train loss": meta["training"]["history"][-1]["train_loss"],
                     "seconds": time.perf_counter() - t0})
        print(format_table(rows[-1:]), flush=True)
    print(f"\nPGD-AT small CNN (width {args.width}), Fashion-MNIST, eps 0.1, {args.epochs} epochs, "
          f"{args.n_train or 'all'} training images, seed {args.seed}, {args.eval} test images:")
    print(format_table(rows))
    print(f"wrote {write_result(OUT / 'results.json', rows, vars(args), args.seed)}")


if __name__ == "__main__":
    main()
