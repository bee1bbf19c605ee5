"""``adasmooth export``: a mixed model as one file that plain PyTorch loads, adasmooth not importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from adasmooth.cli import main
from adasmooth.core.errors import ConfigError, InputError
from adasmooth.mixing import MixedClassifier
from adasmooth.mixing.adaptive import build_adaptive_classifier, save_adaptive_classifier
from adasmooth.mixing.export import export_mixture, mixture_input_shape
from adasmooth.mixing.fixed import save_fixed_mixture
from adasmooth.models import create_model
from adasmooth.models.checkpoint import save_checkpoint

SHAPE = (1, 8, 8)

# Runs in a fresh interpreter: -I (no PYTHONPATH, no user site), cwd outside the repository, and a
# meta-path finder in front that refuses adasmooth, since an editable install would otherwise be found.
LOADER = textwrap.dedent("""
    import importlib.abc, sys, warnings
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "adasmooth":
                raise ImportError("adasmooth is not importable here")
    sys.meta_path.insert(0, Refuse())
    import torch
    x = torch.load(sys.argv[1], weights_only=True)
    for exported, out in zip(sys.argv[2::2], sys.argv[3::2]):
        # the default format: a torch.export program (-W error: no deprecation warning); TorchScript where asked for
        if exported.endswith(".pt"):
            with warnings.catch_warnings():  # a DeprecationWarning in torch 2.13, a FutureWarning in 2.14
                warnings.filterwarnings("ignore", message=r".*torch\\.jit.*deprecated")
                model = torch.jit.load(exported)
        else:
            model = torch.export.load(exported).module()
        with torch.no_grad():
            torch.save(model(x), out)
    assert not [m for m in sys.modules if m.split(".")[0] == "adasmooth"]
    try:
        import adasmooth
    except ImportError:
        print("adasmooth refused")
""")


def _bases(root):
    torch.manual_seed(0)
    g = create_model("small-cnn", 10, in_channels=1, width=8, hidden=32, input_shape=SHAPE, dataset="digits").eval()
    h = create_model("small-cnn", 10, in_channels=1, width=8, hidden=32, input_shape=SHAPE, dataset="digits").eval()
    save_checkpoint(g, root / "models" / "g")
    save_checkpoint(h, root / "models" / "h")
    return g, h


def _adaptive(g, h, root):
    model = build_adaptive_classifier(g, h, SHAPE, widths=(8, 16, 32)).eval()
    for m in model.mixing_net.modules():  # non-trivial BN statistics, so alpha varies across inputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.mixing_net.set_eval_head(scale=3.0, shift=0.2, alpha_range=(0.1, 0.9))
    with torch.no_grad():  # gamma's BatchNorm where gamma is, so alpha spreads over the range
        _, _, first, second = model.base_outputs(torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(5)))
        gamma = model.mixing_net.gamma(first, second)
        model.mixing_net.alpha_bn.running_mean.fill_(float(gamma.mean()))
        model.mixing_net.alpha_bn.running_var.fill_(float(gamma.var()))
    model.std_checkpoint, model.rob_checkpoint = str(root / "models" / "g"), str(root / "models" / "h")
    save_adaptive_classifier(model, root / "mixnets" / "mix")
    return model.eval()


def test_exported_mixtures_load_without_adasmooth_and_match(tmp_path):
    g, h = _bases(tmp_path)
    adaptive = _adaptive(g, h, tmp_path)
    fixed = MixedClassifier(g, h, 0.7, std_scale=2.0, rob_scale=0.5).eval()
    fixed.std_checkpoint, fixed.rob_checkpoint = str(tmp_path / "models" / "g"), str(tmp_path / "models" / "h")
    save_fixed_mixture(fixed, tmp_path / "mixnets" / "fixed")
    out = tmp_path / "deploy"
    runs = {
        "adaptive": ["--mixnet", str(tmp_path / "mixnets" / "mix")],
        "fixed-saved": ["--mixnet", str(tmp_path / "mixnets" / "fixed.json")],
        "fixed-args": ["--std", str(tmp_path / "models" / "g"), "--rob", str(tmp_path / "models" / "h"),
                       "--alpha", "0.7", "--std-scale", "2", "--rob-scale", "0.5"],
        "adaptive-ts": ["--mixnet", str(tmp_path / "mixnets" / "mix"), "--format", "torchscript"],
    }
    files = {name: out / (f"{name}.pt" if name.endswith("-ts") else f"{name}.pt2") for name in runs}
    for name, args in runs.items():
        assert main(["export", *args, "--device", "cpu", "--output", str(files[name])]) == 0

    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(7))  # another batch size than traced
    torch.save(x, tmp_path / "x.pt")
    argv = [str(tmp_path / "x.pt")]
    for name in runs:
        argv += [str(files[name]), str(tmp_path / f"{name}-logits.pt")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", LOADER, *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adasmooth refused" in proc.stdout

    with torch.no_grad():
        expected = {"adaptive": adaptive(x), "fixed-saved": fixed(x), "fixed-args": fixed(x), "adaptive-ts": adaptive(x)}
        alpha = adaptive.mix(x).alpha
    assert float(alpha.std()) > 0.02  # the adaptive mixture really is input-dependent
    for name, ref in expected.items():
        got = torch.load(tmp_path / f"{name}-logits.pt", weights_only=True)
        assert got.shape == ref.shape == (5, 10)
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (name, (got - ref).abs().max())

    extra = {"adasmooth.json": ""}
    torch.export.load(str(files["adaptive"]), extra_files=extra)
    meta = json.loads(extra["adasmooth.json"])
    assert meta["kind"] == "adaptive-mixed-classifier" and meta["input_shape"] == list(SHAPE)
    assert meta["format"] == "export" and "fallback" not in meta
    assert meta["eval_head"]["alpha_min"] == pytest.approx(0.1) and meta["max_abs_diff"] <= 1e-5
    extra = {"adasmooth.json": ""}
    with warnings.catch_warnings():  # newer torch notes TorchScript's deprecation; the file loads all the same
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        torch.jit.load(str(files["adaptive-ts"]), _extra_files=extra)
    assert json.loads(extra["adasmooth.json"])["format"] == "torchscript"


def test_gradient_rules_are_refused_and_bad_options_exit_2(tmp_path, capsys):
    g, h = _bases(tmp_path)
    with pytest.raises(ConfigError, match="grad_g.*cannot be exported"):
        export_mixture(MixedClassifier(g, h, 0.5, rule="grad_g"), tmp_path / "m.pt", SHAPE)
    assert not (tmp_path / "m.pt").exists()
    assert main(["export", "--std", str(tmp_path / "models" / "g"), "--output", str(tmp_path / "m.pt")]) == 2
    assert "--alpha" in capsys.readouterr().err
    assert main(["export", "--mixnet", str(tmp_path / "models" / "g"), "--alpha", "0.5",
                 "--output", str(tmp_path / "m.pt")]) == 2
    assert main(["export", "--mixnet", str(tmp_path / "models" / "g"), "--output", str(tmp_path / "m.pt")]) == 2
    assert "is not a saved mixture" in capsys.readouterr().err
    # base models that record no input shape: the command needs --input-shape, the library a (C, H, W)
    bare = create_model("small-cnn", 10, in_channels=1, width=8, hidden=32)
    assert mixture_input_shape(MixedClassifier(bare, bare, 0.5)) is None
    assert mixture_input_shape(MixedClassifier(g, h, 0.5)) == SHAPE
    with pytest.raises(InputError, match=r"input_shape must be \(C, H, W\), got \(8, 8\)"):
        export_mixture(MixedClassifier(bare, bare, 0.5), tmp_path / "m.pt", (8, 8))
