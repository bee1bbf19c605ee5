"""Streaming throughput from an image folder: images/s with 0, 1 and 2 DataLoader workers.

Writes a folder of ``--images`` small JPEGs (``--classes`` class folders, 64x48 pixels), then streams
one epoch through ``Dataset.stream`` per setting: evaluation preprocessing (resize the short side,
centre crop) and training augmentation (random resized crop + flip). Ratios are against 0 workers
(decoding in the main process) measured in the same run. The first epoch of each setting is a
warm-up (file cache), the reported one is the second.

    PYTHONPATH=src python benchmarks/data_throughput.py [--images 3000] [--workers 0,1,2]

Writes benchmarks/results/data_throughput/results.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adasmooth.core.io import format_table, write_result
from adasmooth.data import ImageOptions, load_dataset

OUT = Path(__file__).resolve().parent / "results" / "data_throughput"


def write_folder(root: Path, n: int, classes: int, seed: int = 0) -> None:
    """Smooth random images (gradients plus noise), about the size of small thumbnails once compressed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:64]
    for i in range(n):
        folder = root / "train" / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.random(3)
        base = np.stack([a * 255 * xx / 64, b * 255 * yy / 48, c * 255 * (xx + yy) / 112], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:05d}.jpg", quality=90)


def epoch_rate(data, batch_size: int, workers: int, augment: str) -> float:
    count, t0 = 0, time.perf_counter()
    for x, _, _ in data.stream(batch_size, seed=0, epoch=1, workers=workers, augment=augment):
        count += x.shape[0]
    return count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_folder(Path(tmp), args.images, args.classes)
        print(f"wrote {args.images} JPEGs (64x48) in {time.perf_counter() - t0:.1f} s")
        data = load_dataset("folder", "train", tmp, image=ImageOptions(crop=args.crop))
        for augment in ("none", "resized-crop-flip"):
            reference = None
            for w in workers:
                epoch_rate(data, args.batch_size, w, augment)  # warm-up: file cache, worker start-up paths
                rate = epoch_rate(data, args.batch_size, w, augment)
                reference = reference or rate
                results.append({"augment": augment, "workers": w, "images/s": round(rate), "vs 0 workers": rate / reference})
    print(format_table(results))
    out = write_result(OUT / "results.json", {"rows": results}, vars(args), 0)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
