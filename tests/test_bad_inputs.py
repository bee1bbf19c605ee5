"""Bad input, as a new user gives it: every case ends in one clear error naming the value or file.

Library cases assert the error family (adasmooth.core.errors) and a message fragment; command-line cases
assert exit code 2, one line on stderr with the fragment, and no traceback. Each class of failure the
hardening issue found is represented: silent wrong results (another input shape, NaN, out-of-range
inputs and labels), destroyed files, tracebacks, work thrown away, nonsense accepted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from adasmooth.attacks import APGD, PGD, APGDTargeted, make_attack
from adasmooth.cli import main
from adasmooth.core.config import from_mapping
from adasmooth.core.errors import CheckpointError, ConfigError, DataError, InputError
from adasmooth.core.runtime import resolve_device
from adasmooth.data import load_dataset
from adasmooth.mixing import MixedClassifier, mix_log_probs
from adasmooth.models import create_model
from adasmooth.models.checkpoint import load_checkpoint, save_checkpoint
from adasmooth.train import TrainConfig

from digits_models import train_digits_model

ATTACKS = {"pgd": lambda m, eps=0.1, **kw: PGD(m, eps, steps=2, seed=0, **kw),
           "apgd": lambda m, eps=0.1, **kw: APGD(m, eps, steps=2, seed=0, **kw),
           "apgd-t": lambda m, eps=0.1, **kw: APGDTargeted(m, eps, steps=2, seed=0, n_target_classes=2, **kw)}


def tiny_model(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return create_model("small-cnn", classes, in_channels=1, width=4, hidden=8, input_shape=(1, 8, 8)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    data = load_dataset("digits", "test")
    return data.x[:6].clone(), data.y[:6].clone()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A standard and a robust digits checkpoint whose sidecars record data set and threat model."""
    folder = tmp_path_factory.mktemp("bad-input-ckpts")
    meta = {"dataset": "digits", "metrics": {"eval_eps": 0.1, "eval_norm": "linf"}}
    save_checkpoint(train_digits_model(adversarial=False, epochs=1, seed=1), folder / "std", meta)
    save_checkpoint(train_digits_model(adversarial=True, epochs=1, seed=0), folder / "rob", meta)
    return folder


# ---------------------------------------------------------------------------- attacks: inputs and labels


def _nan(x, y):
    x = x.clone()
    x[0, 0, 0, 0] = math.nan
    return x, y


BATCH_CASES = {
    "nan-input": (_nan, "NaN"),
    "input-above-1": (lambda x, y: (x * 3, y), "must lie in [0, 1]"),
    "input-below-0": (lambda x, y: (x - 0.5, y), "must lie in [0, 1]"),
    "integer-input": (lambda x, y: ((x * 255).long(), y), "floating point"),
    "float-labels": (lambda x, y: (x, y.float()), "integers"),
    "labels-beyond-classes": (lambda x, y: (x, torch.full_like(y, 12)), "labels must lie in [0, 9]"),
    "negative-labels": (lambda x, y: (x, -torch.ones_like(y)), "labels must be >= 0"),
    "label-count": (lambda x, y: (x, y[:3]), "labels must have shape (6,)"),
    "unbatched-input": (lambda x, y: (x[0, 0, 0], y), "expected a batch"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_attacks_refuse_bad_batches(model, batch, attack, case):
    corrupt, fragment = BATCH_CASES[case]
    x, y = corrupt(*batch)
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        ATTACKS[attack](model)(x, y)


EPS_CASES = {"nan": (math.nan, "finite"), "inf": (math.inf, "finite"), "huge": (1e9, "pixel units"),
             "negative": (-0.1, ">= 0")}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("case", sorted(EPS_CASES))
def test_attacks_refuse_nonsense_radii(model, attack, case):
    eps, fragment = EPS_CASES[case]
    with pytest.raises(InputError, match=fragment):
        ATTACKS[attack](model, eps=eps)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_refuse_an_unknown_norm(model, attack):
    with pytest.raises(InputError, match="unknown norm"):
        ATTACKS[attack](model, norm="l1")


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_refuse_probability_outputs(batch, attack):
    softmaxed = nn.Sequential(tiny_model(), nn.Softmax(dim=1)).eval()
    with pytest.raises(InputError, match="returns probabilities"):
        ATTACKS[attack](softmaxed)(*batch)


def test_a_perturbation_never_leaves_the_ball_or_the_input_range(model, batch):
    x, y = batch
    x_adv = PGD(model, 0.1, steps=3, seed=0)(x, y)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


@pytest.mark.parametrize("name, options, fragment", [
    ("no-such-attack-xyz", {}, "unknown attack 'no-such-attack-xyz'"),
    ("D", {}, "needs a mixed classifier"),
    ("pgd", {"momentum_decay": 0.5}, "momentum_decay"),
])
def test_make_attack_errors(model, name, options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_attack(name, model, 0.1, **options)


# ---------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("alpha, fragment", [(1.5, "alpha must lie in"), (math.nan, "alpha must lie in"),
                                             (torch.tensor([0.2, 0.8]), "takes one alpha"),
                                             ("half", "must be a number")])
def test_mixed_classifier_refuses_bad_alphas(model, alpha, fragment):
    with pytest.raises(InputError, match=fragment):
        MixedClassifier(model, model, alpha)


def test_mixed_classifier_refuses_bases_with_other_class_counts(model):
    with pytest.raises(ValueError, match="class count"):
        MixedClassifier(model, tiny_model(classes=5), 0.5)


def test_mixed_classifier_refuses_an_unknown_rule(model):
    with pytest.raises(ConfigError, match="unknown mixing rule"):
        MixedClassifier(model, model, 0.5, rule="no-such-rule-xyz")


def test_mix_log_probs_refuses_mismatched_shapes():
    with pytest.raises(InputError, match="alpha must be"):
        mix_log_probs(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="shape"):
        mix_log_probs(torch.zeros(3, 4), torch.zeros(3, 5), 0.5)


def test_a_model_refuses_inputs_of_another_shape(model):
    with pytest.raises(InputError, match=r"\(1, 8, 8\)"):
        model(torch.zeros(2, 1, 28, 28))


# ---------------------------------------------------------------------------- data, models, checkpoints


@pytest.mark.parametrize("args, error, fragment", [
    (("imagenet-22k",), ConfigError, "unknown data set"),
    (("digits", "dev"), ConfigError, "split"),
    (("digits", "val"), ConfigError, "val_fraction"),
])
def test_load_dataset_argument_errors(args, error, fragment):
    with pytest.raises(error, match=fragment):
        load_dataset(*args)


def test_load_dataset_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "train", tmp_path)


def test_load_dataset_names_a_corrupt_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not gzip")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", tmp_path)


@pytest.mark.parametrize("name, kwargs, fragment", [
    ("vit-huge", {}, "unknown model"), ("small-cnn", {"num_classes": 1}, "num_classes"),
    ("wrn-33-10", {}, "6n\\+4"),
])
def test_create_model_errors(name, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        create_model(name, **{"num_classes": 10, **kwargs})


def _saved(tmp_path: Path) -> Path:
    save_checkpoint(tiny_model(), tmp_path / "m", {"dataset": "digits"})
    return tmp_path / "m"


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.with_suffix(".safetensors").write_bytes(p.with_suffix(".safetensors").read_bytes()[:100]),
     "m.safetensors"),
    (lambda p: p.with_suffix(".json").write_text("{not json"), "m.json"),
    (lambda p: p.with_suffix(".json").write_text('{"architecture": "small-cnn"}'), "m.json"),
    (lambda p: p.with_suffix(".json").write_text(
        p.with_suffix(".json").read_text().replace('"small-cnn"', '"resnet18"')), "m"),
    (lambda p: p.with_suffix(".safetensors").unlink(), "m.safetensors"),
])
def test_damaged_checkpoints_give_one_clear_error(tmp_path, damage, fragment):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("device, fragment", [("tpu", "unknown device 'tpu'"), ("gpu:7", "unknown device")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_resolve_device_errors(device, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_device(device)


@pytest.mark.parametrize("values, fragment", [
    ({"lr": math.nan}, "lr"), ({"lr": math.inf}, "lr"), ({"lr": -1.0}, "lr"), ({"epochs": 0}, "epochs"),
    ({"eps": math.inf}, "eps"), ({"eps": 1e9}, "eps"), ({"sigma": 0.0}, "sigma"), ({"batch_size": 0}, "batch_size"),
    ({"learning_rate": 0.1}, "unknown key"), ({"epochs": "ten"}, "expected an integer"),
    ({"method": "no-such-method-xyz"}, "unknown training method"), ({"optimizer": "lion"}, "not one of"),
])
def test_training_config_errors(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_mapping(TrainConfig, values)


# ---------------------------------------------------------------------------- the command line


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse: a value of the wrong type or choice
        rc = stop.code
    return rc, capsys.readouterr().err


def assert_clean_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, err
    assert fragment in err, err
    assert "Traceback" not in err


def evaluate_args(ckpts, tmp_path, *extra):
    return ["evaluate", "--model", ckpts / "rob", "--n-examples", "4", "--no-progress",
            "-o", tmp_path / "e.json", *extra]


EVALUATE_CASES = {
    "missing-model": (lambda c, t: ["evaluate", "--model", t / "absent", "--no-progress", "-o", t / "e.json"],
                      "absent"),
    "device-tpu": (lambda c, t: evaluate_args(c, t, "--device", "tpu"), "unknown device 'tpu'"),
    "eps-inf": (lambda c, t: evaluate_args(c, t, "--eps", "inf"), "eps must be a finite number"),
    "eps-nan": (lambda c, t: evaluate_args(c, t, "--eps", "nan"), "eps must be a finite number"),
    "eps-huge": (lambda c, t: evaluate_args(c, t, "--eps", "1e9"), "eps must be a finite number >= 0 and <= 1"),
    "eps-text": (lambda c, t: evaluate_args(c, t, "--eps", "big"), "expected a number"),
    "unknown-attack": (lambda c, t: evaluate_args(c, t, "--attacks", "no-such-attack-xyz"), "unknown attack"),
    "mixed-only-attack": (lambda c, t: evaluate_args(c, t, "--attacks", "A"), "needs a mixed classifier"),
    "other-dataset": (lambda c, t: evaluate_args(c, t, "--dataset", "mnist"), "trained on digits"),
    "alpha-out-of-range": (lambda c, t: ["evaluate", "--std", c / "std", "--rob", c / "rob", "--alpha", "2",
                                         "-o", t / "e.json"], "alpha must lie in [0, 1]"),
    "mixture-without-alpha": (lambda c, t: ["evaluate", "--std", c / "std", "--rob", c / "rob",
                                            "-o", t / "e.json"], "--alpha"),
    "model-and-mixture": (lambda c, t: evaluate_args(c, t, "--std", c / "std"), "do not combine"),
    "batch-size-0": (lambda c, t: evaluate_args(c, t, "--batch-size", "0"), "batch_size"),
    "n-examples-0": (lambda c, t: evaluate_args(c, t, "--n-examples", "0"), "n_examples"),
    "output-is-a-folder": (lambda c, t: evaluate_args(c, t, "-o", t), "existing folder"),
    "output-overwrites-sidecar": (lambda c, t: evaluate_args(c, t, "-o", c / "rob.json"), "would overwrite"),
    "output-under-a-file": (lambda c, t: evaluate_args(c, t, "-o", c / "rob.json" / "e.json"), "is a file"),
    "missing-config": (lambda c, t: evaluate_args(c, t, "--config", t / "nothing.yaml"), "nothing.yaml"),
    "unknown-norm": (lambda c, t: evaluate_args(c, t, "--norm", "l1"), "invalid choice"),
    "mixnet-missing": (lambda c, t: ["evaluate", "--mixnet", t / "no-mixnet", "-o", t / "e.json"], "no-mixnet"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_bad_inputs(ckpts, tmp_path, capsys, case):
    make, fragment = EVALUATE_CASES[case]
    rc, err = run_cli(make(ckpts, tmp_path), capsys)
    assert_clean_error(rc, err, fragment)
    assert not (tmp_path / "e.json").exists()


def test_evaluate_config_file_errors(ckpts, tmp_path, capsys):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("epsilon: 0.1\n")
    assert_clean_error(*run_cli(evaluate_args(ckpts, tmp_path, "--config", bad_key), capsys), "unknown key")
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("eps: [0.1\n")
    assert_clean_error(*run_cli(evaluate_args(ckpts, tmp_path, "--config", bad_yaml), capsys), "could not be parsed")
    code = tmp_path / "code.yaml"
    code.write_text("eps: !!python/object/apply:os.system ['echo hacked']\n")
    assert_clean_error(*run_cli(evaluate_args(ckpts, tmp_path, "--config", code), capsys), "could not be parsed")


def test_evaluate_corrupt_checkpoint(ckpts, tmp_path, capsys):
    broken = tmp_path / "broken"
    for suffix in (".safetensors", ".json"):
        broken.with_suffix(suffix).write_bytes((ckpts / "rob").with_suffix(suffix).read_bytes())
    weights = broken.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:200])
    rc, err = run_cli(["evaluate", "--model", broken, "--no-progress", "-o", tmp_path / "e.json"], capsys)
    assert_clean_error(rc, err, "broken.safetensors")


def test_evaluate_debug_shows_the_traceback(ckpts, tmp_path):
    with pytest.raises(ConfigError):
        main([str(a) for a in evaluate_args(ckpts, tmp_path, "--dataset", "mnist", "--debug")])


TRAIN_CASES = {
    "lr-nan": (["--lr", "nan"], "lr must be a finite number"),
    "lr-inf": (["--lr", "inf"], "lr must be a finite number"),
    "epochs-0": (["--epochs", "0"], "epochs must be >= 1"),
    "unknown-method": (["--method", "no-such-method-xyz"], "unknown training method 'no-such-method-xyz'"),
    "unknown-dataset": (["--dataset", "imagenet-22k"], "unknown data set"),
    "unknown-arch": (["--arch", "vit-huge"], "unknown model"),
    "eps-huge": (["--eps", "1e9"], "eps"),
    "sigma-0": (["--method", "gaussian", "--sigma", "0"], "sigma"),
    "catrs-cached-without-targets": (["--method", "cat-rs", "--catrs-target", "cached"], "target_path"),
    "device-tpu": (["--device", "tpu"], "unknown device"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_base_bad_inputs(tmp_path, capsys, case):
    extra, fragment = TRAIN_CASES[case]
    rc, err = run_cli(["train-base", "--epochs", "1", "--n-train", "64", "--no-progress",
                       "-o", tmp_path / "m", *extra], capsys)
    assert_clean_error(rc, err, fragment)
    assert not (tmp_path / "m.safetensors").exists()


def test_train_base_output_that_cannot_be_written_is_found_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = run_cli(["train-base", "--no-progress", "-o", blocker / "m"], capsys)
    assert_clean_error(rc, err, "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: a read-only folder stops no one")
def test_train_base_unwritable_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        rc, err = run_cli(["train-base", "--no-progress", "-o", folder / "m"], capsys)
    finally:
        folder.chmod(0o700)
    assert_clean_error(rc, err, "no write permission")


def test_train_base_foreign_resume_file(tmp_path, capsys):
    out = tmp_path / "m"
    (tmp_path / "m.resume.pt").write_bytes(b"PK\x03\x04 not a torch file")
    rc, err = run_cli(["train-base", "--epochs", "1", "--n-train", "64", "--eval-examples", "8", "--no-progress",
                       "-o", out], capsys)
    assert_clean_error(rc, err, "m.resume.pt")
    assert "weights_only=False" not in err


OTHER_COMMAND_CASES = {
    "sweep-alpha": (lambda c, t: ["sweep", "--std", c / "std", "--rob", c / "rob", "--alphas", "0,1.5",
                                  "-o", t / "s"], "alpha must lie in [0, 1]"),
    "sweep-variant": (lambda c, t: ["sweep", "--std", c / "std", "--rob", c / "rob", "--variants", "softmax",
                                    "-o", t / "s"], "softmax"),
    "sweep-missing-rob": (lambda c, t: ["sweep", "--std", c / "std", "-o", t / "s"], "--rob"),
    "certify-alpha-conf": (lambda c, t: ["certify", "--model", c / "rob", "--alpha-conf", "1.5",
                                         "-o", t / "c"], "alpha_conf"),
    "certify-no-sigma": (lambda c, t: ["certify", "--model", c / "rob", "-o", t / "c"], "sigma"),
    "certify-sigma-negative": (lambda c, t: ["certify", "--model", c / "rob", "--sigma", "-1",
                                             "-o", t / "c"], "sigma"),
    "certify-radius-nan": (lambda c, t: ["certify", "--model", c / "rob", "--sigma", "0.25", "--radii", "nan",
                                         "-o", t / "c"], "radius"),
    "certify-alpha-without-std": (lambda c, t: ["certify", "--model", c / "rob", "--sigma", "0.25",
                                                "--alpha", "0.5", "-o", t / "c"], "--std"),
    "analyze-eps": (lambda c, t: ["analyze", "--rob", c / "rob", "--eps", "inf", "-o", t / "a"], "eps"),
    "analyze-nothing": (lambda c, t: ["analyze", "-o", t / "a"], "--std"),
    "calibrate-no-mixnet": (lambda c, t: ["calibrate", "--target-acc", "90"], "mixnet"),
    "calibrate-two-targets": (lambda c, t: ["calibrate", "--mixnet", t / "m", "--target-acc", "90",
                                            "--target-between", "0.5"], "exactly one"),
    "calibrate-missing-mixnet": (lambda c, t: ["calibrate", "--mixnet", t / "no-such-mixnet", "--target-acc", "90"],
                                 "no-such-mixnet"),
    "train-mixnet-missing-base": (lambda c, t: ["train-mixnet", "--std", t / "nope", "--rob", c / "rob",
                                                "-o", t / "x"], "nope"),
    "train-mixnet-setting": (lambda c, t: ["train-mixnet", "--std", c / "std", "--rob", c / "rob",
                                           "--setting", "E", "-o", t / "x"], "invalid choice"),
    "catrs-targets-no-sigma": (lambda c, t: ["catrs-targets", "--model", c / "rob", "-o", t / "t"], "sigma"),
    "catrs-targets-no-model": (lambda c, t: ["catrs-targets", "-o", t / "t"], "model is required"),
    "demo-dataset": (lambda c, t: ["demo", "--dataset", "cifar10", "-o", t / "d"], "invalid choice"),
    "demo-alpha": (lambda c, t: ["demo", "--alphas=-0.5,0.5", "-o", t / "d"], "alpha"),
}


@pytest.mark.parametrize("case", sorted(OTHER_COMMAND_CASES))
def test_other_commands_bad_inputs(ckpts, tmp_path, capsys, case):
    make, fragment = OTHER_COMMAND_CASES[case]
    rc, err = run_cli(make(ckpts, tmp_path) + ["--no-progress"], capsys)
    assert_clean_error(rc, err, fragment)


# ---------------------------------------------------------------------------- no output overwrites an input

OVERWRITES = {
    "evaluate": lambda c: ["evaluate", "--model", c / "rob", "-o", c / "rob.json"],
    "sweep": lambda c: ["sweep", "--std", c / "std", "--rob", c / "rob", "-o", c],  # c/sweep.json is fine, but...
    "certify": lambda c: ["certify", "--model", c / "rob", "--sigma", "0.25", "-o", c / "rob"],
    "analyze": lambda c: ["analyze", "--rob", c / "rob", "-o", c / "rob"],
    "train-base": lambda c: ["train-base", "--method", "cat-rs", "--catrs-target", "cached",
                             "--catrs-target-path", c / "rob", "-o", c / "rob"],
    "train-mixnet": lambda c: ["train-mixnet", "--std", c / "std", "--rob", c / "rob", "-o", c / "std"],
    "catrs-targets": lambda c: ["catrs-targets", "--model", c / "rob", "--sigma", "0.25", "-o", c / "rob"],
    "calibrate": lambda c: ["calibrate", "--mixnet", c / "rob", "--target-acc", "90", "-o", c / "rob"],
}


@pytest.mark.parametrize("command", sorted(OVERWRITES))
def test_no_command_may_overwrite_its_inputs(ckpts, tmp_path, capsys, command):
    """Each command is pointed at one of its own inputs as output: refused before any work, files intact."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("std", "rob"):
        for suffix in (".safetensors", ".json"):
            (folder / name).with_suffix(suffix).write_bytes((ckpts / name).with_suffix(suffix).read_bytes())
    if command == "sweep":  # the sweep writes sweep.json into its folder: make that an input
        (folder / "sweep.json").write_text("{}")
        argv = ["sweep", "--std", folder / "std", "--rob", folder / "rob", "-o", folder,
                "--config", folder / "sweep.json"]
    else:
        argv = OVERWRITES[command](folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rc, err = run_cli(argv + ["--no-progress"], capsys)
    assert_clean_error(rc, err, "would overwrite the input")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_every_command_declares_its_files():
    from adasmooth.cli import COMMANDS, command_module

    assert all(hasattr(command_module(name), "files") for name, _, _ in COMMANDS)


def test_a_missing_optional_package_is_found_before_any_work(ckpts, tmp_path, capsys, monkeypatch):
    """pyautoattack missing: evaluate (autoattack) and calibrate --report (column C) stop before any attack."""
    monkeypatch.setitem(__import__("sys").modules, "pyautoattack", None)  # any import of it now fails
    rc, err = run_cli(evaluate_args(ckpts, tmp_path, "--eps", "0.1", "--attacks", "apgd-ce,autoattack"), capsys)
    assert_clean_error(rc, err, "pip install pyautoattack")
    assert not (tmp_path / "e.json").exists()
    rc, err = run_cli(["calibrate", "--mixnet", ckpts / "rob", "--target-acc", "90", "--report",
                       "-o", tmp_path / "cal"], capsys)
    assert_clean_error(rc, err, "pip install pyautoattack")
