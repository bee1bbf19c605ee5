"""Mixing rules declare their parameters; the commands that build a mixture (evaluate's fixed mixture,
sweep's variants) take ``--<rule>-<parameter>`` generated from that declaration, and the values reach
the rule. The rule registered here exists only in this test: nothing is listed by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from adasmooth.cli import build_parser, main
from adasmooth.core.config import option
from adasmooth.core.errors import ConfigError
from adasmooth.data import load_dataset
from adasmooth.mixing import MIXING_RULES, MixedClassifier, build_rule, register_rule_with_params, rule_params_class
from adasmooth.models.checkpoint import save_checkpoint

RULE = "test-winner"
N = 40


@dataclass
class WinnerParams:
    winner: int = option(0, help="the class every input is given")
    margin: float = option(10.0, help="how far the winner's logit lies above the others")

    def validate(self) -> None:
        if not 0 <= self.winner < 10:
            raise ValueError(f"winner must be a class in [0, 10), got {self.winner}")


def winner_rule(params: WinnerParams):
    def rule(inputs, alpha):
        g = inputs.std_logits()  # kept in the graph: attacks need a gradient, the decision ignores it
        return F.one_hot(torch.full_like(alpha, params.winner, dtype=torch.long), g.shape[1]) * params.margin + 0 * g

    rule.params = params
    return rule


@pytest.fixture
def winner():
    register_rule_with_params(RULE, WinnerParams, label="every input is the winner class")(winner_rule)
    yield RULE
    MIXING_RULES.remove(RULE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bases):
    folder = tmp_path_factory.mktemp("rule-params")
    g, h = bases
    save_checkpoint(g, folder / "std", {"dataset": "digits"})
    save_checkpoint(h, folder / "rob", {"dataset": "digits"})
    return folder


def _help(command: str) -> str:
    sub = build_parser(command)._subparsers._group_actions[0].choices[command]
    return " ".join(sub.format_help().split())


def _share(label: int) -> float:
    y = load_dataset("digits", "test").y[:N]
    return 100.0 * float((y == label).float().mean())


def test_the_registry_holds_the_rule_with_its_defaults_and_builds_others(winner, bases):
    g, h = bases
    x = torch.rand(4, 1, 8, 8)
    assert rule_params_class(winner) is WinnerParams and rule_params_class("prob") is None
    assert MixedClassifier(g, h, 0.5, rule=winner)(x).argmax(1).tolist() == [0] * 4
    assert MixedClassifier(g, h, 0.5, rule=build_rule(winner, {"winner": 7}))(x).argmax(1).tolist() == [7] * 4
    with pytest.raises(ConfigError, match="winner must be a class"):
        build_rule(winner, {"winner": 12})
    with pytest.raises(ConfigError, match="unknown key"):
        build_rule(winner, {"loser": 1})
    with pytest.raises(ConfigError, match="'prob' takes no parameters"):
        build_rule("prob", {"winner": 1})


@pytest.mark.parametrize("command", ["evaluate", "sweep", "export"])
def test_the_parameters_are_options_of_every_command_that_builds_a_mixture(winner, command):
    text = _help(command)
    assert f"parameters of mixing rule {winner}: every input is the winner class" in text
    assert f"--{winner}-winner WINNER the class every input is given (default: 0)" in text
    assert f"--{winner}-margin MARGIN how far the winner's logit lies above the others (default: 10)" in text


def test_evaluate_hands_the_parameters_to_the_rule(winner, checkpoints, tmp_path, capsys):
    common = ["evaluate", "--std", str(checkpoints / "std"), "--rob", str(checkpoints / "rob"), "--alpha", "0.5",
              "--rule", winner, "--attacks", "pgd", "--n-examples", str(N), "--eps", "0.1", "--no-progress",
              "--device", "cpu"]
    for label in (0, 3):
        out = tmp_path / f"eval{label}.json"
        extra = [] if label == 0 else [f"--{winner}-winner", str(label)]
        assert main([*common, *extra, "-o", str(out)]) == 0
        written = json.loads(out.read_text())
        assert {e["clean_pred"] for e in written["results"]["examples"]} == {label}
        assert written["results"]["summary"]["clean_accuracy"] == pytest.approx(_share(label))
        assert written["config"]["rule_params"] == ({} if label == 0 else {winner: {"winner": label}})
    # a parameter of a rule the run does not use would be ignored: refused in one line
    with_prob = ["prob" if a == winner else a for a in common]
    assert main([*with_prob, f"--{winner}-winner", "2", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert f"--{winner}-* given, but mixing rule '{winner}' is not a rule of this run (prob)" in err
    assert "Traceback" not in err


def test_sweep_hands_the_parameters_to_the_rule(winner, checkpoints, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--std", str(checkpoints / "std"), "--rob", str(checkpoints / "rob"), "--variants",
                 f"{winner},prob", "--alphas", "0.5", "--steps", "1", "--n-examples", str(N), "--eps", "0.1",
                 f"--{winner}-winner", "5", f"--{winner}-margin", "3", "--no-progress", "--device", "cpu",
                 "-o", str(out)]) == 0
    written = json.loads((out / "sweep.json").read_text())
    row = next(r for r in written["results"]["rows"] if r["variant"] == winner)
    assert row["clean_acc"] == pytest.approx(_share(5))
    assert written["config"]["rule_params"] == {winner: {"winner": 5, "margin": 3.0}}


def test_config_file_values_and_command_line_values_merge(winner, tmp_path):
    from adasmooth.cli.options import config_from_args
    from adasmooth.evaluate.sweep import SweepConfig

    config = tmp_path / "sweep.yaml"
    config.write_text(f"variants: [{winner}]\nrule_params:\n  {winner}: {{winner: 4, margin: 2.5}}\n")
    args = build_parser("sweep").parse_args(["sweep", f"--{winner}-winner", "6"])
    cfg = config_from_args(SweepConfig, args, config)
    assert cfg.rule_params == {winner: {"winner": 6, "margin": 2.5}}


def test_export_takes_the_registered_rules_and_refuses_those_it_cannot_trace(checkpoints, tmp_path, capsys):
    assert "--rule RULE mixing rule of a fixed mixture: prob, logit, grad_g" in _help("export")
    common = ["export", "--std", str(checkpoints / "std"), "--rob", str(checkpoints / "rob"), "--alpha", "0.5",
              "--input-shape", "1", "8", "8", "--format", "torchscript"]
    assert main([*common, "--rule", "logit", "-o", str(tmp_path / "logit.pt")]) == 0
    assert main([*common, "--rule", "grad_g", "-o", str(tmp_path / "grad.pt")]) == 2
    err = capsys.readouterr().err
    assert "rule 'grad_g' takes input gradients inside forward and cannot be exported" in err
    assert not (tmp_path / "grad.pt").exists()
