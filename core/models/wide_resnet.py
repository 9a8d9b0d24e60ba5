"""Wide ResNets (Zagoruyko & Komodakis) in the TRADES key layout, the usual robust teachers.

Key layout (so the TRADES ``model_cifar_wrn.pt`` and checkpoints in the same format load):
``conv1``, ``block1``/``block2``/``block3`` each holding ``layer.<i>.{bn1, relu1, conv1, bn2, relu2,
conv2, convShortcut}``, then ``bn1``, ``relu``, ``fc``. Only blocks that change the channel count have a
``convShortcut``. The ``relu*`` attributes hold the chosen activation (ReLU or Swish/SiLU); they have no
parameters, so the names do not affect loading.

The TRADES WRN-34-10 checkpoint also carries ``sub_block1.*`` keys: the original code builds a fourth
NetworkBlock after ``block1`` that ``forward`` never calls. This model does not have it; the teacher
loader drops those keys before a strict load. (The parameter count 46,160,474 of WRN-34-10 is without it.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.models.registry import register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "swish": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    # In-place ReLU saves memory on the big WRNs; SiLU's backward needs its input, so it stays out-of-place.
    return nn.ReLU(inplace=True) if name == "relu" else ACTIVATIONS[name]()


class WideBasicBlock(nn.Module):
    """Pre-activation block; when channels change, the shortcut sees the pre-activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = _activation(activation)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = _activation(activation)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        skip = x if self.convShortcut is None else self.convShortcut(pre)
        return skip + out


class NetworkBlock(nn.Module):
    """A stage of ``count`` wide blocks, stored under ``.layer`` as in TRADES."""

    def __init__(
        self, count: int, in_planes: int, out_planes: int, stride: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    dropout,
                    activation,
                )
                for i in range(count)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: stem to 16 channels, stages of 16k, 32k, 64k channels, BN + act, 8x8 avg pool, fc."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"wide_resnet depth must be 6n+4 with n >= 1 (e.g. 28, 34, 70), got {depth!r}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigError(f"wide_resnet widen_factor must be a positive integer, got {widen_factor!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"wide_resnet dropout must be in [0, 1), got {dropout!r}")
        _activation(activation)  # validate before building anything
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, dropout, activation)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, dropout, activation)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, dropout, activation)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = _activation(activation)
        self.fc = nn.Linear(channels[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init on convs (fan-out), unit BN, zero fc bias: the TRADES initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(torch.flatten(out, 1))


@register_model("wide_resnet")
def wide_resnet(
    num_classes: int = 10,
    depth: int = 34,
    widen_factor: int = 10,
    activation: str = "relu",
    dropout: float = 0.0,
) -> WideResNet:
    """Any WRN-depth-widen_factor; activation 'relu' or 'swish'."""
    return WideResNet(depth, widen_factor, num_classes, activation, dropout)


@register_model("wrn_34_10")
def wrn_34_10(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-34-10, the TRADES CIFAR-10 teacher of the RSLAD paper (46.2M parameters)."""
    return WideResNet(34, 10, num_classes, "relu", dropout)


@register_model("wrn_34_20")
def wrn_34_20(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-34-20, a stronger teacher used by later methods (e.g. AdaAD)."""
    return WideResNet(34, 20, num_classes, "relu", dropout)


@register_model("wrn_70_16")
def wrn_70_16(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-70-16 with ReLU."""
    return WideResNet(70, 16, num_classes, "relu", dropout)


@register_model("wrn_70_16_swish")
def wrn_70_16_swish(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-70-16 with Swish, the architecture of the Gowal et al. CIFAR-100 teacher.

    Only the architecture: Gowal et al.'s own checkpoints use a different key layout and normalise inside
    ``forward``; loading them needs a key mapping and the CIFAR-100 mean/std applied outside.
    """
    return WideResNet(70, 16, num_classes, "swish", dropout)
