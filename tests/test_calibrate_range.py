"""Calibration that an attack on alpha cannot game (adasmooth.evaluate.calibrate, the ``calibrate`` command):
the paired interval by hand, the range choice, the comparison with the fixed alpha, the bad inputs."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

import adasmooth.evaluate.calibrate as calibration
from adasmooth.cli import main
from adasmooth.cli.calibrate import describe_comparison
from adasmooth.core.errors import InputError
from adasmooth.data.base import load_dataset
from adasmooth.evaluate.calibrate import (
    attacked_correct,
    calibrate_range,
    calibration_overlap,
    compare_adaptive_fixed,
    fixed_alpha_classifier,
)
from adasmooth.evaluate.paired import paired_difference, paired_difference_interval
from adasmooth.mixing import MixedClassifier, mix_logits
from adasmooth.mixing.adaptive import build_adaptive_classifier, load_adaptive_classifier, save_adaptive_classifier
from adasmooth.mixing.protocol import MixOutput
from adasmooth.models.checkpoint import save_checkpoint
from adasmooth.train.loop import clean_accuracy

Z95 = 1.959964  # the standard normal's 97.5 % quantile (tables)


# ---------------------------------------------------------------------------- the paired interval


def test_paired_interval_matches_hand_computed_values():
    # n = 200, 20 inputs right for the first classifier alone, 10 for the second alone. Adding 1/2 to each
    # cell: a = 20.5 / 202, b = 10.5 / 202, a - b = 10 / 202 = 0.0495050,
    # variance = ((a + b) - (a - b)^2) / 202 = (0.1534653 - 0.0024507) / 202 = 0.000747597, sd 0.0273422,
    # half width 1.959964 * 0.0273422 = 0.0535897 -> [-0.0040848, 0.1030947]
    lo, hi = paired_difference_interval(200, 20, 10)
    assert lo == pytest.approx(-0.0040848, abs=1e-6) and hi == pytest.approx(0.1030947, abs=1e-6)
    # no discordant pair among 10: a = b = 0.5 / 12, variance (1/12) / 12 = 1/144: half width z / 12
    lo, hi = paired_difference_interval(10, 0, 0)
    assert lo == pytest.approx(-Z95 / 12, abs=1e-6) and hi == pytest.approx(Z95 / 12, abs=1e-6)
    # 90 %: z = 1.644854; the same table, half width 1.644854 * 0.0273422 = 0.0449741
    lo, hi = paired_difference_interval(200, 20, 10, confidence=0.9)
    assert lo == pytest.approx(0.0495050 - 0.0449741, abs=1e-6) and hi == pytest.approx(0.0495050 + 0.0449741, abs=1e-6)
    # one input, right for the first alone: a = 1.5 / 3, b = 0.5 / 3, variance ((2/3) - (1/3)^2) / 3 = 5/27,
    # half width 1.959964 * 0.4303315 = 0.8434342: [1/3 - 0.8434342, 1/3 + 0.8434342], clipped at 1
    lo, hi = paired_difference_interval(1, 1, 0)
    assert lo == pytest.approx(1 / 3 - 0.8434342, abs=1e-6) and hi == 1.0


def test_paired_difference_counts_the_discordant_inputs():
    first = [True, True, False, False, True]
    second = [True, False, True, False, False]
    out = paired_difference(first, second)
    assert (out["first_only"], out["second_only"], out["n"]) == (2, 1, 5)
    assert out["first_acc"] == 60.0 and out["second_acc"] == 40.0 and out["difference"] == pytest.approx(20.0)
    assert out["interval"] == pytest.approx([100 * v for v in paired_difference_interval(5, 2, 1)])
    with pytest.raises(InputError, match="same inputs"):
        paired_difference(first, second[:4])
    with pytest.raises(InputError, match="first_only"):
        paired_difference_interval(3, 2, 2)
    with pytest.raises(InputError, match="confidence"):
        paired_difference_interval(3, 1, 1, confidence=1.0)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(std_digits_model, robust_model):
    return std_digits_model, robust_model


def _mixnet(g, h, seed: int = 0):
    torch.manual_seed(seed)
    return build_adaptive_classifier(g, h, (1, 8, 8), widths=(8, 8, 8), blocks=(1, 1, 1)).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, bases):
    """g, h and an (untrained) mixing network on digits whose sidecar records its training images."""
    folder = tmp_path_factory.mktemp("calibrate-range")
    g, h = bases
    meta = {"dataset": "digits", "metrics": {"eval_eps": 0.1, "eval_norm": "linf"}}
    save_checkpoint(g, folder / "std", meta)
    save_checkpoint(h, folder / "rob", meta)
    training = {"config": {"dataset": "digits", "eps": 0.1, "norm": "linf", "val_fraction": 0.1, "seed": 0}}
    for name, record in (("mix", training), ("mix-all", {"config": {**training["config"], "val_fraction": 0.0}})):
        save_adaptive_classifier(_mixnet(g, h), folder / name, {"std_checkpoint": str(folder / "std"),
                                                                "rob_checkpoint": str(folder / "rob"),
                                                                "dataset": "digits", "training": record})
    return folder


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- the range choice


def test_range_choice_keeps_the_width_with_the_most_inputs_correct_under_attack(bases):
    g, h = bases
    model = _mixnet(g, h)
    calib = load_dataset("digits", "test").subset(150)
    target = 0.5 * (clean_accuracy(g, calib) + clean_accuracy(h, calib))
    widths = (1.0, 0.05, 0.2)
    out = calibrate_range(model, calib, target, widths, eps=0.1, attack_examples=30, apgd_steps=3, n_target_classes=2)
    cands = out["candidates"]
    assert [c["width"] for c in cands] == [0.05, 0.2, 1.0]  # narrowest first
    assert out["width"] in widths
    reached = [c for c in cands if c["reached"]]
    assert reached and out["robust_acc"] == max(c["robust_acc"] for c in reached)
    first_best = next(c for c in reached if c["robust_acc"] == out["robust_acc"])
    assert out["width"] == first_best["width"]  # ties: the narrower
    # the network is left at the chosen range, whose clean accuracy is the recorded one and reaches the target
    head = model.mixing_net.eval_head()
    assert head["alpha_min"] == pytest.approx(out["value"]) and head["alpha_max"] - head["alpha_min"] == pytest.approx(out["width"])
    assert clean_accuracy(model, calib) == pytest.approx(out["clean_acc"]) and out["clean_acc"] >= target
    for c in cands:  # every floor is the highest the bisection allows: its range stays inside [0, 1]
        assert 0 <= c["alpha_min"] and c["alpha_max"] <= 1 and c["alpha_max"] - c["alpha_min"] == pytest.approx(c["width"])
    # the recorded outcomes are the chosen classifier's under setting D, seeded per input
    again = attacked_correct(model, calib.subset(30), 0.1, apgd_steps=3, n_target_classes=2)
    assert again == out["attacked_correct"] and 100 * sum(again) / 30 == pytest.approx(out["robust_acc"])


def test_ties_go_to_the_narrower_width(bases, monkeypatch):
    """Planted outcomes per width (the attack replaced by a table): the most robust wins, ties the narrower."""
    g, h = bases
    model = _mixnet(g, h)
    calib = load_dataset("digits", "test").subset(120)
    target = 0.5 * (clean_accuracy(g, calib) + clean_accuracy(h, calib))
    correct_by_width = {0.05: 3, 0.1: 5, 0.2: 5, 0.4: 2}

    def planted(m, data, *args, **kwargs):
        head = m.mixing_net.eval_head()
        k = correct_by_width[round(head["alpha_max"] - head["alpha_min"], 6)]
        return [i < k for i in range(len(data))]

    monkeypatch.setattr(calibration, "attacked_correct", planted)
    out = calibrate_range(model, calib, target, (0.4, 0.2, 0.1, 0.05), eps=0.1, attack_examples=10)
    assert all(c["reached"] for c in out["candidates"])
    assert out["width"] == 0.1 and out["robust_acc"] == 50.0
    assert [c["robust_acc"] for c in out["candidates"]] == [30.0, 50.0, 50.0, 20.0]


# ---------------------------------------------------------------------------- the comparison


class PlantedAlpha(nn.Module):
    """A mixture whose alpha an attacker drives to 0 at will: alpha(x) = sigmoid(100 (0.05 - s(x))), s the sum of
    two corner pixels that are 0 on every digits image (alpha 0.993, h's classifier, on clean inputs; an l_inf
    perturbation of 0.1 takes s to 0.2 and alpha to 3e-7, g's classifier)."""

    def __init__(self, g, h):
        super().__init__()
        self.std_model, self.rob_model = g, h

    def mix(self, x, detach_alpha: bool = False):
        alpha_logit = 100 * (0.05 - x[:, 0, 0, 0] - x[:, 0, -1, 0])
        alpha = torch.sigmoid(alpha_logit)
        used = alpha.detach() if detach_alpha else alpha
        return MixOutput(logits=mix_logits(self.std_model(x), self.rob_model(x), used), alpha=alpha,
                         alpha_logit=alpha_logit)

    def forward(self, x):
        return self.mix(x).logits


def test_an_alpha_the_attack_drives_down_loses_to_the_fixed_alpha(bases):
    g, h = bases
    data = load_dataset("digits", "test").subset(40)
    adaptive = PlantedAlpha(g, h).eval()
    with torch.no_grad():
        assert float(adaptive.mix(data.x).alpha.min()) > 0.99  # on clean inputs it is h's classifier
    fixed = MixedClassifier(g, h, 0.99).eval()
    out = compare_adaptive_fixed(adaptive, fixed, data, 0.1, apgd_steps=10, n_target_classes=2)
    assert out["verdict"] == "not better" and out["difference"] < 0 and out["interval"][1] < 0
    assert out["fixed_alpha"] == pytest.approx(0.99) and out["attack"]["examples"] == 40
    # setting D attacks the fixed mixture too (its alpha term has no gradient): it breaks some clean-correct inputs
    assert out["fixed_acc"] < clean_accuracy(fixed, data)
    out["use_instead"] = "adasmooth evaluate --std G --rob H --alpha 0.9900"
    text = describe_comparison(out)
    verdict = [line for line in text.splitlines() if "adaptive is" in line]
    assert len(verdict) == 1
    assert verdict[0].startswith("  adaptive is NOT better than fixed alpha 0.9900 here (setting D on 40 calibration")
    assert verdict[0].endswith("use a fixed alpha: adasmooth evaluate --std G --rob H --alpha 0.9900")
    assert f"{out['adaptive_acc']:.1f}% vs {out['fixed_acc']:.1f}%" in verdict[0]


def test_calibrate_command_records_the_range_choice_and_the_comparison(ckpts, bases, capsys, caplog):
    g, h = bases
    argv = ["calibrate", "--mixnet", ckpts / "mix", "--split", "val", "--val-fraction", "0.1", "--target-between",
            "0.5", "--range-widths", "0.05,0.2,1", "--attack-examples", "30", "--calib-apgd-steps", "3",
            "--calib-n-target-classes", "2", "-o", ckpts / "out"]
    with caplog.at_level(logging.WARNING):
        rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert not [r for r in caplog.records if r.name == calibration.__name__]  # same val_fraction and seed: no overlap
    res = json.loads((ckpts / "out.calibration.json").read_text())["results"]
    a, fixed = res["adaptive"][0], res["fixed"]
    assert a["param"] == "range" and a["width"] in (0.05, 0.2, 1.0) and len(a["candidates"]) == 3
    assert a["robust_acc"] == max(c["robust_acc"] for c in a["candidates"] if c["reached"])
    c = a["comparison"]
    assert c["adaptive_acc"] == pytest.approx(a["robust_acc"])
    assert c["fixed_alpha"] == pytest.approx(fixed["alpha"], abs=1e-6)  # the float32 alpha the mixture holds
    assert c["difference"] == pytest.approx(c["adaptive_acc"] - c["fixed_acc"])
    assert c["interval"] == pytest.approx([100 * v for v in paired_difference_interval(30, c["adaptive_only"],
                                                                                        c["fixed_only"])])
    assert c["verdict"] in ("better", "not clearly better", "not better")
    assert c["use_instead"] == f"adasmooth evaluate --std {ckpts / 'std'} --rob {ckpts / 'rob'} --alpha {fixed['alpha']:.4f}"
    # the fixed alpha faced the same attack on the same images
    calib = load_dataset("digits", "val", val_fraction=0.1, seed=0)
    fixed_correct = attacked_correct(fixed_alpha_classifier(g, h, fixed["alpha"]), calib.subset(30), 0.1,
                                     apgd_steps=3, n_target_classes=2, batch_size=250)
    assert 100 * sum(fixed_correct) / 30 == pytest.approx(c["fixed_acc"])
    # the calibrated checkpoint: the chosen range, and the same record
    model, info = load_adaptive_classifier(ckpts / "out")
    head = model.mixing_net.eval_head()
    assert head["alpha_min"] == pytest.approx(a["value"]) and head["alpha_max"] - head["alpha_min"] == pytest.approx(a["width"])
    assert info["calibration"]["comparison"] == c and info["calibration"]["candidates"] == a["candidates"]
    # the terminal: the candidates, both accuracies, and the verdict line that goes with the record
    assert f"adaptive {c['adaptive_acc']:.1f}%, fixed alpha {c['fixed_alpha']:.4f} {c['fixed_acc']:.1f}%" in out
    if c["verdict"] == "better":
        assert "adaptive is better than fixed alpha" in out and "NOT" not in out
    else:
        assert f"use a fixed alpha: {c['use_instead']}" in out


# ---------------------------------------------------------------------------- bad input


def _calib_accuracies(bases, n=144):
    g, h = bases
    calib = load_dataset("digits", "val", val_fraction=0.1, seed=0).subset(n)
    return clean_accuracy(g, calib), clean_accuracy(h, calib)


BAD = {
    "width-zero": (["--range-widths", "0,0.5"], "range widths must lie in (0, 1], got [0.0]"),
    "width-above-one": (["--range-widths", "0.5,1.5"], "range widths must lie in (0, 1], got [1.5]"),
    "alpha-range-above-one": (["--param", "shift", "--alpha-range", "0.5,1.2"], "alpha_range must be two numbers"),
    "alpha-range-reversed": (["--param", "alpha_min", "--alpha-range", "0.9,0.5"], "alpha_range must be two numbers"),
    "alpha-range-with-param-range": (["--alpha-range", "0.5,1"], "param range chooses"),
    "range-width": (["--param", "alpha_min", "--range-width", "1.5"], "range_width must be in (0, 1]"),
    "too-few-images": (["--calib-examples", "50"], "only 50 calibration images"),
    "attack-examples": (["--attack-examples", "0"], "attack_examples must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_input_is_one_line_exit_2(ckpts, capsys, case):
    extra, fragment = BAD[case]
    argv = ["calibrate", "--mixnet", ckpts / "mix", "--val-fraction", "0.1", "-o", ckpts / f"bad-{case}"]
    if "--target-acc" not in extra:
        argv += ["--target-between", "0.5"]
    rc, out, err = run_cli(argv + extra, capsys)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (ckpts / f"bad-{case}.safetensors").exists()


@pytest.mark.parametrize("side", ["above", "below"])
def test_a_target_outside_h_and_g_names_both_accuracies(ckpts, bases, capsys, side):
    acc_g, acc_h = _calib_accuracies(bases)
    assert acc_g > acc_h
    target = min(100.0, acc_g + 0.5) if side == "above" else acc_h - 0.5
    rc, out, err = run_cli(["calibrate", "--mixnet", ckpts / "mix", "--val-fraction", "0.1", "--target-acc",
                            str(target), "-o", ckpts / f"target-{side}"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is {side} what mixing can reach on the 144 calibration images" in err
    assert f"g {acc_g:.2f}%, h {acc_h:.2f}%" in err


def test_calibrating_on_the_mixnets_training_images_warns(ckpts, capsys, caplog):
    """mix-all trained on the whole training set (val_fraction 0): its split val is among its training images.
    (Too few images then stop the run cheaply: the warning comes first.)"""
    with caplog.at_level(logging.WARNING):
        rc, out, err = run_cli(["calibrate", "--mixnet", ckpts / "mix-all", "--val-fraction", "0.1", "--target-acc",
                                "90", "--calib-examples", "20", "-o", ckpts / "warned"], capsys)
    assert rc == 2 and "only 20 calibration images" in err
    warned = [r.getMessage() for r in caplog.records if r.name == calibration.__name__]
    assert len(warned) == 1 and "whole digits training set (val_fraction 0)" in warned[0]


@pytest.mark.parametrize("training,split,val_fraction,seed,expected", [
    ({}, "val", 0.1, 0, None),  # nothing recorded: nothing to check
    ({"config": {"dataset": "digits", "val_fraction": 0.1, "seed": 0}}, "val", 0.1, 0, None),
    ({"config": {"dataset": "digits", "val_fraction": 0.1, "seed": 0}}, "test", 0.1, 0, None),
    ({"config": {"dataset": "digits", "val_fraction": 0.0, "seed": 0}}, "test", 0.1, 0, None),
    ({"config": {"dataset": "digits", "val_fraction": 0.0, "seed": 0}}, "val", 0.1, 0, "val_fraction 0"),
    ({"config": {"dataset": "digits", "val_fraction": 0.2, "seed": 0}}, "val", 0.1, 0, "--val-fraction 0.2"),
    ({"config": {"dataset": "digits", "val_fraction": 0.1, "seed": 3}}, "val", 0.1, 0, "--seed 3"),
    ({"config": {"dataset": "mnist", "val_fraction": 0.0, "seed": 0}}, "val", 0.1, 0, None),  # another data set
    # the record the trainer writes of its images wins over its config
    ({"images": {"split": "train", "val_fraction": 0.1, "seed": 0, "n_train": 500},
      "config": {"dataset": "digits", "val_fraction": 0.3, "seed": 0}}, "val", 0.1, 0, None),
    ({"images": {"split": "test", "val_fraction": 0.0, "seed": 0, "n_train": 500}}, "test", 0.1, 0, "test images"),
    ({"images": {"split": "test", "val_fraction": 0.0, "seed": 0, "n_train": 500}}, "val", 0.1, 0, None),
])
def test_overlap_with_the_training_images(training, split, val_fraction, seed, expected):
    message = calibration_overlap(training, "digits", split, val_fraction, seed)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message
