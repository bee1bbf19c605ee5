"""RobustBench entries against RobustBench's own code (robustbench==1.1.1, its files loaded by path).

For every entry in adasmooth's table (CIFAR-10 Linf/L2/corruptions, CIFAR-100 Linf/corruptions,
ImageNet Linf/corruptions): the peer's model from RobustBench's own ``cifar10.py`` / ``cifar100.py``
/ ``imagenet.py`` has exactly our state-dict keys and shapes at full size (built on the meta device,
so WRN-70-16 costs nothing); and at reduced depth/width (the 266M-parameter entries cannot run in
CI), random weights saved in RobustBench's file layouts load through ``robustbench:`` specs and
give the peer's logits within 1e-5. ImageNet's timm/torchvision networks are the real libraries
where they import, else the stand-ins of ``robustbench_peer`` (then the check covers the names,
options, ConvStems, normalisation and file layout, not the libraries' own layers).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

import pytest
import torch
from torch import nn

from adasmooth.core.errors import CheckpointError, ConfigError, MissingDependencyError
from adasmooth.models import create_model, load_model, model_info
from adasmooth.models import robustbench as rb
from adasmooth.models.checkpoint import load_state_checked, recorded_threat, sidecar_defaults

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


def _peer_factory(peer, entry: rb.ZooEntry):
    return peer.tables[(entry.dataset, entry.threat)][entry.name]["model"]


def _unwrapped(layout: dict) -> dict:
    """Keys without the ``model.`` of a normalisation wrapper (RobustBench's normalize_model, our VisionModel)."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in layout.items()}


def test_every_entry_has_the_peers_state_dict_layout_at_full_size(peer):
    for key, entry in rb.ZOO.items():
        assert entry.name in peer.tables[(entry.dataset, entry.threat)], key
        with torch.device("meta"):
            theirs = _peer_factory(peer, entry)()
            ours = _ours(entry)
        # mu/sigma: the normalisation some entries keep in their own module; ours is in normalize.*
        assert _unwrapped(_layout(ours, ("normalize.",))) == _unwrapped(_layout(theirs, ("mu", "sigma", "normalize."))), key


def test_every_robustbench_entry_loads_or_is_refused_with_a_reason(peer):
    theirs = {f"{ds}/{threat}/{name}" for (ds, threat), table in peer.tables.items() for name in table}
    assert set(rb.ZOO) | set(rb.REFUSED) == theirs
    assert not set(rb.ZOO) & set(rb.REFUSED)
    assert len(rb.list_robustbench("cifar10", "L2")) >= 15 and len(rb.list_robustbench("imagenet", "Linf")) >= 15


@pytest.mark.parametrize("key", ["cifar10/L2/Ding2020MMA", "imagenet/Linf/Xu2024MIMIR_Swin-L",
                                 "cifar10/corruptions/Diffenderfer2021Winning_LRR"])
def test_a_refused_entry_says_why_in_one_line_without_listing_others(key):
    with pytest.raises(ConfigError) as err:
        load_model(f"robustbench:{key}")
    text = str(err.value)
    assert "\n" not in text and key in text and rb.REFUSED[key] in text
    assert "Carmon2019Unlabeled" not in text and "supported for" not in text


def test_unknown_names_threats_and_data_sets_are_one_line_errors():
    for spec, expected in (("robustbench:cifar10/L2/Carmon2019Unlabeled", "not in RobustBench 1.1.1's cifar10/L2"),
                           ("robustbench:cifar100/L2/Standard", "no 'L2' entries for cifar100"),
                           ("robustbench:svhn/Linf/Standard", "no data set 'svhn'")):
        with pytest.raises(ConfigError, match=expected) as err:
            load_model(spec)
        assert "\n" not in str(err.value) and "Gowal" not in str(err.value)


@pytest.mark.parametrize("key,norm,eps", [("cifar10/Linf/Standard", "linf", 8 / 255),
                                          ("cifar10/L2/Standard", "l2", 0.5),
                                          ("imagenet/Linf/Salman2020Do_R18", "linf", 4 / 255),
                                          ("cifar10/corruptions/Standard", None, None)])
def test_threat_models_are_recorded_as_robustbench_evaluates_them(key, norm, eps):
    info = model_info(f"robustbench:{key}")
    defaults = sidecar_defaults(info)
    assert info["threat"]["model"] == key.split("/")[1]
    assert defaults["norm"] == norm and defaults["eps"] == (pytest.approx(eps) if eps else None)
    if eps is None:
        with pytest.raises(ConfigError, match="records no eps"):
            recorded_threat(None, None, info, key)


def test_imagenet_entries_record_robustbench_preprocessing():
    salman = model_info("robustbench:imagenet/Linf/Salman2020Do_R50")
    assert salman["preprocessing"] == {"name": "Res256Crop224", "resize": 256, "crop": 224, "interpolation": "bilinear"}
    assert salman["input_shape"] == [3, 224, 224] and salman["requires"] == "torchvision"
    assert salman["normalization"]["mean"] == [0.485, 0.456, 0.406]
    wong = model_info("robustbench:imagenet/Linf/Wong2020Fast")
    assert wong["preprocessing"]["crop"] == 288 and wong["input_shape"] == [3, 288, 288]
    liu = model_info("robustbench:imagenet/Linf/Liu2023Comprehensive_Swin-L")
    assert liu["preprocessing"]["interpolation"] == "bicubic" and liu["requires"] == "timm"
    # ConvStem ConvNeXts are loaded by RobustBench without a normalisation wrapper: they see raw pixels
    convstem = model_info("robustbench:imagenet/Linf/Singh2023Revisiting_ConvNeXt-T-ConvStem")
    assert convstem["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}


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


_SMALL_RA = {"stem_width": 16, "depths": (2, 1, 1), "stage_widths": (24, 32, 48), "se_ratio": 0.25}


def _small_peer(peer, entry: rb.ZooEntry, monkeypatch) -> nn.Module:
    factory = _peer_factory(peer, entry)
    module = peer.modules[entry.dataset]
    if entry.dataset == "imagenet":
        return factory()
    ra = peer.robustarch_wide_resnet
    if entry.architecture == "ra-wrn-70-16":
        monkeypatch.setattr(module, "get_robustarch_model", lambda name: ra.NormalizedWideResNet(
            ra.CIFAR10_MEAN, ra.CIFAR10_STD, stem_width=16, depth=[2, 1, 1], stage_width=[24, 32, 48], groups=[1, 1, 1],
            activation_fn=nn.SiLU, se_ratio=0.25, se_activation=nn.ReLU, se_order=2, num_classes=10))
    monkeypatch.setattr(module, "DMWideResNet",
                        _shrinking(peer.dm_wide_resnet.DMWideResNet, "depth", "width"))
    monkeypatch.setattr(module, "WideResNet", _shrinking(peer.wide_resnet.WideResNet, "depth", "widen_factor"))
    if isinstance(factory, type) and issubclass(factory, peer.wide_resnet.WideResNet):
        return factory(depth=SMALL_DEPTH, widen_factor=SMALL_WIDTH)  # entry classes such as Rice2020OverfittingNet
    return factory()


def _small(entry: rb.ZooEntry) -> rb.ZooEntry:
    for family in ("dm-wrn-", "rb-wrn-"):
        if entry.architecture.startswith(family):
            return dataclasses.replace(entry, architecture=f"{family}{SMALL_DEPTH}-{SMALL_WIDTH}")
    if entry.architecture == "ra-wrn-70-16":
        return dataclasses.replace(entry, kwargs={**entry.kwargs, **_SMALL_RA})
    return entry  # the ResNets and the library networks run at full size


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
            elif isinstance(m, nn.BatchNorm2d) or (type(m).__name__.endswith("LayerNorm") and m.weight is not None
                                                   and m.weight.dim() == 1 and not isinstance(m, nn.BatchNorm2d)):
                if not isinstance(m, nn.BatchNorm2d):  # the ConvStems' layer norms
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                    continue
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def save_robustbench_file(state: dict, model_dir, entry: rb.ZooEntry, style: int) -> None:
    """The file layouts RobustBench's loader accepts: plain, under "state_dict" with DataParallel's
    "module." or a wrapper's "model." prefix, and Andriushchenko 2020's {"last": ...}."""
    if entry.library is not None:  # RobustBench's ImageNet files hold the network's own keys, no wrapper
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()
                 if not k.startswith("normalize.")}
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
        variant = (e.architecture, repr(sorted(e.kwargs.items())), e.normalization, e.dataset, e.container,
                   e.preprocessing)
        # every small entry runs; of the ResNet ones (11M-23M parameters each) and ImageNet's one per variant
        if ("wrn" in e.architecture and e.dataset != "imagenet") or variant not in seen:
            chosen.append(key)
        seen.add(variant)
    return chosen


@pytest.mark.parametrize("key", _one_per_architecture_variant(rb.ZOO.items()))
def test_entry_loads_through_its_spec_with_the_peers_logits(key, peer, tmp_path, monkeypatch):
    entry = rb.ZOO[key]
    theirs = randomize(_small_peer(peer, entry, monkeypatch), seed=len(key))
    monkeypatch.setitem(rb.ZOO, key, _small(entry))
    # The file keeps no mu/sigma, as several of RobustBench's own files: our table's normalisation must be the peer's.
    state = {k: v for k, v in theirs.state_dict().items() if k not in ("mu", "sigma")}
    save_robustbench_file(state, tmp_path, entry, style=len(key))
    ours, info = load_model(f"robustbench:{key}", model_dir=tmp_path)
    x = torch.rand(2, *entry.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert expected.shape == (2, entry.num_classes)
    assert_close(got, expected, key)
    assert not ours.training
    assert info["dataset"] == entry.dataset and info["num_classes"] == entry.num_classes
    assert info["input_shape"] == list(entry.input_shape)
    assert info["threat"]["model"] == entry.threat


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


# ---------------------------------------------------------------------------- ConvStem, [vision], wrong files


@pytest.mark.parametrize("stem,theirs", [("convnext-t/s", ("ConvBlock1", (48,), {})),
                                         ("convnext-b", ("ConvBlock3", (64,), {})),
                                         ("convnext-l", ("ConvBlock3", (96,), {})),
                                         ("vit-s", ("ConvBlock", (48,), {"end_siz": 8})),
                                         ("vit-b", ("ConvBlock", (48,), {"end_siz": 16, "fin_dim": None}))])
def test_convstems_match_robustbench_key_for_key(peer, stem, theirs):
    from adasmooth.models.convstem import CONVSTEMS, ConvStem

    cls, args, kwargs = theirs
    peer_stem = randomize(getattr(peer.convstem_models, cls)(*args, **kwargs), seed=5)
    ours = ConvStem(**{k: v for k, v in CONVSTEMS[stem].items() if k != "slot"})
    assert _layout(ours, ()) == _layout(peer_stem, ())
    load_state_checked(ours, peer_stem.state_dict(), "peer")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours.eval()(x), peer_stem(x), stem)


def test_imagenet_entries_without_their_library_are_one_line_errors(tmp_path, monkeypatch):
    for package in ("timm", "torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, package, None)  # import fails as for a missing package
    (tmp_path / "imagenet" / "Linf").mkdir(parents=True)
    for name in ("Liu2023Comprehensive_ConvNeXt-B", "Salman2020Do_R18"):
        torch.save({"stem.0.weight": torch.zeros(1)}, tmp_path / "imagenet" / "Linf" / f"{name}.pt")
    for spec in ("robustbench:imagenet/Linf/Liu2023Comprehensive_ConvNeXt-B", "robustbench:imagenet/Linf/Salman2020Do_R18"):
        with pytest.raises(MissingDependencyError, match=r"adasmooth\[vision\]") as err:
            load_model(spec, model_dir=tmp_path)
        assert "\n" not in str(err.value)
    # what the entry is stays readable without the library
    assert model_info("robustbench:imagenet/Linf/Salman2020Do_R18", model_dir=tmp_path)["requires"] == "torchvision"


def test_a_file_of_another_architecture_says_which_entries_it_fits(tmp_path):
    # a ResNet-18 (Sehwag2021Proxy_R18's architecture) saved where the pre-activation ResNet-18 of Wong2020Fast belongs
    entry = rb.ZOO["cifar10/Linf/Wong2020Fast"]
    resnet18 = create_model("rb-resnet18", 10)
    save_robustbench_file({k: v for k, v in resnet18.state_dict().items() if not k.startswith("normalize.")},
                          tmp_path, entry, style=0)
    with pytest.raises(CheckpointError) as err:
        load_model("robustbench:cifar10/Linf/Wong2020Fast", model_dir=tmp_path)
    text = str(err.value)
    assert "\n" not in text and "do not fit" in text
    assert "cifar10/Linf/Sehwag2021Proxy_R18" in text and "Wong2020Fast.pt" in text


def test_the_readme_zoo_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = readme.index(rb.README_BEGIN), readme.index(rb.README_END) + len(rb.README_END)
    assert readme[start:end] == rb.zoo_markdown(), "regenerate it with adasmooth.models.robustbench.zoo_markdown()"
