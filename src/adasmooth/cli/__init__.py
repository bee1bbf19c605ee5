"""The ``adasmooth`` command: a thin layer over the library.

Each sub-command is a module ``adasmooth.cli.<module>`` with ``CONFIG`` (its config dataclass: the options
are generated from it, see :mod:`adasmooth.cli.options`), ``run(cfg) -> int`` and optionally
``epilog() -> str`` (text shown after the options in ``--help``) and ``files(cfg) -> (inputs, outputs)``
(checked before the run: no output may overwrite an input, every output must be writable). Only the chosen module
is imported. Every command also takes ``--config FILE`` (YAML/JSON with the same keys as the options;
options given on the command line win), ``--debug``, ``--quiet`` and ``--verbose``.

The library speaks through the ``adasmooth`` logger and never prints; the command shows its INFO lines on
stdout and its warnings on stderr (``--quiet``: warnings only and no progress; ``--verbose``: DEBUG too).

Errors caused by the user's input print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..core.errors import AdasmoothError
from .common import check_run_files, lock_outputs
from .options import add_config_options, config_from_args

__all__ = ["COMMANDS", "main", "build_parser"]

# (command, module, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "train a standard and a robust model on digits, run the alpha sweep (offline, CPU)"),
    ("train-base", "train_base", "train a base model with one of the training methods listed in its help"),
    ("catrs-targets", "catrs_targets", "cache smoothed soft labels of a training set for CAT-RS"),
    ("sweep", "sweep", "accuracy of fixed-alpha mixtures under STD/ROB/MIX PGD attacks, per alpha"),
    ("evaluate", "evaluate", "attack a model or a mixture: PGD, APGD, AutoAttack, adaptive settings A-D"),
    ("train-mixnet", "train_mixnet", "train the mixing network alpha(x) against adaptive attacks"),
    ("calibrate", "calibrate", "choose the mixing network's alpha range / the fixed alpha for a target clean "
                               "accuracy and compare them under attack"),
    ("certify", "certify", "certified radii: randomized smoothing and the mixed classifier's guarantees"),
    ("export", "export", "write a mixed model as one file plain PyTorch loads (torch.export or TorchScript)"),
    ("analyze", "analyze", "local Lipschitz estimates and confidence-gap analysis of base models"),
]
MODULES = {name: module for name, module, _ in COMMANDS}

# Errors that mean "bad input" rather than "bug": one line and exit code 2.
USER_ERRORS = (AdasmoothError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def command_module(name: str):
    return importlib.import_module(f"{__name__}.{MODULES[name]}")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``chosen`` command's options are generated (its module is imported)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="adasmooth", description="Adaptive smoothing: accurate and robust classifiers by mixing."
    )
    parser.add_argument("--version", action="version", version=f"adasmooth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, _, help_text in COMMANDS:
        if name != chosen:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = command_module(name)
        epilog = module.epilog() if hasattr(module, "epilog") else None
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", default=None,
                       help="YAML/JSON file with the same keys as the options; options given here win")
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        talk = p.add_mutually_exclusive_group()
        talk.add_argument("--quiet", "-q", action="store_true", help="show only warnings and errors, no progress (default: off)")
        talk.add_argument("--verbose", "-v", action="store_true", help="show debug messages too (default: off)")
        add_config_options(p, module.CONFIG)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) \
            and getattr(err, "filename", None) and str(err.filename) not in text:
        text += f": {err.filename}"
    return text


class _ConsoleHandler(logging.Handler):
    """INFO and below to stdout, warnings and errors to stderr (the streams of the moment, so that a
    caller that swaps ``sys.stdout``/``sys.stderr`` captures them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                sys.stderr.write(f"{record.levelname.lower()}: {text}\n")
                sys.stderr.flush()
            else:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never end the run
            self.handleError(record)


def _show_logs(quiet: bool, verbose: bool) -> tuple[logging.Logger, logging.Handler, int]:
    """Route the library's ``adasmooth`` logger to the console at the level the flags choose."""
    logger = logging.getLogger("adasmooth")
    handler = _ConsoleHandler()
    previous = logger.level
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(handler)
    return logger, handler, previous


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in MODULES else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = command_module(args.command)
    from ..core.distributed import finish_distributed

    logger, handler, previous_level = _show_logs(args.quiet, args.verbose)
    try:
        cfg = config_from_args(module.CONFIG, args, args.config)
        outputs = []
        if args.quiet and hasattr(cfg, "progress"):
            cfg.progress = False
        if hasattr(module, "files"):
            inputs, outputs = module.files(cfg)
            check_run_files([*inputs, *([args.config] if args.config else [])], outputs)
        with lock_outputs(outputs):
            code = int(module.run(cfg) or 0)
        if code == 0:
            finish_distributed(success=True)  # under torchrun: exits here
        return code
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"adasmooth {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adasmooth {args.command}: interrupted; finished epochs/batches are saved", file=sys.stderr)
        return 130
    finally:
        finish_distributed(success=False)  # no-op when the run already tore its group down
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
