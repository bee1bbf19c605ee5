"""Wall-time speedup of 2 processes (torchrun) over 1 on the same ``adasmooth evaluate`` and ``certify`` jobs.

Each job runs as the command line a user would type, one intra-op thread per process
(OMP_NUM_THREADS=1, MKL_NUM_THREADS=1 in the children's environment):

    python -m adasmooth evaluate ...                                                  (1 process)
    python -m torch.distributed.run --nproc-per-node 2 --master-port P -m adasmooth evaluate ...   (2)

and the same for ``certify`` (its estimation draws written ``-N``: torchrun's own parser would take
``--n`` for an abbreviation of its ``--nnodes``/``--nproc-per-node``). Jobs:

- evaluate: APGD-CE and APGD-T on the shared PGD-trained Fashion-MNIST CNN (``fmnist-pgd``), the first
  ``--examples`` test images;
- certify: the shared Gaussian-trained MNIST CNN (``mnist-gauss-0.25``) mixed with ``mnist-std`` at one
  alpha, ``--cert-examples`` test inputs with ``-N`` estimation draws each.

Reported: the wall seconds a user waits (process start-up included) for 1 and 2 processes, the speedup
(issue 13 target: >= 1.7x on a 2-core machine); the wall seconds of a 1-example run of each job, for the
start-up share (imports, model and data loading, writing the outputs, and for torchrun the launcher and
process-group set-up; plus one example's work) and the speedup with that subtracted; and the agreement of the two result files: evaluate, the fraction
of examples whose per-example record is identical; certify, the fraction of inputs whose rows in every
TSV (Cohen's without its time column, and the mixed one) are identical, and whether every curve is
equal. With CUDA, also the single-GPU throughput (examples/s, one process, ``--device cuda``).

The base models are trained on first use and cached (benchmarks/common.py). Run on a quiet machine:

    PYTHONPATH=src python benchmarks/distributed_speedup.py            # about 6 minutes on 2 quiet cores
    PYTHONPATH=src python benchmarks/distributed_speedup.py --quick    # smoke test, under 1 minute

Default sizes (one process, one thread, measured on a busy 2-core machine): evaluate ~0.22 s per image,
500 images ~110 s; certify ~3.4 s of compute per input at N=20000, so 50 inputs at N=10000 ~85 s; each
plus 2-5 s of start-up. The one-off training of the three base models, when they are not cached yet,
adds about 12 minutes.
Writes benchmarks/results/distributed_speedup/distributed_speedup[_quick].json and the jobs' own outputs
and logs under runs[_quick]/ beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adasmooth.core.io import format_table, write_result  # noqa: E402

from common import CACHE, RESULTS, base_model, data_dir  # noqa: E402  (the shared models and folders)

OUT = RESULTS / "distributed_speedup"
SRC = Path(__file__).resolve().parent.parent / "src"
EVAL_MODEL, CERT_MODEL, CERT_STD = "fmnist-pgd", "mnist-gauss-0.25", "mnist-std"


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for torchrun's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """One thread per process; this checkout's package first (an installed adasmooth may be another copy)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def launcher(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "adasmooth"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
            "--master-port", str(free_port()), "-m", "adasmooth"]


def evaluate_args(examples: int, output: Path, device: str) -> list[str]:
    return ["evaluate", "--model", str(CACHE / EVAL_MODEL), "--attacks", "apgd-ce,apgd-t",
            "--n-examples", str(examples), "--data-dir", str(data_dir()), "--device", device,
            "--no-progress", "--restart", "--output", str(output)]


def certify_args(examples: int, n: int, alpha: float, prefix: Path, device: str) -> list[str]:
    return ["certify", "--model", str(CACHE / CERT_MODEL), "--std", str(CACHE / CERT_STD),
            "--alpha", f"{alpha:g}", "-N", str(n), "--n-examples", str(examples),
            "--data-dir", str(data_dir()), "--device", device, "--no-progress", "--restart",
            "--output", str(prefix)]


def run_job(command: list[str], log: Path) -> float:
    """Wall seconds of ``command`` (what a user waits, start-up included); its output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"failed (exit {done.returncode}): {' '.join(command)}\n" + "\n".join(tail))
    return seconds


def fresh(folder: Path) -> Path:
    """An empty folder: no result file or journal of an earlier run can shorten this one."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------------------- agreement


def evaluate_agreement(one: Path, two: Path) -> dict:
    """Fraction of examples (of the 1-process file) whose whole per-example record is identical."""
    a, b = (json.loads(p.read_text())["results"]["examples"] for p in (one, two))
    b_by_index = {r["index"]: r for r in b}
    same = sum(b_by_index.get(r["index"]) == r for r in a)
    return {"examples": len(a), "examples_2proc": len(b), "identical": same,
            "agreement": same / len(a) if a else None}


def tsv_rows(path: Path) -> dict[str, dict]:
    """idx -> row of a certify TSV, without its time column (wall time differs from run to run)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["idx"]: {k: v for k, v in r.items() if k != "time"} for r in rows}


CURVE_KEYS = ("smoothed_clean_accuracy", "cohen_certified_accuracy", "cohen_abstain_pct",
              "h_alone_rs_certified_accuracy", "h_alone_lip_certified_accuracy", "mixed")


def certify_agreement(one: Path, two: Path) -> dict:
    """Fraction of inputs whose rows in every TSV of the run are identical, and whether the curves are equal."""
    tsvs = sorted(p.name[len(one.name):] for p in one.parent.glob(one.name + "_*.tsv"))
    rows_a = [tsv_rows(one.parent / (one.name + t)) for t in tsvs]
    rows_b = [tsv_rows(two.parent / (two.name + t)) if (two.parent / (two.name + t)).is_file() else {}
              for t in tsvs]
    inputs = list(rows_a[0]) if rows_a else []
    same = sum(all(ra[i] == rb.get(i) for ra, rb in zip(rows_a, rows_b)) for i in inputs)
    res_a, res_b = (json.loads(Path(f"{p}.json").read_text())["results"] for p in (one, two))
    curves = [{k: m[k] for k in CURVE_KEYS} for m in res_a["models"]] == \
             [{k: m[k] for k in CURVE_KEYS} for m in res_b["models"]] and res_a["radii"] == res_b["radii"]
    return {"inputs": len(inputs), "identical": same, "agreement": same / len(inputs) if inputs else None,
            "tsv_files": tsvs, "curves_equal": curves}


# ---------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=None,
                   help="evaluate: test images attacked (default 500: two full batches of 250 in one process, "
                        "one in each of two; --quick 6)")
    p.add_argument("--cert-examples", type=int, default=None,
                   help="certify: test inputs (default 50; --quick 4)")
    p.add_argument("-N", "--cert-n", dest="cert_n", type=int, default=None,
                   help="certify: estimation draws per input (default 10000; --quick 1000)")
    p.add_argument("--alpha", type=float, default=0.9, help="certify: mixing weight of the smoothed model")
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun runs")
    p.add_argument("--repeats", type=int, default=1, help="timings per command (the fastest counts)")
    p.add_argument("--no-startup", action="store_true", help="skip the 1-example start-up runs")
    p.add_argument("--quick", action="store_true", help="tiny jobs (a few seconds each): a smoke test")
    args = p.parse_args()
    quick = args.quick
    examples = args.examples or (6 if quick else 500)
    cert_examples = args.cert_examples or (4 if quick else 50)
    cert_n = args.cert_n or (1000 if quick else 10000)
    procs = args.procs
    tag = "_quick" if quick else ""
    runs = fresh(OUT / f"runs{tag}")

    for name in (EVAL_MODEL, CERT_MODEL, CERT_STD):  # trained and cached on first use, outside the timings
        base_model(name)

    def job_args(job: str, device: str, n_examples: int, where: Path) -> tuple[list[str], Path]:
        """(adasmooth arguments, result path: the evaluate JSON or the certify prefix) of one job."""
        if job == "evaluate":
            return evaluate_args(n_examples, where / "evaluate.json", device), where / "evaluate.json"
        return certify_args(n_examples, cert_n, args.alpha, where / "certify", device), where / "certify"

    def timed(job: str, n_examples: int, n_procs: int, label: str) -> tuple[float, Path]:
        best, result = float("inf"), None
        for r in range(args.repeats):
            where = fresh(runs / f"{label}_{n_procs}proc" / f"repeat{r}")
            cmd_args, result = job_args(job, "cpu", n_examples, where)
            command = launcher(n_procs) + cmd_args
            seconds = run_job(command, where / f"{job}.log")
            print(f"  {seconds:7.1f} s  {' '.join(command)}", flush=True)
            best = min(best, seconds)
        return best, result

    rows, record = [], {}
    units = {"evaluate": examples, "certify": cert_examples}
    for job in ("evaluate", "certify"):
        print(f"{job}:", flush=True)
        t1, out1 = timed(job, units[job], 1, job)
        t2, out2 = timed(job, units[job], procs, job)
        agree = evaluate_agreement(out1, out2) if job == "evaluate" else certify_agreement(out1, out2)
        entry = {"examples": units[job], "seconds_1proc": t1, f"seconds_{procs}proc": t2, "speedup": t1 / t2,
                 "agreement": agree}
        if not args.no_startup:
            s1, _ = timed(job, 1, 1, f"{job}_startup")
            s2, _ = timed(job, 1, procs, f"{job}_startup")
            entry.update(startup_seconds_1proc=s1, **{f"startup_seconds_{procs}proc": s2},
                         startup_share_1proc=s1 / t1, **{f"startup_share_{procs}proc": s2 / t2},
                         speedup_without_startup=(t1 - s1) / (t2 - s2) if t2 > s2 else None)
        record[job] = entry
        rows.append({"job": job, "examples": units[job], "1 proc s": t1, f"{procs} procs s": t2,
                     "speedup": t1 / t2,
                     "start-up s (1/2)": "-" if args.no_startup
                     else f"{entry['startup_seconds_1proc']:.1f}/{entry[f'startup_seconds_{procs}proc']:.1f}",
                     "speedup w/o start-up": entry.get("speedup_without_startup"),
                     "agreement %": 100.0 * agree["agreement"] if agree["agreement"] is not None else None})

    print()
    print(f"{procs} processes vs 1 (one thread each), {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"target speedup >= 1.7x")
    print(format_table(rows, columns=["job", "examples", "1 proc s", f"{procs} procs s", "speedup",
                                      "start-up s (1/2)", "speedup w/o start-up", "agreement %"]))
    if "curves_equal" in record["certify"]["agreement"]:
        print(f"certify curves equal: {record['certify']['agreement']['curves_equal']}")

    if torch.cuda.is_available():
        gpu_rows = []
        for job in ("evaluate", "certify"):
            seconds = {}
            for n in (units[job],) if args.no_startup else (units[job], 1):
                where = fresh(runs / f"{job}_cuda_{n}")
                cmd_args, _ = job_args(job, "cuda", n, where)
                command = [sys.executable, "-m", "adasmooth"] + cmd_args
                seconds[n] = run_job(command, where / f"{job}.log")
                print(f"  {seconds[n]:7.1f} s  {' '.join(command)}", flush=True)
            t, s1 = seconds[units[job]], seconds.get(1)
            gpu_rows.append({"job": job, "examples": units[job], "seconds": t, "examples/s": units[job] / t,
                             "start-up s": s1,
                             "examples/s w/o start-up": (units[job] - 1) / (t - s1) if s1 and t > s1 else None})
        record["cuda"] = {"device": torch.cuda.get_device_name(0), "jobs": gpu_rows}
        print(f"single GPU ({record['cuda']['device']}), one process; start-up = a 1-example run:")
        print(format_table(gpu_rows))
    else:
        record["cuda"] = None
        print("no CUDA device: single-GPU throughput skipped")

    record["machine"] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                         "platform": platform.platform(), "processor": platform.processor()}
    config = {"examples": examples, "cert_examples": cert_examples, "cert_n": cert_n, "alpha": args.alpha,
              "procs": procs, "repeats": args.repeats, "quick": quick, "threads_per_process": 1,
              "models": {"evaluate": EVAL_MODEL, "certify": CERT_MODEL, "std": CERT_STD},
              "attacks": ["apgd-ce", "apgd-t"]}
    out = write_result(OUT / f"distributed_speedup{tag}.json", record, config=config, seed=0)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
