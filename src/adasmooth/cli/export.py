"""``adasmooth export``: a mixed model as one file that plain PyTorch loads.

Examples::

    adasmooth export --mixnet runs/mixnet-calibrated --output deploy/mixture.pt2
    adasmooth export --mixnet runs/fixed-mixture --output deploy/fixed.pt2
    adasmooth export --std runs/std --rob runs/rob --alpha 0.8 --output deploy/fixed.pt2
    adasmooth export --mixnet runs/mixnet --format torchscript --output deploy/mixture.pt

Load it anywhere with ``torch.export.load("deploy/mixture.pt2").module()`` (``torch.jit.load`` for
``--format torchscript``, and where torch.export cannot trace the model: the command says so); no
adasmooth needed. The input shape is the one the saved mixture records, else the base models',
unless --input-shape is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..core.config import RunOptions, option, output_option, rule_params_option
from ..core.errors import ConfigError
from .common import checkpoint_files


@dataclass
class ExportConfig(RunOptions):
    mixnet: str | None = option(None, help="a saved mixture: adaptive (train-mixnet / calibrate) or fixed (its .json)")
    std: str | None = option(None, help="standard base model checkpoint g of a fixed mixture (with --rob, --alpha)")
    rob: str | None = option(None, help="robust base model checkpoint h of a fixed mixture")
    alpha: float | None = option(None, help="fixed mixing weight of h, in [0, 1]")
    std_scale: float = option(1.0, help="logit scale of g in a fixed mixture")
    rob_scale: float = option(1.0, help="logit scale of h in a fixed mixture")
    rule: str = option("prob", help="mixing rule of a fixed mixture; prob is Eq. 3.4; rules that take input "
                                    "gradients inside forward cannot be exported",
                       registry="adasmooth.mixing:MIXING_RULES")
    rule_params: dict[str, Any] = rule_params_option()
    input_shape: list[int] | None = option(None, help="C H W of the inputs; none: what the mixture or its base "
                                                      "models record")
    format: Literal["export", "torchscript"] = option(
        "export", help="export: a torch.export program (torch.export.load(FILE).module()); torchscript: "
                       "torch.jit.load(FILE), also used where torch.export cannot trace the model")
    output: str = output_option("runs/mixture.pt2", "the file to write")

    def validate(self) -> None:
        from ..mixing import MIXING_RULES, check_rule_params

        MIXING_RULES.get(self.rule)  # an unknown name lists the known ones
        check_rule_params(self.rule_params, [self.rule] if self.alpha is not None else [])
        fixed = (self.std, self.rob, self.alpha)
        if self.mixnet is not None and any(v is not None for v in fixed):
            raise ConfigError("give --mixnet FILE, or --std CKPT --rob CKPT --alpha FLOAT, not both")
        if self.mixnet is None and any(v is None for v in fixed):
            raise ConfigError("give --mixnet FILE (a saved mixture), or --std CKPT --rob CKPT --alpha FLOAT")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not (self.std_scale > 0 and self.rob_scale > 0):
            raise ConfigError(f"std_scale and rob_scale must be > 0, got {self.std_scale} and {self.rob_scale}")
        if self.input_shape is not None and (len(self.input_shape) != 3 or min(self.input_shape) < 1):
            raise ConfigError(f"input_shape must be three positive integers C H W, got {self.input_shape}")


CONFIG = ExportConfig


def files(cfg: ExportConfig) -> tuple[list, list]:
    return checkpoint_files(cfg.mixnet, cfg.std, cfg.rob), [cfg.output]


def run(cfg: ExportConfig) -> int:
    from ..core.runtime import resolve_device
    from ..mixing import MixedClassifier, build_rule
    from ..mixing.export import export_mixture, load_mixture, mixture_input_shape
    from ..models.loader import load_model

    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.mixnet is not None:
        model, recorded = load_mixture(cfg.mixnet, device)
        source = {"mixture": cfg.mixnet}
    else:
        g, std_info = load_model(cfg.std, device)
        h, rob_info = load_model(cfg.rob, device)
        model = MixedClassifier(g, h, cfg.alpha, std_scale=cfg.std_scale, rob_scale=cfg.rob_scale,
                                rule=build_rule(cfg.rule, cfg.rule_params.get(cfg.rule)))
        model.rule = cfg.rule
        recorded = {"input_shape": std_info.get("input_shape") or rob_info.get("input_shape")}
        source = {"std": cfg.std, "rob": cfg.rob}
    shape = cfg.input_shape or recorded.get("input_shape") or mixture_input_shape(model)
    if shape is None:
        raise ConfigError("neither the mixture nor its base models record an input shape; give --input-shape C H W")
    info = export_mixture(model, cfg.output, shape, {"source": source}, seed=cfg.seed, format=cfg.format)
    if "fallback" in info:
        print(f"export: torch.export cannot export this model ({info['fallback']}); wrote TorchScript instead")
    loader = "torch.jit.load" if info["format"] == "torchscript" else "torch.export.load(...).module()"
    print(f"export: {info['kind']} mixture, input {tuple(info['input_shape'])}, written to {cfg.output} "
          f"({info['format']}: load with {loader}; max |logit difference| to the library {info['max_abs_diff']:.2g})")
    return 0
