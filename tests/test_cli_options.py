"""The command line generated from config dataclasses: one declaration per option, defaults in --help."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

import pytest

from adasmooth.cli import COMMANDS, build_parser, main
from adasmooth.cli.options import add_config_options, config_from_args, parse_number_list
from adasmooth.core.config import ConfigError, option


@dataclasses.dataclass
class Noise:
    """Noise options."""

    m: int = option(4, help="draws per input")
    lambda_: float | None = option(None, help="KL weight")


@dataclasses.dataclass
class Toy:
    eps: float = option(0.1, help="radius")
    norm: Literal["linf", "l2"] = option("linf", help="threat model")
    alphas: list[float] = option(default_factory=lambda: [0.0, 1.0], help="alphas")
    names: list[str] = option(default_factory=list, help="names")
    progress: bool = option(True, help="show bars")
    cascade: bool = option(False, help="cascade attacks")
    output: str = option("runs/x", help="where to write", short="-o")
    clamp: float | None = option(0.6, help="clamp")
    noise: Noise = option(default_factory=Noise, help="noise")
    hidden: dict = option(default_factory=dict, help="library only", cli=False)


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_config_options(p, Toy)
    return p


def parse(*argv: str, config_file=None) -> Toy:
    return config_from_args(Toy, toy_parser().parse_args(list(argv)), config_file)


def test_defaults_when_nothing_is_given():
    assert parse() == Toy()


def test_every_kind_of_field_parses():
    cfg = parse("--eps", "0.25", "--norm", "l2", "--alphas", "0:1:0.5", "0.9", "--names", "a,b", "c",
                "--no-progress", "--cascade", "-o", "out.json", "--clamp", "none", "--noise-m", "2",
                "--noise-lambda", "3")
    assert cfg == Toy(eps=0.25, norm="l2", alphas=[0.0, 0.5, 1.0, 0.9], names=["a", "b", "c"], progress=False,
                      cascade=True, output="out.json", clamp=None, noise=Noise(m=2, lambda_=3.0))


def test_command_line_wins_over_the_config_file_and_nested_keys_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("eps: 0.3\nnoise: {m: 7, lambda_: 1.5}\nhidden: {width: 8}\n")
    cfg = parse("--noise-m", "2", config_file=f)
    assert cfg.eps == 0.3 and cfg.noise == Noise(m=2, lambda_=1.5) and cfg.hidden == {"width": 8}


def test_bad_values_are_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--eps", "abc"])
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--norm", "l1"])
    f = tmp_path / "c.yaml"
    f.write_text("epsilon: 0.3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        parse(config_file=f)


def test_help_shows_each_default_and_library_only_fields_stay_hidden():
    text = toy_parser().format_help()
    for fragment in ("radius (default: 0.1)", "alphas; one or more, comma-separated allowed (default: 0,1)",
                     "--no-progress show bars (default: on; this flag turns it off)", "cascade attacks (default: off)",
                     "--noise-m", "draws per input (default: 4)", "--noise-lambda", "--output OUTPUT, -o OUTPUT"):
        assert fragment in " ".join(text.split()), fragment
    assert "--hidden" not in text
    assert "noise (--noise-*):" in " ".join(text.split())  # the group title is the field's help text


@dataclasses.dataclass
class Described:
    """The ``block:`` of a config, in reST."""

    crop: int | None = option(None, help="crop side (default: the checkpoint's)")
    rule: str = option("prob", help="mixing rule; registered ones only", registry="adasmooth.mixing:MIXING_RULES")
    block: Noise = option(default_factory=Noise, help="noise options of method x")


def test_help_says_each_default_once_and_lists_registry_entries():
    parser = argparse.ArgumentParser()
    add_config_options(parser, Described)
    text = " ".join(parser.format_help().split())
    assert "crop side (default: the checkpoint's) --" in text and "checkpoint's) (default: none)" not in text
    assert "mixing rule: prob, logit, grad_g" in text and "; registered ones only (default: prob)" in text
    assert "noise options of method x (--block-*)" in text and "``" not in text


def test_a_field_without_help_is_a_programming_error():
    @dataclasses.dataclass
    class Bad:
        x: int = 1

    with pytest.raises(TypeError, match="no help text"):
        add_config_options(argparse.ArgumentParser(), Bad)


def test_number_lists():
    assert parse_number_list("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_number_list("3,1", int) == [3, 1]
    for bad in ("0:1:0", "a,b", "0:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_number_list(bad)


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS])
def test_every_option_of_every_command_has_help_and_shows_its_default(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if action.dest in ("help", "config", "debug"):
            continue
        assert action.help and "(default:" in action.help, f"{command} {action.option_strings}: {action.help!r}"


def test_shared_options_have_the_same_names_in_every_command():
    shared = {"--seed", "--device", "--output", "--config", "--no-progress"}
    for command, _, _ in COMMANDS:
        parser = build_parser(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert shared <= flags, f"{command} lacks {shared - flags}"


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    rc = main(["evaluate", "--model", str(tmp_path / "missing"), "--no-progress", "-o", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing" in err and "Traceback" not in err
