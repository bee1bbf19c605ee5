"""The ``adasmooth`` command: a thin layer over the library.

Each sub-command lives in its own module ``adasmooth.cli.<module>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "train a standard and a robust model on digits, run the alpha sweep (offline, CPU)"),
    ("train-base", "train_base", "train a base model: standard, pgd, trades, gaussian, cat-rs"),
    ("sweep", "sweep", "accuracy of fixed-alpha mixtures under STD/ROB/MIX PGD attacks, per alpha"),
    ("evaluate", "evaluate", "attack a model or a mixture: PGD, APGD, AutoAttack, adaptive settings A-D"),
    ("train-mixnet", "train_mixnet", "train the mixing network alpha(x) against adaptive attacks"),
    ("calibrate", "calibrate", "choose the mixing network's shift / the fixed alpha for a target clean accuracy"),
    ("certify", "certify", "certified radii: randomized smoothing and the mixed classifier's guarantees"),
    ("analyze", "analyze", "local Lipschitz estimates and confidence-gap analysis of base models"),
]


def _parser(chosen: str | None) -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="adasmooth", description="Adaptive smoothing: accurate and robust classifiers by mixing."
    )
    parser.add_argument("--version", action="version", version=f"adasmooth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"{__name__}.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    names = {c[0]: c[1] for c in COMMANDS}
    parser = _parser(chosen if chosen in names else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(f"{__name__}.{names[args.command]}")
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"adasmooth {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adasmooth {args.command}: interrupted; finished epochs/batches are saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
