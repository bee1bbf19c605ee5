"""Typed configs (unknown keys, types, choices, YAML/JSON files merged under CLI values) and result files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch

from adasmooth.core.config import ConfigError, from_mapping, load_config_file, merge_cli
from adasmooth.core.io import format_table, to_jsonable, write_csv, write_result
from adasmooth.train.loop import TrainConfig


@dataclass
class Inner:
    width: int = 8


@dataclass
class Example:
    name: str = "x"
    steps: int = 10
    eps: float = 0.1
    flag: bool = False
    norm: Literal["linf", "l2"] = "linf"
    alphas: list[float] = field(default_factory=lambda: [0.5])
    extra: dict = field(default_factory=dict)
    limit: Optional[int] = None
    size: float | None = None
    out: Path = Path("out")
    inner: Inner = field(default_factory=Inner)

    def validate(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_values_are_typed():
    cfg = from_mapping(Example, {"steps": 3, "eps": 1, "alphas": [0, 0.25, 1], "limit": None, "size": 2,
                                 "out": "runs/a", "inner": {"width": 4}, "extra": {"k": 1}, "norm": "l2"})
    assert cfg.steps == 3 and cfg.norm == "l2" and cfg.extra == {"k": 1}
    assert isinstance(cfg.eps, float) and cfg.eps == 1.0  # an integer is a valid float
    assert cfg.alphas == [0.0, 0.25, 1.0] and all(isinstance(a, float) for a in cfg.alphas)
    assert cfg.size == 2.0 and cfg.limit is None
    assert cfg.out == Path("runs/a") and cfg.inner == Inner(4)
    assert from_mapping(Example, {}) == Example()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="stpes"):
        from_mapping(Example, {"stpes": 3})
    with pytest.raises(ConfigError, match="depth"):
        from_mapping(Example, {"inner": {"depth": 3}})


@pytest.mark.parametrize("key,value", [
    ("steps", "3"), ("steps", 2.5), ("steps", True),
    ("eps", "0.1"), ("eps", False),
    ("flag", 1), ("flag", "yes"),
    ("name", 3),
    ("alphas", "0.5,1"), ("alphas", [0.5, "x"]),
    ("extra", [1, 2]),
    ("limit", "ten"), ("limit", 1.5),
    ("norm", "l1"), ("norm", "LINF"),
    ("inner", 3),
])
def test_wrong_types_and_choices(key, value):
    with pytest.raises(ConfigError) as err:
        from_mapping(Example, {key: value})
    assert key in str(err.value)


def test_validate_runs_and_reports_as_config_error():
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        from_mapping(Example, {"steps": 0})


def test_yaml_file_merged_under_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\neps: 0.3\nnorm: l2\nalphas: [0.1, 0.9]\n")
    cfg = merge_cli(Example, path, {"eps": 0.05, "steps": None, "name": "cli"})
    assert cfg.steps == 5  # from the file (the CLI left it unset)
    assert cfg.eps == 0.05 and cfg.name == "cli"  # the CLI wins
    assert cfg.norm == "l2" and cfg.alphas == [0.1, 0.9]
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"steps": 7, "flag": True}))
    assert merge_cli(Example, json_path, {}).steps == 7
    assert merge_cli(Example, None, {"steps": 2}).steps == 2
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="unknown"):
        path.write_text("steps: 5\nbogus: 1\n")
        merge_cli(Example, path, {})


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config_file(tmp_path / "broken.yaml")
    (tmp_path / "broken.json").write_text("{steps: 1}")
    with pytest.raises(ConfigError, match="broken.json"):
        load_config_file(tmp_path / "broken.json")
    marker = tmp_path / "pwned"
    (tmp_path / "code.yaml").write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config_file(tmp_path / "code.yaml")
    assert not marker.exists()


def test_train_config_validation():
    cfg = from_mapping(TrainConfig, {"method": "pgd", "eps": 0.2, "model_kwargs": {"width": 16}, "n_train": 100})
    assert cfg.method == "pgd" and cfg.model_kwargs == {"width": 16}
    for bad, match in [({"method": "no-such-method-xyz"}, "no-such-method-xyz"), ({"eps": -0.1}, "eps"), ({"sigma": 0.0}, "sigma"),
                       ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"trades_beta": -1.0}, "trades_beta"),
                       ({"optimizer": "rmsprop"}, "optimizer"), ({"schedule": "linear"}, "schedule"),
                       ({"norm": "l1"}, "norm"), ({"epoch": 3}, "epoch")]:
        with pytest.raises(ConfigError, match=match):
            from_mapping(TrainConfig, bad)


# ------------------------------------------------------------------ result files (adasmooth.core.io)


def test_write_result_is_strict_json_with_provenance(tmp_path):
    results = {"acc": np.float32(0.5), "curve": np.array([1.0, np.nan]), "t": torch.tensor([2.0, 3.0]),
               "gap": float("nan"), "logit": math.inf, "neg": np.float64(-np.inf), "path": Path("a/b")}
    path = write_result(tmp_path / "r" / "res.json", results, config=Example(), seed=3)
    payload = json.loads(path.read_text())  # strict JSON: would fail on NaN/Infinity tokens
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert payload["results"] == {"acc": 0.5, "curve": [1.0, None], "t": [2.0, 3.0], "gap": None,
                                  "logit": "inf", "neg": "-inf", "path": "a/b"}
    assert payload["seed"] == 3 and payload["config"]["inner"] == {"width": 8}
    assert payload["provenance"]["versions"]["torch"] is not None
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_csv_and_table(tmp_path):
    rows = [{"alpha": 0.5, "clean": 91.234, "name": "mix"}, {"alpha": 1.0, "clean": 80.0, "name": None}]
    path = write_csv(tmp_path / "t.csv", rows)
    assert path.read_text().splitlines() == ["alpha,clean,name", "0.5,91.234,mix", "1.0,80.0,"]
    table = format_table(rows, precision=1).splitlines()
    assert table[0].split() == ["alpha", "clean", "name"]
    assert table[2].split() == ["0.5", "91.2", "mix"] and table[3].split() == ["1.0", "80.0"]
    assert len({len(line) for line in table}) == 1  # fixed width
    with pytest.raises(ValueError):
        write_csv(tmp_path / "e.csv", [])
    assert to_jsonable((1, 2)) == [1, 2]
