"""Models: a registry with ``create_model``, architectures with named stages, checkpoints.

Adding an architecture: one file whose ``StagedModel`` subclass is decorated with
``@register_model("name")``, and one import line below.
"""

from . import base
from .base import (
    MODELS,
    ModelSpec,
    Normalize,
    StagedModel,
    count_classes,
    create_model,
    default_taps,
    list_models,
    register_model,
)

# Importing an architecture's file registers it.
from .small import MLP, SmallCNN  # noqa: E402
from .resnet import PreActResNet18, ResNet18  # noqa: E402
from .wideresnet import WideResNet  # noqa: E402
from .dm_wide_resnet import DMPreActResNet, DMWideResNet  # noqa: E402
from .ra_wide_resnet import RaWideResNet  # noqa: E402
from .rb_resnet import RBPreActResNet18, RBResNet18, RBResNet50, RBWideResNet  # noqa: E402
from .vision import VisionModel  # noqa: E402
from .convnext_v2 import ConvNeXtV2  # noqa: E402
from .loader import load_model, model_info  # noqa: E402

__all__ = [*base.__all__, "SmallCNN", "MLP", "ResNet18", "PreActResNet18", "WideResNet", "DMWideResNet",
           "DMPreActResNet", "RBWideResNet", "RBPreActResNet18", "RBResNet18", "RBResNet50",
           "VisionModel", "ConvNeXtV2", "load_model", "model_info"]
