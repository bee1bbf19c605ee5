"""Architectures that come from timm or torchvision (the ``[vision]`` extra), as adasmooth models:
``vision`` with ``library`` (``timm`` / ``torchvision``), the library's model name ``network`` and
its ``options``; ``stem`` swaps in the ConvStem of Singh et al. 2023 (:mod:`.convstem`).

Used for RobustBench's ImageNet entries. The library is imported when such a model is built, not
before: without it, building one is a one-line MissingDependencyError naming the extra. No weights
are downloaded (``pretrained=False``). The inner network sits under ``model``, so its state-dict keys
are ``model.<library keys>``, the layout of RobustBench's ``normalize_model`` wrapper.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError, MissingDependencyError
from .base import StagedModel, register_model
from .convstem import ConvStem

__all__ = ["LIBRARIES", "import_library", "VisionModel", "adapt_library_state"]

LIBRARIES = ("timm", "torchvision")


def import_library(library: str, what: str):
    """``timm`` or ``torchvision.models``; a MissingDependencyError naming ``what`` needs it when it does not import."""
    if library not in LIBRARIES:
        raise ConfigError(f"unknown model library {library!r}; known: {', '.join(LIBRARIES)}")
    module = "timm" if library == "timm" else "torchvision.models"
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install raises more than ImportError (e.g. missing compiled ops)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise MissingDependencyError(f"{what} needs {library}, which does not import here ({first}); "
                                     f"install it with pip install 'adasmooth[vision]'") from None


def _library_network(library: str, name: str, options: Mapping[str, Any]) -> nn.Module:
    lib = import_library(library, f"the {library} model {name!r}")
    if library == "timm":
        return lib.create_model(name, pretrained=False, **options)
    factory = getattr(lib, name, None)
    if not callable(factory):
        raise ConfigError(f"torchvision has no model {name!r}")
    return factory(weights=None, **options)


# Where Singh et al. 2023 put their stem: ConvNeXt's ``stem``, the ViT patch embedding's projection.
_STEM_SLOTS = {"convnext": ("stem",), "vit": ("patch_embed", "proj")}


@register_model("vision")
class VisionModel(StagedModel):
    """A timm or torchvision network behind adasmooth's input normalisation (pixels in [0, 1] in)."""

    def __init__(self, num_classes: int, in_channels: int = 3, library: str = "timm", network: str = "",
                 options: Mapping[str, Any] | None = None, stem: Mapping[str, Any] | None = None):
        super().__init__()
        if in_channels != 3:
            raise ConfigError(f"{library} models take 3 input channels, not {in_channels}")
        options = dict(options or {})
        options.setdefault("num_classes", num_classes)
        self.model = _library_network(library, network, options)
        if stem is not None:
            stem = dict(stem)
            slot = _STEM_SLOTS.get(stem.pop("slot", "convnext"))
            if slot is None:
                raise ConfigError(f"unknown ConvStem slot; known: {', '.join(_STEM_SLOTS)}")
            parent = self.model
            for attr in slot[:-1]:
                parent = getattr(parent, attr)
            setattr(parent, slot[-1], ConvStem(**stem))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalized(x))


def adapt_library_state(state: dict[str, torch.Tensor], model: VisionModel, adapter: str | None,
                        source: str) -> dict[str, torch.Tensor]:
    """Old checkpoints brought to the running library's layout, as RobustBench's loader does it
    (``timm-swin``: timm's own ``swin_transformer.checkpoint_filter_fn``)."""
    if adapter is None:
        return state
    if adapter != "timm-swin":
        raise ConfigError(f"unknown state-dict adapter {adapter!r}")
    timm = import_library("timm", source)
    try:
        from timm.models.swin_transformer import checkpoint_filter_fn
    except ImportError:  # a timm without it takes the file as it is, as RobustBench then does
        return state
    try:
        return dict(checkpoint_filter_fn(state, model.model))
    except Exception as err:  # noqa: BLE001 - timm raises anything on a foreign file
        raise CheckpointError(f"{source}: timm {getattr(timm, '__version__', '')} cannot adapt its Swin weights "
                              f"({type(err).__name__}: {str(err)[:120]})") from None
