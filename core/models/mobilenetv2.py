"""CIFAR MobileNetV2, the RSLAD paper's second (lightweight) student.

Differs from the ImageNet network so that 32x32 inputs keep enough resolution: the stem is a 3x3
stride-1 conv, and the 24-channel stage uses stride 1 instead of 2. Attribute names follow the
kuangliu/pytorch-cifar layout (conv1, bn1, layers, conv2, bn2, linear) so reference state dicts load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.registry import register_model

# (expansion, out_planes, num_blocks, stride) per stage; stride 1 in the second row is the CIFAR change.
CIFAR_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, linear project (1x1); residual only when stride is 1.

    At stride 1 a channel change gets a 1x1 conv + BN shortcut, as in the reference; at stride 2 there
    is no residual at all.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(
            hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """32-channel stem, seven inverted-residual stages, 320->1280 1x1 conv, 4x4 avg pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        in_planes = 32
        for expansion, out_planes, count, stride in CIFAR_STAGES:
            for block_stride in [stride] + [1] * (count - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, block_stride))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10) -> MobileNetV2:
    """CIFAR MobileNetV2 (2.3M parameters)."""
    return MobileNetV2(num_classes)
