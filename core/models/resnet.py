"""CIFAR ResNets (18/34/50) as the RSLAD reference uses them as students.

The CIFAR variant differs from the ImageNet one: a 3x3 stride-1 stem, no max-pool, and a 4x4 average
pool at the end (for 32x32 inputs). Attribute names follow the widely used kuangliu/pytorch-cifar layout
(conv1, bn1, layer1..layer4, linear; blocks: conv1, bn1, conv2, bn2, [conv3, bn3,] shortcut) so state
dicts saved by the reference code load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.registry import register_model


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Shortcut for a block whose output shape differs from its input: 1x1 conv + BN (else identity)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4, with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem, four stages of 64/128/256/512 planes (strides 1,2,2,2), avg pool, linear."""

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], num_blocks: list[int], num_classes: int = 10
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_stage(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, count: int, stride: int
    ) -> nn.Sequential:
        blocks = []
        for block_stride in [stride] + [1] * (count - 1):
            blocks.append(block(self.in_planes, planes, block_stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # A fixed 4x4 pool as in the reference: on 32x32 inputs the last stage is exactly 4x4.
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))


@register_model("resnet18")
def resnet18(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18, the RSLAD student (11.2M parameters)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@register_model("resnet34")
def resnet34(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


@register_model("resnet50")
def resnet50(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-50 (bottleneck blocks); the black-box surrogate in the paper's transfer attacks."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)
