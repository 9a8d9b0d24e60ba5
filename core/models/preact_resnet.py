"""CIFAR pre-activation ResNet-18, a common student and baseline in adversarial-training papers.

Pre-activation blocks apply BN + ReLU before each conv; the projection shortcut is a bare 1x1 conv fed
the pre-activated input. As in the adversarial-training codebases (e.g. Rice et al. 2020), a final BN +
ReLU precedes pooling, since the last block's output is otherwise never normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, with an identity or 1x1-conv shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_planes != planes
        if self.projects:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.projects else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Stem conv, four pre-activation stages (64..512 planes), final BN + ReLU, 4x4 avg pool, linear."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_stage(64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        blocks = []
        for block_stride in [stride] + [1] * (count - 1):
            blocks.append(PreActBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10) -> PreActResNet:
    """CIFAR PreAct ResNet-18."""
    return PreActResNet([2, 2, 2, 2], num_classes)
