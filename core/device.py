"""Device choice and the speed levers (bf16 autocast, fp32 depthwise layers, channels_last) in one place."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the given device, or a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def is_depthwise(module: nn.Module) -> bool:
    """A grouped convolution with one group per input channel (MobileNet's 3x3 layers)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def depthwise_in_fp32(model: nn.Module, device: torch.device) -> list[RemovableHandle]:
    """Run the model's depthwise convolutions in fp32 inside a bf16 autocast; returns the hook handles.

    On a CPU, oneDNN's bf16 depthwise kernels (forward and backward) are slower than its fp32 ones, while
    the pointwise convolutions around them gain from bf16: a MobileNetV2 RSLAD step ran ~1.2x faster this
    way than in all-bf16 (bench/train_step.py --depthwise-fp32 on|off). Each depthwise layer's input is
    cast up to fp32 and autocast is paused for it, so its forward and backward are fp32; its output is
    fp32 and the next layer casts it back down. The weights and the state_dict do not change. An
    exception inside the model leaves the flag off, but the ``torch.autocast`` block around the forward
    restores it on exit.
    """
    kind = device.type

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module._autocast_was = torch.is_autocast_enabled(kind)  # type: ignore[assignment]
        if not module._autocast_was:
            return args
        torch.set_autocast_enabled(kind, False)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        torch.set_autocast_enabled(kind, module._autocast_was)

    handles = []
    for module in model.modules():
        if is_depthwise(module):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    return handles
