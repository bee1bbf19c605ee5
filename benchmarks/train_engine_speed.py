"""Training throughput of the engine against a minimal plain-PyTorch loop doing the same work.

Both train the same model (same initial weights) with cross-entropy, SGD + cosine schedule and the
same batch size on the same in-memory data, one epoch at a time, alternating (engine, plain, engine,
plain, ...: the plain epoch runs inside the engine's per-epoch hook and is not counted as the engine's)
so that both see the same machine load; the first epoch of each is a warm-up. The plain
loop is what one would write by hand: a random permutation per epoch, tensor indexing, forward,
backward, step. The engine adds everything it does for every run (``Dataset.stream`` with per-epoch
order from (seed, epoch), the per-step finiteness check, the loss sums, reading and writing the resume
file after each epoch, the progress bookkeeping). Reported: images/s of each from its fastest
measured epoch (on a shared machine the fastest epoch is the one least disturbed by other work) and
from the median epoch, and the ratios. Goal: engine >= 0.95x plain on CPU fp32.

    PYTHONPATH=src python benchmarks/train_engine_speed.py [--epochs 4] [--n 4096] [--arch small-cnn]
    PYTHONPATH=src python benchmarks/train_engine_speed.py --device cuda --precision bf16 --channels-last

Writes benchmarks/results/train_engine_speed/results.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adasmooth.core.distributed import init_distributed
from adasmooth.core.io import format_table, write_result
from adasmooth.core.precision import autocast, grad_scaler, to_channels_last
from adasmooth.core.runtime import resolve_device
from adasmooth.data import Dataset
from adasmooth.models import create_model
from adasmooth.train.engine import EngineOptions, TrainContext, make_optimizer, run_training

OUT = Path(__file__).resolve().parent / "results" / "train_engine_speed"


def cross_entropy_step(model, batch, ctx):
    x, y, _ = batch
    return F.cross_entropy(model(x), y)


def plain_epoch(model, opt, sched, data, args, device, scaler) -> float:
    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(data))
    for i in range(0, len(data), args.batch_size):
        rows = order[i:i + args.batch_size]
        x, y = data.x[rows].to(device, non_blocking=True), data.y[rows].to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(args.precision, device.type):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8, help="epochs of each after one warm-up epoch (all timed but the engine's last)")
    p.add_argument("--n", type=int, default=1024, help="training examples (random 3 x size x size images)")
    p.add_argument("--size", type=int, default=16, help="image side")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--arch", default="small-cnn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    data = Dataset(torch.rand(args.n, *shape), torch.randint(0, 10, (args.n,)), 10, "random", "train")
    model0 = create_model(args.arch, 10, in_channels=3, input_shape=shape).to(device)
    total = (args.epochs + 1) * -(-args.n // args.batch_size)
    runs = {}
    for name in ("engine", "plain"):
        model = copy.deepcopy(model0)
        if args.channels_last:
            to_channels_last(model)
        opt, sched = make_optimizer(model.parameters(), lr=0.05, weight_decay=5e-4, total_steps=total)
        runs[name] = {"model": model, "opt": opt, "sched": sched, "seconds": []}
    scaler = grad_scaler(args.precision, device)
    e, q = runs["engine"], runs["plain"]
    marks = []

    def plain_between_epochs(_model) -> dict:
        """The engine's per-epoch hook: time the engine's epoch that just ended, then run one plain epoch."""
        marks.append(time.perf_counter())
        if len(marks) > 1:
            e["seconds"].append(marks[-1] - marks[-2])
        q["seconds"].append(plain_epoch(q["model"], q["opt"], q["sched"], data, args, device, scaler))
        marks[-1] = time.perf_counter()  # the engine's next epoch starts now
        return {}

    opts = EngineOptions(epochs=args.epochs + 1, batch_size=args.batch_size, seed=0, precision=args.precision,
                         channels_last=args.channels_last, progress=False, label="engine")
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # the engine writes its resume file after every epoch, as in every run
        run_training(e["model"], cross_entropy_step, data, e["opt"], e["sched"], opts, device=device,
                     dist=init_distributed("cpu"), ctx=TrainContext(seed=0, generator=gen), generator=gen,
                     resume_file=Path(tmp) / "engine.resume.pt", fingerprint={}, evaluate=plain_between_epochs)
    # the epoch after the last hook is not timed; the first (warm-up) epochs of both are dropped below
    e["seconds"].insert(0, float("nan"))
    rows = []
    for name, r in runs.items():
        measured = r["seconds"][1:args.epochs]  # the engine's last epoch ends after the last hook
        rows.append({"loop": name, "images_per_s": args.n / min(measured),
                     "images_per_s_median": args.n / statistics.median(measured),
                     "epoch_seconds": [round(s, 3) for s in measured]})
    ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    median_ratio = rows[0]["images_per_s_median"] / rows[1]["images_per_s_median"]
    print(format_table([{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]))
    print(f"engine / plain = {ratio:.3f} fastest epochs, {median_ratio:.3f} median epochs (goal >= 0.95 on CPU fp32); {args.arch}, n={args.n}, {args.size} px, batch {args.batch_size}, "
          f"{args.device} {args.precision}{' channels-last' if args.channels_last else ''}, "
          f"{torch.get_num_threads()} threads")
    write_result(OUT / "results.json", {"rows": rows, "engine_over_plain": ratio,
                                                "engine_over_plain_median": median_ratio}, config=vars(args))


if __name__ == "__main__":
    main()
