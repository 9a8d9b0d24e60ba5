"""A very small CNN so that tests of training, attacks and the service run in milliseconds on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.registry import register_model


class TinyCNN(nn.Module):
    """Two 3x3 convs (8 and 16 channels, the second with stride 2), BN, global average pool, linear.

    Adaptive pooling makes it accept any input of at least 8x8 pixels. BN is included so tests exercise
    the train/eval mode switches that the real students have.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


@register_model("tiny_cnn")
def tiny_cnn(num_classes: int = 10, in_channels: int = 3) -> TinyCNN:
    """A few thousand parameters; for tests only."""
    return TinyCNN(num_classes, in_channels)
