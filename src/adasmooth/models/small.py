"""Small models for the 8x8 digits and 28x28 MNIST-like data: a two-stage CNN and an MLP."""

from __future__ import annotations

from torch import nn

from .base import StagedModel, register_model


@register_model("small-cnn")
class SmallCNN(StagedModel):
    """Two conv stages and an MLP head; works for 8x8 and 28x28 inputs (adaptive pooling)."""

    stage_names = ("stem", "stage1", "stage2", "head")

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, hidden: int = 128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )


@register_model("mlp")
class MLP(StagedModel):
    stage_names = ("stem", "stage1", "stage2", "head")

    def __init__(self, num_classes: int, in_channels: int = 1, input_size: int = 28, hidden: int = 256):
        super().__init__()
        self.stem = nn.Flatten()
        self.stage1 = nn.Sequential(nn.Linear(in_channels * input_size * input_size, hidden), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)
