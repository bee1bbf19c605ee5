"""The base-model training config: the options every method shares, plus one block per method that
declares options of its own (``TRAINING_METHODS.register(..., options=SomeOptions)``).

The blocks are added when this module is imported, from the registered methods (importing
:mod:`.methods` registers the built-ins; a method module added there is picked up the same way), so a
new method's options reach ``TrainConfig``, YAML configs and the command line without an edit here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..core.checks import check_counts, check_eps, check_finite
from ..core.config import data_dir_option, option, RunOptions
from ..core.errors import ConfigError
from ..core.precision import Precision, channels_last_option, compile_option, precision_option
from ..data import DATASETS, ImageOptions, dataset_info
from ..data.images import image_options
from .methods import TRAINING_METHODS
from .methods.base import method_options

__all__ = ["TrainConfig", "SharedTrainConfig", "result_config", "training_augmentation"]

_DATASETS = "adasmooth.data:DATASETS"
_METHODS = "adasmooth.train.methods:TRAINING_METHODS"
_MODELS = "adasmooth.models:MODELS"


@dataclass
class SharedTrainConfig(RunOptions):
    """The options of base-model training that every method shares."""

    dataset: str = option("digits", help="data set", registry=_DATASETS)
    data_dir: str | None = data_dir_option()
    image: ImageOptions = image_options()
    augment: Literal["auto", "none", "crop", "crop-flip", "resized-crop-flip"] = option(
        "auto", help="training augmentation, seeded per example, applied before noise and attacks; auto: "
                     "the data set's own (crop-flip for cifar10/cifar100, resized-crop-flip for folder/imagenet, "
                     "none otherwise)")
    workers: int = option(0, help="data-loading worker processes (0: load in the main process)")
    arch: str = option("small-cnn", help="model name", registry=_MODELS)
    model_kwargs: dict = option(help="extra keyword arguments of the model constructor", default_factory=dict,
                                cli=False)
    method: str = option("standard", help="training method", registry=_METHODS)
    # the threat model of adversarial training (pgd, trades) and of the final measurement
    norm: Literal["linf", "l2"] = option("linf", help="threat model")
    eps: float = option(0.1, help="attack radius in [0, 1] pixel units")
    attack_steps: int = option(10, help="PGD steps of the training attack (pgd, trades)")
    attack_step_size: float | None = option(None, help="PGD step of the training attack; none: 2.5*eps/steps")
    trades_beta: float = option(6.0, help="weight of the KL term of TRADES")
    sigma: float = option(0.25, help="Gaussian noise level of gaussian and cat-rs training (pixel units)")
    # optimisation
    optimizer: Literal["sgd", "adam"] = option("sgd", help="optimizer")
    lr: float = option(0.05, help="learning rate")
    momentum: float = option(0.9, help="SGD momentum")
    weight_decay: float = option(5e-4, help="weight decay")
    schedule: Literal["cosine", "step", "constant"] = option("cosine", help="learning-rate schedule over all steps")
    warmup_epochs: float = option(0.0, help="first raise the learning rate linearly over this many epochs")
    epochs: int = option(10, help="training epochs")
    batch_size: int = option(128, help="training batch size")
    accumulate: int = option(1, help="batches per optimizer step (gradient accumulation: one step on their joint "
                                     "mean loss)")
    clip_grad_norm: float | None = option(None, help="clip the gradient's l2 norm to this; none: no clipping")
    ema_decay: float | None = option(None, help="average the weights exponentially with this decay (e.g. 0.999) "
                                                "and keep the average; none: off")
    precision: Precision = precision_option()
    channels_last: bool = channels_last_option()
    compile: bool = compile_option()
    n_train: int | None = option(None, help="use only the first N training examples")
    val_fraction: float = option(0.0, help="hold out this part of the training set (not trained on)")
    select_best: bool = option(False, help="measure clean accuracy on the held-out part (--val-fraction) after "
                                           "each epoch and keep the best epoch's weights")
    # held-out measurement written into the checkpoint
    eval_examples: int | None = option(1000, help="test examples measured at the end; none: all")
    eval_pgd_steps: int = option(20, help="PGD steps of the final measurement")
    output: str = option("runs/model", help="checkpoint path (writes OUTPUT.safetensors and OUTPUT.json, "
                                            "the per-epoch OUTPUT.history.json and .png)", short="-o")
    resume: bool = option(True, help="continue from OUTPUT.resume.pt when it exists")
    save_every: int | None = option(None, help="also write the resume file every N steps inside an epoch; "
                                               "none: at the end of each epoch only")

    def validate(self) -> None:
        TRAINING_METHODS.get(self.method)  # an unknown name lists the known ones
        check_eps(self.eps, self.norm)
        check_finite("sigma", self.sigma, 0, strict=True)
        check_counts(self, "epochs", "batch_size", "attack_steps", "eval_pgd_steps", "n_train", "eval_examples",
                     "save_every", "accumulate")
        check_counts(self, "workers", low=0)
        self.image.validate()
        check_finite("attack_step_size", self.attack_step_size, 0, strict=True)
        check_finite("lr", self.lr, 0, strict=True)
        check_finite("momentum", self.momentum, 0)
        check_finite("weight_decay", self.weight_decay, 0)
        check_finite("trades_beta", self.trades_beta, 0)
        check_finite("val_fraction", self.val_fraction, 0, below=1)
        check_finite("warmup_epochs", self.warmup_epochs, 0)
        check_finite("clip_grad_norm", self.clip_grad_norm, 0, strict=True)
        check_finite("ema_decay", self.ema_decay, 0, below=1)
        if self.select_best and self.val_fraction == 0:
            raise ConfigError("select_best needs a held-out part: set val_fraction > 0")
        for name in method_options():
            getattr(self, name).validate()
        check = TRAINING_METHODS.info(self.method).get("check")
        if check is not None:
            check(self)


def _build_train_config() -> type:
    blocks = [(name, cls, option(help=f"options of method {method}", default_factory=cls))
              for name, (method, cls) in method_options().items()]
    cls = dataclasses.make_dataclass("TrainConfig", blocks, bases=(SharedTrainConfig,))
    cls.__module__ = __name__
    cls.__doc__ = "Base-model training: the shared options and one block per method with options of its own."
    return cls


TrainConfig = _build_train_config()

# Fields that change how a run is watched, measured or laid out in memory, not the weights it produces.
_NOT_RESULT_FIELDS = ("progress", "resume", "device", "eval_examples", "eval_pgd_steps", "workers", "save_every",
                      "channels_last", "compile")
# Engine options whose neutral value is the loop as it was before they existed: left out of the
# fingerprint at that value, so adding them did not invalidate resume files.
_NEUTRAL = {"accumulate": 1, "clip_grad_norm": None, "ema_decay": None, "warmup_epochs": 0.0, "select_best": False}


def result_config(cfg: Any) -> dict:
    """The config fields that determine a run's weights: a resume file must have been made with these.

    Of the method option blocks only the one of the method in use counts, so that adding a method
    with options leaves the other methods' resume files valid.
    """
    d = asdict(cfg)
    for k in _NOT_RESULT_FIELDS:
        d.pop(k, None)
    if not isinstance(cfg, SharedTrainConfig):  # (the mixing-network trainer's config)
        return d
    for k, neutral in _NEUTRAL.items():
        if d[k] == neutral:
            d.pop(k)
    for name, (owner, _) in method_options().items():
        if owner != cfg.method:
            d.pop(name, None)
    return d


def training_augmentation(cfg: Any) -> str:
    """The augmentation a run uses: ``cfg.augment``, with ``auto`` resolved by the data set's registry entry."""
    if cfg.augment != "auto":
        return cfg.augment
    return dataset_info(cfg.dataset).get("augment", "none") if cfg.dataset in DATASETS else "none"
