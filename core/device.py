"""Device choice and the speed levers (bf16 autocast, channels_last) in one place."""

from __future__ import annotations

import contextlib

import torch

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
