"""Arguments shared by several commands."""

from __future__ import annotations

import argparse


def add_common(p: argparse.ArgumentParser, output_default: str | None = None) -> None:
    p.add_argument("--config", help="YAML/JSON file with the same keys as the options (options override it)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="hide progress bars")
    if output_default is not None:
        p.add_argument("--output", "-o", default=None, help=f"output path (default {output_default})")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="digits, mnist, fashion-mnist, cifar10, cifar100")
    p.add_argument("--data-dir", default=None, help="folder with the data files (default $ADASMOOTH_DATA or ./data)")


def add_threat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norm", choices=["linf", "l2"], default=None, help="threat model (default linf)")
    p.add_argument("--eps", type=float, default=None, help="attack radius in [0, 1] pixel units")


def parse_floats(text: str) -> list[float]:
    """'0,0.25,0.5' or '0:1:0.1' (start:stop:step, stop included)."""
    text = text.strip()
    if ":" in text:
        start, stop, step = (float(t) for t in text.split(":"))
        if step <= 0:
            raise argparse.ArgumentTypeError("step must be > 0")
        n = int(round((stop - start) / step))
        return [round(start + i * step, 10) for i in range(n + 1)]
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from err


def cli_values(args: argparse.Namespace, keys: list[str]) -> dict:
    return {k: getattr(args, k, None) for k in keys}
