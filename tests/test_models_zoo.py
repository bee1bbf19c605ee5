"""RobustBench entries against RobustBench's own code (robustbench==1.1.1, its files loaded by path).

For every entry in adasmooth's table: the peer's model from RobustBench's own ``cifar10.py`` /
``cifar100.py`` has exactly our state-dict keys and shapes at full size (built on the meta device,
so WRN-70-16 costs nothing); and at reduced depth/width (the 266M-parameter entries cannot run in
CI), random weights saved in RobustBench's file layouts load through ``robustbench:`` specs and
give the peer's logits within 1e-5.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from adasmooth.models import create_model, load_model
from adasmooth.models import robustbench as rb
from adasmooth.models.checkpoint import load_state_checked, sidecar_defaults

from robustbench_peer import peer_modules

TOL = 1e-5


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Within TOL, absolute for logits up to 1 in size and relative to the largest logit beyond."""
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    assert diff <= TOL * scale, f"{what}: max |difference| {diff:.3g} for logits up to {scale:.3g}"


@pytest.fixture(scope="module")
def peer():
    with peer_modules() as modules:
        yield modules


def _layout(model: nn.Module, skip: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(skip)}


def _ours(entry: rb.ZooEntry) -> nn.Module:
    mean, std = entry.normalization or ((0.0,) * 3, (1.0,) * 3)
    return create_model(entry.architecture, entry.num_classes, mean=mean, std=std, **entry.kwargs)


def test_the_table_covers_at_least_twelve_linf_entries_of_each_cifar():
    assert len(rb.list_robustbench("cifar10", "Linf")) >= 12
    assert len(rb.list_robustbench("cifar100", "Linf")) >= 12
    for name in ("Wang2023Better_WRN-70-16", "Wang2023Better_WRN-28-10", "Rebuffi2021Fixing_70_16_cutmix_extra",
                 "Gowal2020Uncovering_70_16", "Gowal2021Improving_70_16_ddpm_100m", "Carmon2019Unlabeled"):
        assert f"cifar10/Linf/{name}" in rb.ZOO


def test_every_entry_has_the_peers_state_dict_layout_at_full_size(peer):
    for key, entry in rb.ZOO.items():
        assert entry.name in peer.zoo[entry.dataset], key
        with torch.device("meta"):
            theirs = peer.zoo[entry.dataset][entry.name]["model"]()
            ours = _ours(entry)
        # mu/sigma: the normalisation some entries keep in their own module; ours is in normalize.*
        assert _layout(ours, ("normalize.",)) == _layout(theirs, ("mu", "sigma")), key


# ---------------------------------------------------------------------------- logits at reduced size

SMALL_DEPTH, SMALL_WIDTH = 10, 2


def _shrinking(cls, depth_key: str, width_key: str):
    """``cls`` with its depth and width replaced, however the entry's code passes them."""
    signature = inspect.signature(cls)

    def build(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments.update({depth_key: SMALL_DEPTH, width_key: SMALL_WIDTH})
        return cls(*bound.args, **bound.kwargs)

    return build


def _small_peer(peer, entry: rb.ZooEntry, monkeypatch) -> nn.Module:
    factory = peer.zoo[entry.dataset][entry.name]["model"]
    module = peer.modules[entry.dataset]
    monkeypatch.setattr(module, "DMWideResNet",
                        _shrinking(peer.dm_wide_resnet.DMWideResNet, "depth", "width"))
    monkeypatch.setattr(module, "WideResNet", _shrinking(peer.wide_resnet.WideResNet, "depth", "widen_factor"))
    if isinstance(factory, type) and issubclass(factory, peer.wide_resnet.WideResNet):
        return factory(depth=SMALL_DEPTH, widen_factor=SMALL_WIDTH)  # entry classes such as Rice2020OverfittingNet
    return factory()


def _small_architecture(entry: rb.ZooEntry) -> str:
    for family in ("dm-wrn-", "rb-wrn-"):
        if entry.architecture.startswith(family):
            return f"{family}{SMALL_DEPTH}-{SMALL_WIDTH}"
    return entry.architecture  # the ResNet-18s run at full size


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics (fresh batch norm is the identity and would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # He scaling for convolutions; 1/fan_in for the classifier keeps logits near 1, so that
                # the absolute tolerance is a strict one.
                fan_in = m.weight[0].numel()
                scale = (2.0 / fan_in) ** 0.5 if isinstance(m, nn.Conv2d) else 1.0 / fan_in
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * scale)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def save_robustbench_file(state: dict, model_dir, entry: rb.ZooEntry, style: int) -> None:
    """The file layouts RobustBench's loader accepts: plain, under "state_dict" with DataParallel's
    "module." or a wrapper's "model." prefix, and Andriushchenko 2020's {"last": ...}."""
    if entry.container:
        payload = {entry.container: dict(state)}
    elif style % 3 == 0:
        payload = dict(state)
    elif style % 3 == 1:
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": torch.tensor(3)}
    else:
        payload = {"state_dict": {f"model.{k}": v for k, v in state.items()}}
    path = model_dir / entry.dataset / entry.threat / f"{entry.name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def _one_per_architecture_variant(entries):
    """Entries that differ in architecture, kwargs, normalisation, data set or file container."""
    seen, chosen = set(), []
    for key, e in entries:
        variant = (e.architecture, tuple(sorted(e.kwargs.items())), e.normalization, e.dataset, e.container)
        # every small entry runs; of the ResNet-18 ones (11M parameters each) one per variant
        if "wrn" in e.architecture or variant not in seen:
            chosen.append(key)
        seen.add(variant)
    return chosen


@pytest.mark.parametrize("key", _one_per_architecture_variant(rb.ZOO.items()))
def test_entry_loads_through_its_spec_with_the_peers_logits(key, peer, tmp_path, monkeypatch):
    entry = rb.ZOO[key]
    theirs = randomize(_small_peer(peer, entry, monkeypatch), seed=len(key))
    monkeypatch.setitem(rb.ZOO, key, dataclasses.replace(entry, architecture=_small_architecture(entry)))
    # The file keeps no mu/sigma, as several of RobustBench's own files: our table's normalisation must be the peer's.
    state = {k: v for k, v in theirs.state_dict().items() if k not in ("mu", "sigma")}
    save_robustbench_file(state, tmp_path, entry, style=len(key))
    ours, info = load_model(f"robustbench:{key}", model_dir=tmp_path)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert expected.shape == (3, entry.num_classes)
    assert_close(got, expected, key)
    assert not ours.training
    assert info["dataset"] == entry.dataset and info["num_classes"] == entry.num_classes
    assert info["input_shape"] == [3, 32, 32]
    assert sidecar_defaults(info)["norm"] == "linf" and sidecar_defaults(info)["eps"] == pytest.approx(8 / 255)


def test_mu_and_sigma_in_the_file_win_over_the_table(peer, tmp_path, monkeypatch):
    key = "cifar10/Linf/Wong2020Fast"  # PreActResNet-18 with its normalisation as persistent buffers
    entry = rb.ZOO[key]
    theirs = randomize(peer.zoo["cifar10"]["Wong2020Fast"]["model"](), seed=1)
    theirs.mu.fill_(0.3)
    theirs.sigma.fill_(0.2)
    assert "mu" in theirs.state_dict()
    save_robustbench_file(theirs.state_dict(), tmp_path, entry, style=1)
    ours, info = load_model(f"robustbench:{key}", model_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), key)
    assert info["normalization"]["mean"] == pytest.approx([0.3] * 3)


# ---------------------------------------------------------------------------- architectures, any size


@pytest.mark.parametrize("activation", ["relu", "silu", "swish"])
def test_dm_wide_resnet_any_activation_and_size_matches_the_peer(peer, activation):
    act = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": peer.dm_wide_resnet.Swish}[activation]
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    theirs = randomize(peer.dm_wide_resnet.DMWideResNet(num_classes=7, depth=16, width=3, activation_fn=act,
                                                        mean=mean, std=std), seed=2)
    ours = create_model("dm-wrn-16-3", 7, mean=mean, std=std, activation=activation)
    load_state_checked(ours, {**theirs.state_dict(), **{k: v for k, v in ours.state_dict().items()
                                                          if k.startswith("normalize.")}}, "peer")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs(x), "peer")


@pytest.mark.parametrize("sub_block1,bias_last", [(False, False), (True, True)])
def test_robustbench_wide_resnet_any_size_matches_the_peer(peer, sub_block1, bias_last):
    theirs = randomize(peer.wide_resnet.WideResNet(depth=16, num_classes=5, widen_factor=3, sub_block1=sub_block1,
                                                   bias_last=bias_last), seed=3)
    ours = create_model("rb-wrn-16-3", 5, sub_block1=sub_block1, bias_last=bias_last)
    state = {**theirs.state_dict(), "normalize.mean": ours.normalize.mean, "normalize.std": ours.normalize.std}
    load_state_checked(ours, state, "peer")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs(x), "peer")


def test_swish_models_have_gradients_for_attacks():
    model = create_model("dm-wrn-10-1", 10, activation="swish").eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
