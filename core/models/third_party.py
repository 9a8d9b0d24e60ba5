"""Architectures of the small robust CIFAR-10 checkpoints made by others (``shared/weights/``).

They let the teacher path be tested on files no one on this project wrote. Parameter names match the
checkpoints exactly, so ``model.load_state_dict(sd)`` works strictly once the loader has taken the
state dict out of its container (see ``KNOWN_CHECKPOINTS``). None of these networks normalises its
input: each expects images in [0, 1] followed by the per-checkpoint normalisation listed in
``KNOWN_CHECKPOINTS`` (taken from ``shared/weights/SOURCES.md``), which the teacher loader must apply.

Architectures come from alpha-beta-CROWN (``complete_verifier/models/cifar10_resnet/resnet.py`` and
``complete_verifier/model_defs.py``, BSD-3-Clause); the layer shapes were checked against the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@dataclass(frozen=True)
class ThirdPartyCheckpoint:
    """Where a known file keeps its weights, which architecture they fit and what input it expects."""

    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Keys/indices leading from the loaded object to the state dict: () when the file is the dict.
    state_dict_path: tuple[str | int, ...]


KNOWN_CHECKPOINTS: dict[str, ThirdPartyCheckpoint] = {
    "abcrown_cifar10_resnet4b_adv2px.pth": ThirdPartyCheckpoint(
        "abcrown_resnet4b", CIFAR10_MEAN, CIFAR10_STD, ("state_dict",)
    ),
    "abcrown_cifar10_resnet2b_adv2px.pth": ThirdPartyCheckpoint(
        "abcrown_resnet2b", CIFAR10_MEAN, CIFAR10_STD, ("state_dict",)
    ),
    "abcrown_sdp_cifar_cnn_a_adv.model": ThirdPartyCheckpoint(
        "cnn_a", (0.4914, 0.4824, 0.4467), CIFAR10_STD, ()
    ),
    "abcrown_sdp_cifar_cnn_a_adv4.model": ThirdPartyCheckpoint(
        "cnn_a", (0.4914, 0.4824, 0.4467), CIFAR10_STD, ()
    ),
    "abcrown_oval_cifar_wide_kw.pth": ThirdPartyCheckpoint(
        "cnn_a", (0.485, 0.456, 0.406), (0.225, 0.225, 0.225), ("state_dict", 0)
    ),
    "abcrown_eran_cifar_conv_small_pgd.pth": ThirdPartyCheckpoint(
        "conv_small", CIFAR10_MEAN, (0.2023, 0.1994, 0.201), ("state_dict", 0)
    ),
    # A cascade of three networks; the first one is the classifier the published numbers describe.
    "convex_adversarial_cifar_small_8px.pth": ThirdPartyCheckpoint(
        "cnn_a", (0.485, 0.456, 0.406), (0.225, 0.225, 0.225), ("state_dict", 0)
    ),
}


class PlainBasicBlock(nn.Module):
    """ResNet basic block without BatchNorm (convs carry biases), as verifiers prefer."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class VerifierResNet(nn.Module):
    """alpha-beta-CROWN's BN-free CIFAR ResNet with a dense head (ResNet5 / ResNet9 there).

    Stride-2 stem to ``in_planes``, then ``num_stages`` stages of two blocks with ``2 * in_planes``
    channels, each halving the resolution, then flatten -> 100 -> classes. The flattened size assumes
    32x32 inputs: 1024 for resnet2b (8 x 16 x 8 x 8), 512 for resnet4b (32 x 4 x 4).
    """

    def __init__(self, in_planes: int, num_stages: int, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        width = 2 * in_planes
        self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(PlainBasicBlock(in_planes, width, 2), PlainBasicBlock(width, width))
        if num_stages == 2:
            self.layer2 = nn.Sequential(PlainBasicBlock(width, width, 2), PlainBasicBlock(width, width))
        self.num_stages = num_stages
        side = image_size // 2 ** (1 + num_stages)
        self.linear1 = nn.Linear(width * side * side, 100)
        self.linear2 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer1(F.relu(self.conv1(x)))
        if self.num_stages == 2:
            out = self.layer2(out)
        out = F.relu(self.linear1(torch.flatten(out, 1)))
        return self.linear2(out)


@register_model("abcrown_resnet2b")
def abcrown_resnet2b(num_classes: int = 10) -> VerifierResNet:
    """alpha-beta-CROWN ``resnet2b()`` (ResNet5: 8-channel stem, one stage of 16, dense 1024->100).

    Checkpoint ``abcrown_cifar10_resnet2b_adv2px.pth`` (PGD-trained at 2/255), weights under
    ['state_dict']; normalise with mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435, 0.2616).
    """
    return VerifierResNet(8, 1, num_classes)


@register_model("abcrown_resnet4b")
def abcrown_resnet4b(num_classes: int = 10) -> VerifierResNet:
    """alpha-beta-CROWN ``resnet4b()`` (ResNet9: 16-channel stem, two stages of 32, dense 512->100).

    Checkpoint ``abcrown_cifar10_resnet4b_adv2px.pth`` (PGD-trained at 2/255), weights under
    ['state_dict']; normalise with mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435, 0.2616).
    """
    return VerifierResNet(16, 2, num_classes)


def _four_layer_cnn(padding: int, flat_features: int, num_classes: int) -> nn.Sequential:
    """Conv(3,16,4,s2) ReLU Conv(16,32,4,s2) ReLU Flatten FC-100 ReLU FC: keys 0, 2, 5, 7."""
    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=4, stride=2, padding=padding),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=padding),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat_features, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("cnn_a")
def cnn_a(num_classes: int = 10) -> nn.Sequential:
    """CNN-A (``cifar_model_wide`` / ``cnn_4layer_adv``): padded 4x4 convs, FC 2048->100->classes.

    Fits four files, each with its own normalisation:
    ``abcrown_sdp_cifar_cnn_a_adv.model`` and ``..._adv4.model`` (bare state dicts): mean
    (0.4914, 0.4824, 0.4467), std (0.2471, 0.2435, 0.2616); ``abcrown_oval_cifar_wide_kw.pth`` and
    ``convex_adversarial_cifar_small_8px.pth`` (under ['state_dict'][0]): mean (0.485, 0.456, 0.406),
    std (0.225, 0.225, 0.225).
    """
    return _four_layer_cnn(padding=1, flat_features=32 * 8 * 8, num_classes=num_classes)


@register_model("conv_small")
def conv_small(num_classes: int = 10) -> nn.Sequential:
    """ERAN ConvSmall (``cifar_conv_small``): unpadded 4x4 convs, FC 1152->100->classes.

    Checkpoint ``abcrown_eran_cifar_conv_small_pgd.pth`` (under ['state_dict'][0]); normalise with
    mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.201).
    """
    return _four_layer_cnn(padding=0, flat_features=32 * 6 * 6, num_classes=num_classes)
