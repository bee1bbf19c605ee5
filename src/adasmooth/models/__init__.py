"""Models: a registry with ``create_model``, architectures with named stages, checkpoints."""

from .base import (
    MLP,
    ModelSpec,
    Normalize,
    PreActResNet18,
    ResNet18,
    SmallCNN,
    WideResNet,
    count_classes,
    create_model,
    default_taps,
    list_models,
    register_model,
)

__all__ = [
    "Normalize",
    "ModelSpec",
    "register_model",
    "create_model",
    "list_models",
    "default_taps",
    "count_classes",
    "SmallCNN",
    "MLP",
    "ResNet18",
    "PreActResNet18",
    "WideResNet",
]
