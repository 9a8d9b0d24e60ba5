"""Projected gradient ascent under an L-inf box: the inner maximisation shared by every method and attack.

Each method or attack supplies only its loss; the projection, clipping and random start live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Init = Literal["uniform", "normal", "none"]


def random_start(x: torch.Tensor, eps: float, init: Init, init_scale: float = 0.001,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting point of the ascent.

    'uniform': x + U(-eps, eps), clipped to [0, 1] (Madry's PGD).
    'normal': x + init_scale * N(0, 1), not clipped (TRADES / RSLAD reference code).
    'none': x itself.
    """
    if init == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return (x + eps * noise).clamp_(0.0, 1.0)
    if init == "normal":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + init_scale * noise
    if init == "none":
        return x.clone()
    raise ValueError(f"unknown init {init!r}")


def pgd(model: nn.Module, x: torch.Tensor, loss_fn: LossFn, *, eps: float, step_size: float, steps: int,
        init: Init = "uniform", init_scale: float = 0.001, generator: torch.Generator | None = None,
        ) -> torch.Tensor:
    """Maximise ``loss_fn(model(x_adv), x_adv)`` over the L-inf ball of radius eps around x, inside [0, 1].

    Gradients flow to the input only: parameters are not asked for gradients, so no weight gradient is
    computed or accumulated. The caller chooses the model's mode (train or eval) and any autocast.
    """
    x = x.detach()
    x_adv = random_start(x, eps, init, init_scale, generator).detach()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), x_adv)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
            x_adv = x_adv.detach()
    finally:
        for p in params:
            p.requires_grad_(True)
    return x_adv
