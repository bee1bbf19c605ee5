"""Training throughput of the engine against a minimal plain-PyTorch loop doing the same work.

Both train the same model (same initial weights) with cross-entropy, SGD + cosine schedule and the
same batch size on the same in-memory data, one epoch at a time, alternating (engine, plain, engine,
plain, ...) so that both see the same machine load; the first epoch of each is a warm-up. The plain
loop is what one would write by hand: a random permutation per epoch, tensor indexing, forward,
backward, step. The engine adds everything it does for every run (``Dataset.stream`` with per-epoch
order from (seed, epoch), the per-step finiteness check, the loss sums, the resume file at the end of
each epoch, the progress bookkeeping). Reported: images/s of each (median over the measured epochs)
and their ratio. Goal: engine >= 0.95x plain on CPU fp32.

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


def engine_epoch(model, opt, sched, data, args, device, resume_file: Path, epoch: int) -> float:
    """Seconds of epoch ``epoch`` through the engine (continuing the resume file of the epoch before)."""
    opts = EngineOptions(epochs=epoch + 1, batch_size=args.batch_size, seed=0, precision=args.precision,
                         channels_last=args.channels_last, progress=False, label="engine")
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    run_training(model, cross_entropy_step, data, opt, sched, opts, device=device, dist=init_distributed("cpu"),
                 ctx=TrainContext(seed=0, generator=gen), generator=gen, resume_file=resume_file, fingerprint={})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


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
    p.add_argument("--epochs", type=int, default=4, help="measured epochs of each (after one warm-up epoch)")
    p.add_argument("--n", type=int, default=4096, help="training examples (random 3x32x32 images)")
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
    data = Dataset(torch.rand(args.n, 3, 32, 32), torch.randint(0, 10, (args.n,)), 10, "random", "train")
    model0 = create_model(args.arch, 10, in_channels=3, input_shape=(3, 32, 32)).to(device)
    total = (args.epochs + 1) * -(-args.n // args.batch_size)
    runs = {}
    for name in ("engine", "plain"):
        model = copy.deepcopy(model0)
        if args.channels_last:
            to_channels_last(model)
        opt, sched = make_optimizer(model.parameters(), lr=0.05, weight_decay=5e-4, total_steps=total)
        runs[name] = {"model": model, "opt": opt, "sched": sched, "seconds": []}
    scaler = grad_scaler(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        resume = Path(tmp) / "engine.resume.pt"
        for epoch in range(args.epochs + 1):
            e = runs["engine"]
            e["seconds"].append(engine_epoch(e["model"], e["opt"], e["sched"], data, args, device, resume, epoch))
            q = runs["plain"]
            q["seconds"].append(plain_epoch(q["model"], q["opt"], q["sched"], data, args, device, scaler))
    rows = []
    for name, r in runs.items():
        measured = r["seconds"][1:]
        rows.append({"loop": name, "images_per_s": args.n / statistics.median(measured),
                     "epoch_seconds": [round(s, 3) for s in measured]})
    ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    print(format_table([{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]))
    print(f"engine / plain = {ratio:.3f} (goal >= 0.95 on CPU fp32); {args.arch}, n={args.n}, batch {args.batch_size}, "
          f"{args.device} {args.precision}{' channels-last' if args.channels_last else ''}, "
          f"{torch.get_num_threads()} threads")
    write_result(OUT / "results.json", {"rows": rows, "engine_over_plain": ratio}, config=vars(args))


if __name__ == "__main__":
    main()
