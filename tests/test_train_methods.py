"""The training-method registry, the configs of the training commands, and the package's import layering."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adasmooth.train as train_pkg
from adasmooth.attacks.adaptive import AdaptiveAlphaLoss
from adasmooth.core.config import ConfigError, from_mapping, merge_cli
from adasmooth.evaluate.calibrate import CalibrateConfig
from adasmooth.mixing import MixOutput
from adasmooth.train.catrs_targets import CatrsTargetsConfig
from adasmooth.train.loop import TrainConfig, train_base
from adasmooth.train.methods import TRAINING_METHODS, CatrsOptions, catrs, gaussian, pgd, standard, trades
from adasmooth.train.mixnet import MixnetTrainConfig, attack_loss

# ------------------------------------------------------------------ the registry


@pytest.mark.parametrize("name,module,fn", [
    ("standard", standard, "standard_loss"),
    ("pgd", pgd, "pgd_loss"),
    ("trades", trades, "trades_loss"),
    ("gaussian", gaussian, "gaussian_loss"),
    ("cat-rs", catrs, "catrs_method"),
])
def test_each_method_module_registers_itself(name, module, fn):
    assert TRAINING_METHODS.get(name) is getattr(module, fn)
    assert TRAINING_METHODS.info(name)["description"]


def test_only_the_smoothing_methods_record_sigma():
    smoothing = {n for n in TRAINING_METHODS.names() if TRAINING_METHODS.info(n).get("smoothing")}
    assert {"gaussian", "cat-rs"} <= smoothing and not smoothing & {"standard", "pgd", "trades"}


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown training method 'no-such-method-xyz'; known: ") as err:
        from_mapping(TrainConfig, {"method": "no-such-method-xyz"})
    # the registration order depends on which test imported which method module first
    listed = str(err.value).split("known: ")[1].split(", ")
    assert set(listed) >= {"standard", "pgd", "trades", "gaussian", "cat-rs"}  # the built-ins; others may join


@pytest.fixture
def toy_method():
    calls = []

    @TRAINING_METHODS.register("toy-l2", description="cross-entropy plus a test-only weight penalty")
    def toy(model, batch, cfg, ctx):
        calls.append(ctx.epoch)
        x, y, _ = batch
        return F.cross_entropy(model(x), y) + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())

    yield calls
    TRAINING_METHODS.remove("toy-l2")


def test_a_registered_method_trains_without_touching_the_loop(toy_method, tmp_path, digits_train):
    cfg = TrainConfig(method="toy-l2", epochs=2, batch_size=32, n_train=64, eval_examples=8, eval_pgd_steps=1,
                      model_kwargs={"width": 4, "hidden": 8}, output=str(tmp_path / "toy"), progress=False)
    meta = train_base(cfg, train_data=digits_train)
    assert meta["training"]["method"] == "toy-l2" and toy_method == [0, 0, 1, 1]
    assert "sigma" not in meta  # not a smoothing method


# ------------------------------------------------------------------ configs


def test_yaml_catrs_block_builds_catrs_options(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("method: cat-rs\nsigma: 0.5\ncatrs: {m: 2, lambda_: 0.75, warmup_epochs: 3}\n")
    cfg = merge_cli(TrainConfig, path, {"epochs": 2})
    assert isinstance(cfg.catrs, CatrsOptions)
    assert cfg.catrs == CatrsOptions(m=2, lambda_=0.75, warmup_epochs=3) and cfg.epochs == 2
    assert TrainConfig().catrs == CatrsOptions()  # defaults when the block is absent
    with pytest.raises(ConfigError, match=r"catrs.*unknown key.*'k'"):
        from_mapping(TrainConfig, {"catrs": {"k": 2}})
    with pytest.raises(ConfigError, match=r"catrs\.m"):
        from_mapping(TrainConfig, {"catrs": {"m": 0}})


@pytest.mark.parametrize("cls,base,field,value", [
    (TrainConfig, {}, "lr", math.nan),
    (TrainConfig, {}, "eps", math.nan),
    (TrainConfig, {}, "sigma", math.inf),
    (TrainConfig, {}, "momentum", math.nan),
    (TrainConfig, {}, "val_fraction", math.nan),
    (MixnetTrainConfig, {"std": "g", "rob": "h"}, "lr", math.nan),
    (MixnetTrainConfig, {"std": "g", "rob": "h"}, "eps", math.inf),
    (MixnetTrainConfig, {"std": "g", "rob": "h"}, "eps_high", math.nan),
    (MixnetTrainConfig, {"std": "g", "rob": "h"}, "adaptive_weight_max", math.nan),
    (MixnetTrainConfig, {"std": "g", "rob": "h"}, "c_bce", math.nan),
    (MixnetTrainConfig, {"std": "g", "rob": "h"}, "grad_clip", math.nan),
    (CalibrateConfig, {"mixnet": ["m"], "target_acc": 80.0}, "target_acc", math.nan),
    (CalibrateConfig, {"mixnet": ["m"], "target_acc": 80.0}, "scale", math.nan),
    (CalibrateConfig, {"mixnet": ["m"], "target_acc": 80.0}, "eps", math.inf),
    (CatrsTargetsConfig, {"model": "c", "output": "o"}, "sigma", math.nan),
])
def test_numeric_options_reject_nan_and_inf(cls, base, field, value):
    from_mapping(cls, dict(base))  # the base mapping itself is valid
    with pytest.raises(ConfigError, match=field):
        from_mapping(cls, {**base, field: value})


def test_shared_option_names_and_required_inputs():
    mixnet = {f.name for f in dataclasses.fields(MixnetTrainConfig)}
    assert {"std", "rob"} <= mixnet and not {"std_checkpoint", "rob_checkpoint"} & mixnet
    assert "mixnet" in {f.name for f in dataclasses.fields(CalibrateConfig)}
    with pytest.raises(ConfigError, match="std and rob"):
        from_mapping(MixnetTrainConfig, {"std": "g"})
    with pytest.raises(ConfigError, match="mixnet"):
        from_mapping(CalibrateConfig, {"target_acc": 80.0})
    with pytest.raises(ConfigError, match="model is required"):
        from_mapping(CatrsTargetsConfig, {"output": "o"})
    for cls in (TrainConfig, MixnetTrainConfig, CalibrateConfig, CatrsTargetsConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert {"seed", "device", "progress", "output"} <= names, cls.__name__


@pytest.mark.parametrize("cls", [TrainConfig, CatrsOptions, MixnetTrainConfig, CalibrateConfig, CatrsTargetsConfig])
def test_every_config_field_has_help_text(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text"
    if cls is TrainConfig:
        assert {f.name: f.metadata["cli"] for f in dataclasses.fields(cls)}["model_kwargs"] is False


# ------------------------------------------------------------------ the mixing-network attacker's loss


class _Carrier(nn.Module):
    """A mixed model whose logits are x[:, :3] and alpha_logit x[:, 3]: losses can be worked out by hand."""

    def __init__(self):
        super().__init__()
        self.detach_flags = []

    def mix(self, x, detach_alpha=False):
        self.detach_flags.append(detach_alpha)
        alpha_logit = x[:, 3].detach() if detach_alpha else x[:, 3]
        return MixOutput(logits=x[:, :3], alpha=torch.sigmoid(alpha_logit), alpha_logit=alpha_logit)

    def forward(self, x):
        return self.mix(x).logits


def _ce(z, y):
    return math.log(sum(math.exp(v) for v in z)) - z[y]


def test_mixnet_attack_loss_is_the_weighted_ce_and_alpha_term():
    rows = [[2.0, -1.0, 0.5, 0.3], [0.0, 1.5, -0.5, -2.0]]
    x, y = torch.tensor(rows, dtype=torch.float64), torch.tensor([1, 0])
    w = torch.tensor([0.25, 0.6], dtype=torch.float64)
    expected = [(1 - wi) * _ce(r[:3], yi) + wi * math.log1p(math.exp(-r[3]))  # softplus(-alpha_logit)
                for r, yi, wi in zip(rows, y.tolist(), w.tolist())]
    for setting in ("B", "C"):
        loss_fn = attack_loss(setting, w)
        assert isinstance(loss_fn, AdaptiveAlphaLoss)  # the one implementation, in attacks/adaptive.py
        assert loss_fn(_Carrier(), x, y).tolist() == pytest.approx(expected, rel=1e-12)
    # setting A: the plain base loss, through mix(x, detach_alpha=True)
    model = _Carrier()
    xr = x.clone().requires_grad_(True)
    gray = attack_loss("A", w)(model, xr, y)
    assert gray.tolist() == pytest.approx([_ce(r[:3], yi) for r, yi in zip(rows, y.tolist())], rel=1e-12)
    assert model.detach_flags == [True]
    (grad,) = torch.autograd.grad(gray.sum(), xr)
    assert (grad[:, 3] == 0).all()  # no gradient reaches the input through alpha
    margin = attack_loss("A", base="margin")(_Carrier(), x, y)
    assert margin.tolist() == pytest.approx([2.0 - (-1.0), 1.5 - 0.0])
    with pytest.raises(ValueError, match="setting"):
        attack_loss("E")


# ------------------------------------------------------------------ import layering


def _train_imports() -> dict[str, set[str]]:
    """Intra-adasmooth imports of each module of adasmooth.train, as dotted module names."""
    root = Path(train_pkg.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = parts if rel.name == "__init__" else parts[:-1]
        name = ".".join(["adasmooth", *parts])
        deps = set()
        tree = ast.parse(path.read_text())
        # imports for type annotations only never run, so they cannot form a cycle
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ["adasmooth", *package[: len(package) - node.level + 1]]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adasmooth"):
                deps.add(node.module)
        graph[name] = deps
    return graph


def test_train_never_imports_evaluate_or_cli_and_has_no_cycles():
    graph = _train_imports()
    assert "adasmooth.train.loop" in graph and "adasmooth.train.methods.catrs" in graph
    for module, deps in graph.items():
        bad = [d for d in deps if d.startswith(("adasmooth.evaluate", "adasmooth.cli"))]
        assert not bad, f"{module} imports {bad}"
    # no method module imports the loop (the old catrs <-> training cycle)
    for module, deps in graph.items():
        if module.startswith("adasmooth.train.methods"):
            assert "adasmooth.train.loop" not in deps, module
    # and no cycle among the package's modules
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in edges[m]:
            visit(d, path + [m])
        state[m] = 2

    for m in edges:
        visit(m, [])
