"""Checkpoints: safetensors + JSON sidecar round trips, atomic writes, foreign .pt files without pickled code."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from adasmooth.models.checkpoint import (
    check_data_matches,
    checkpoint_paths,
    load_checkpoint,
    load_foreign_state_dict,
    read_sidecar,
    save_checkpoint,
    sidecar_defaults,
)
from adasmooth.core.errors import CheckpointError, ConfigError, InputError
from test_data import _Evil  # a pickle that would run a shell command
from adasmooth.models.base import create_model

META = {
    "dataset": "cifar10",
    "training": {"method": "trades", "config": {"eps": 0.031, "trades_beta": 6.0, "epochs": 3}},
    "metrics": {"clean_acc": 81.25, "pgd20_acc": 50.5},
    "sigma": 0.25,
}


def _model_with_state(name="resnet18", **kwargs):
    torch.manual_seed(0)
    model = create_model(name, 7, 3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], **kwargs)
    # Non-default batch-norm statistics: eval outputs depend on buffers as well as parameters.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_round_trip_outputs_and_sidecar(tmp_path):
    model = _model_with_state(width=4)
    weights = save_checkpoint(model, tmp_path / "runs" / "rob", META)
    assert weights == tmp_path / "runs" / "rob.safetensors"
    assert weights.is_file() and (tmp_path / "runs" / "rob.json").is_file()
    loaded, info = load_checkpoint(tmp_path / "runs" / "rob", torch.device("cpu"))
    assert not loaded.training
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info["architecture"] == "resnet18" and info["num_classes"] == 7 and info["in_channels"] == 3
    assert info["normalization"] == {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    assert info["model_kwargs"] == {"width": 4}
    assert info["dataset"] == "cifar10" and info["sigma"] == 0.25
    assert info["training"]["method"] == "trades" and info["training"]["config"]["trades_beta"] == 6.0
    assert info["metrics"] == {"clean_acc": 81.25, "pgd20_acc": 50.5}
    assert torch.__version__.startswith(info["provenance"]["versions"]["torch"])
    # The sidecar is plain JSON, readable without torch.
    assert json.loads((tmp_path / "runs" / "rob.json").read_text())["num_classes"] == 7
    assert read_sidecar(tmp_path / "runs" / "rob.safetensors") == info
    assert info["input_shape"] is None  # built without one: any input size is accepted
    # The data set comes back from the sidecar into the spec.
    assert loaded.spec == dataclasses.replace(model.spec, dataset="cifar10")


def test_wideresnet_kwargs_survive_round_trip(tmp_path):
    model = _model_with_state("wrn-10-2", dropout=0.1)
    save_checkpoint(model, tmp_path / "wrn.safetensors")
    loaded, info = load_checkpoint(tmp_path / "wrn.json")
    assert info["architecture"] == "wrn-10-2"
    assert len(loaded.block1) == 1 and loaded.block1[0].conv1.out_channels == 32
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_atomic_write_leaves_no_temporary_files_and_overwrites(tmp_path):
    first = _model_with_state("small-cnn", width=4, hidden=8)
    save_checkpoint(first, tmp_path / "m", {"metrics": {"clean_acc": 1.0}})
    second = create_model("small-cnn", 7, 3, width=4, hidden=8)
    save_checkpoint(second, tmp_path / "m", {"metrics": {"clean_acc": 2.0}})
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]
    loaded, info = load_checkpoint(tmp_path / "m")
    assert info["metrics"]["clean_acc"] == 2.0
    assert torch.equal(loaded.head[1].weight, second.head[1].weight)


def test_checkpoint_paths():
    for p in ("a/b", "a/b.safetensors", "a/b.json"):
        w, s = checkpoint_paths(p)
        assert (str(w), str(s)) == ("a/b.safetensors", "a/b.json")
    w, _ = checkpoint_paths("runs/model.v2")  # a dot in the name is not an extension
    assert str(w) == "runs/model.v2.safetensors"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="spec"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="x.safetensors"):
        load_checkpoint(tmp_path / "x")
    save_checkpoint(create_model("mlp", 3, 1, input_size=4, hidden=4), tmp_path / "y")
    (tmp_path / "y.json").unlink()
    with pytest.raises(FileNotFoundError, match="y.json"):
        load_checkpoint(tmp_path / "y")


# ------------------------------------------------------------------ foreign .pt files


def test_foreign_state_dict_prefixes_and_wrappers(tmp_path):
    model = _model_with_state("small-cnn", width=4, hidden=8)
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 99}, tmp_path / "dp.pt")
    torch.save({f"model.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pth")
    torch.save({"model": dict(state)}, tmp_path / "container.pt")
    for name in ("dp.pt", "wrapped.pth", "container.pt"):
        loaded_state = load_foreign_state_dict(tmp_path / name)
        assert set(loaded_state) == set(state)
        fresh = create_model("small-cnn", 7, 3, width=4, hidden=8)
        fresh.load_state_dict(loaded_state, strict=True)
        x = torch.rand(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), model(x))


def test_foreign_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = create_model("mlp", 3, 1, input_size=4, hidden=4).state_dict()
    torch.save({"state_dict": state, "extra": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds pickled code or is not a state dict") as err:
        load_foreign_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "evil.pt" in str(err.value) and "\n" not in str(err.value)
    assert "weights_only=False" not in str(err.value)  # never advise running the code


def test_foreign_file_without_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_foreign_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3, "net": {"w": torch.zeros(1)}}, tmp_path / "unknown_container.pt")
    with pytest.raises(CheckpointError, match="epoch, net.*not tensors"):
        load_foreign_state_dict(tmp_path / "unknown_container.pt")


@pytest.mark.parametrize("fault", ["missing", "truncated", "not_torch"])
def test_foreign_file_unreadable(tmp_path, fault):
    path = tmp_path / "w.pt"
    if fault == "truncated":
        torch.save(create_model("mlp", 3, 1, input_size=4, hidden=4).state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif fault == "not_torch":
        path.write_text("hello")
    with pytest.raises(CheckpointError) as err:
        load_foreign_state_dict(path)
    assert "w.pt" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ unusable checkpoints: one line each


def _saved_small(tmp_path, name="m", **kwargs):
    model = create_model("mlp", 3, 1, input_size=4, hidden=4, **kwargs)
    save_checkpoint(model, tmp_path / name, {"dataset": "digits"})
    return tmp_path / name


def _edit_sidecar(path, edit):
    sidecar = path.with_name(path.name + ".json")
    info = json.loads(sidecar.read_text())
    edit(info)
    sidecar.write_text(json.dumps(info))


def _load_error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and "weights_only=False" not in message
    return message


def test_missing_weights_or_sidecar(tmp_path):
    path = _saved_small(tmp_path)
    (tmp_path / "m.json").unlink()
    assert "m.json" in _load_error(path) and "not found" in _load_error(path)
    with pytest.raises(CheckpointError, match="m.json"):
        read_sidecar(path)
    path = _saved_small(tmp_path, "n")
    (tmp_path / "n.safetensors").unlink()
    assert "n.safetensors" in _load_error(path)


@pytest.mark.parametrize("fault", ["truncated", "garbage", "empty"])
def test_corrupt_weights_file(tmp_path, fault):
    path = _saved_small(tmp_path)
    weights = tmp_path / "m.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00\x01not safetensors" * 10,
                         "empty": b""}[fault])
    message = _load_error(path)
    assert "m.safetensors" in message and "truncated or not a safetensors file" in message


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    (b"\xff\xfe\x00".decode("latin-1"), "is not JSON"),
])
def test_sidecar_not_a_json_object(tmp_path, content, fragment):
    path = _saved_small(tmp_path)
    (tmp_path / "m.json").write_text(content, encoding="latin-1")
    message = _load_error(path)
    assert "m.json" in message and fragment in message


@pytest.mark.parametrize("field", ["architecture", "num_classes", "in_channels", "normalization"])
def test_sidecar_lacks_a_field(tmp_path, field):
    path = _saved_small(tmp_path)
    _edit_sidecar(path, lambda info: info.pop(field))
    message = _load_error(path)
    assert "m.json" in message and f"lacks the field(s) {field}" in message


@pytest.mark.parametrize("edit,fragment", [
    (lambda info: info.update(architecture="vgg99"), "unknown model 'vgg99'; known: "),
    (lambda info: info.update(num_classes="many"), "does not describe a model"),
    (lambda info: info.update(normalization=[0.5]), "'normalization' must hold 'mean' and 'std'"),
    (lambda info: info.update(model_kwargs={"depth": 3}), "does not describe a model"),
    (lambda info: info.update(model_kwargs=[1]), "'model_kwargs' must be an object"),
    (lambda info: info.update(input_shape=[3, 8, 8]), "input_shape (3, 8, 8) has 3 channels"),
    (lambda info: info.update(kind="adaptive-mixed-classifier"), "load_adaptive_classifier"),
])
def test_sidecar_that_describes_no_model(tmp_path, edit, fragment):
    path = _saved_small(tmp_path)
    _edit_sidecar(path, edit)
    message = _load_error(path)
    assert "m.json" in message and fragment in message


@pytest.mark.parametrize("edit,fragment", [
    (lambda info: info["model_kwargs"].update(hidden=8), "shape mismatch stage1.0.weight (4, 16) in the file, (8, 16)"),
    (lambda info: info.update(architecture="small-cnn", model_kwargs={"width": 2, "hidden": 4}),
     "missing keys head.1.bias, head.1.weight, head.3.bias (+"),
])
def test_weights_that_do_not_fit_the_sidecar(tmp_path, edit, fragment):
    path = _saved_small(tmp_path)
    _edit_sidecar(path, edit)
    message = _load_error(path)
    assert "m.safetensors" in message and "do not fit the model" in message and fragment in message


def test_unexpected_and_missing_keys_in_the_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved_small(tmp_path)
    weights = tmp_path / "m.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = torch.zeros(2)
    del state["head.bias"]
    save_file(state, str(weights))
    message = _load_error(path)
    assert "missing keys head.bias" in message and "unexpected keys extra.weight" in message


def test_failed_save_leaves_old_checkpoint_and_no_temporary_files(tmp_path, monkeypatch):
    import adasmooth.models.checkpoint as ckpt

    path = _saved_small(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save_file(state, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(create_model("mlp", 3, 1, input_size=4, hidden=4), path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_checkpoint(path)  # still whole


# ------------------------------------------------------------------ input shape and data set in the sidecar


def test_input_shape_round_trip_and_enforced_after_loading(tmp_path):
    model = create_model("small-cnn", 10, 1, width=4, hidden=8, input_shape=(1, 8, 8), dataset="digits")
    save_checkpoint(model, tmp_path / "d")
    info = read_sidecar(tmp_path / "d")
    assert info["input_shape"] == [1, 8, 8] and info["dataset"] == "digits"
    loaded, _ = load_checkpoint(tmp_path / "d")
    assert loaded.spec == model.spec and loaded.spec.input_shape == (1, 8, 8)
    loaded(torch.rand(2, 1, 8, 8))
    with pytest.raises(InputError, match=r"\(1, 8, 8\).*\(1, 28, 28\)"):
        loaded(torch.rand(2, 1, 28, 28))


def test_metadata_dataset_wins_over_the_spec(tmp_path):
    model = create_model("mlp", 3, 1, input_size=4, hidden=4, dataset="digits")
    save_checkpoint(model, tmp_path / "m", {"dataset": "mnist"})
    assert read_sidecar(tmp_path / "m")["dataset"] == "mnist"


def test_old_sidecar_without_input_shape_loads_and_accepts_any_size(tmp_path):
    model = create_model("small-cnn", 10, 1, width=4, hidden=8, input_shape=(1, 8, 8))
    save_checkpoint(model, tmp_path / "old", {"dataset": "digits"})
    _edit_sidecar(tmp_path / "old", lambda info: info.pop("input_shape"))
    loaded, info = load_checkpoint(tmp_path / "old")
    assert loaded.spec.input_shape is None
    assert loaded(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_check_data_matches():
    digits = {"dataset": "digits", "input_shape": [1, 8, 8], "in_channels": 1}
    check_data_matches(digits, "digits", (1, 8, 8), "std.json")
    check_data_matches(digits, "digits", None, "std.json")  # shape from the registry
    with pytest.raises(ConfigError) as err:
        check_data_matches(digits, "mnist", (1, 28, 28), "runs/std")
    assert str(err.value) == (
        "runs/std was trained on digits (input (1, 8, 8)) but the data are mnist (input (1, 28, 28)); "
        "pass --dataset digits or a checkpoint trained on mnist"
    )
    # Same shape, other data set: still refused.
    with pytest.raises(ConfigError, match=r"trained on mnist \(input \(1, 28, 28\)\) but the data are fashion-mnist"):
        check_data_matches({"dataset": "mnist"}, "fashion-mnist", None, "g")
    # A sidecar with a shape and no data set.
    with pytest.raises(ConfigError, match=r"^h was trained on input \(1, 8, 8\) but the data are mnist .*; pass a"):
        check_data_matches({"input_shape": [1, 8, 8]}, "mnist", None, "h")
    # An old sidecar with neither: only the channel count can be compared.
    with pytest.raises(ConfigError, match="trained on 3-channel inputs but the data are mnist"):
        check_data_matches({"in_channels": 3}, "mnist", None, "h")
    check_data_matches({"in_channels": 1}, "mnist", None, "h")
    check_data_matches({}, "mnist", None, "h")
    # A data set the registry does not know is compared by name and given shape.
    check_data_matches({"dataset": "svhn", "input_shape": [3, 32, 32]}, "svhn", (3, 32, 32), "h")
    with pytest.raises(ConfigError, match=r"\(3, 32, 32\).*\(3, 64, 64\)"):
        check_data_matches({"dataset": "svhn", "input_shape": [3, 32, 32]}, "svhn", (3, 64, 64), "h")


def test_sidecar_defaults():
    trained = {
        "dataset": "fashion-mnist",
        "training": {"config": {"eps": 0.1, "norm": "l2"}},
        "metrics": {"eval_eps": 0.3, "eval_norm": "linf"},
    }
    assert sidecar_defaults(trained) == {"dataset": "fashion-mnist", "input_shape": (1, 28, 28),
                                         "norm": "l2", "eps": 0.1}
    measured_only = {"input_shape": [1, 8, 8], "metrics": {"eval_eps": 0.3, "eval_norm": "linf"},
                     "training": {"config": {"eps": None}}}
    assert sidecar_defaults(measured_only) == {"dataset": None, "input_shape": (1, 8, 8), "norm": "linf", "eps": 0.3}
    assert sidecar_defaults({}) == {"dataset": None, "input_shape": None, "norm": None, "eps": None}
    assert sidecar_defaults(META)["eps"] == 0.031 and sidecar_defaults(META)["input_shape"] == (3, 32, 32)
