"""The small base class every attack shares, and the identity attack ``clean``.

The base class owns what must hold for every attack, so no attack can forget it: the model is in eval
mode, the computation is fp32 (autocast off), weights are never asked for gradients, and the result lies
within eps of x (L-inf) and inside [0, 1].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from core.errors import ConfigError, DataError


@contextlib.contextmanager
def attack_mode(models: list[nn.Module], device_type: str) -> Iterator[None]:
    """Eval mode, frozen weights and fp32 for the duration of an attack; the previous state comes back after.

    Frozen weights mean ``backward()`` inside a third-party attack (FAB does this) cannot leave ``.grad`` on
    the model's parameters, and no memory or time is spent on weight gradients.
    """
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in models]
    try:
        for model, _, params in saved:
            model.eval()
            for p, _ in params:
                p.requires_grad_(False)
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        for model, training, params in saved:
            model.train(training)
            for p, requires_grad in params:
                p.requires_grad_(requires_grad)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The nearest point of the L-inf ball of radius eps around x intersected with [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Float32 images in [0, 1]: uint8 is divided by 255, other floats are cast to fp32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise DataError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return x.float()


class Attack:
    """An attack under an L-inf budget eps. Subclasses set ``name`` and ``defaults`` and write ``_perturb``
    (or ``_run``, when the attack itself decides which examples stay correct, as AutoAttack does).

    ``settings`` holds every hyper-parameter that decides the result (defaults merged with overrides, plus
    the seed when one is given), so a report can quote it verbatim and a reader can rerun the attack.
    Randomness (random starts, Square's sampling) draws from ``generator`` when one is given, else from a
    generator seeded with ``seed``, else from torch's global RNG (pyautoattack's attacks use seed 0 then).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    random: ClassVar[bool] = True   # whether the result depends on a seed (reported in settings if so)

    def __init__(self, model: nn.Module, eps: float, *, seed: int | None = None,
                 generator: torch.Generator | None = None, **settings: Any) -> None:
        if not 0.0 <= float(eps) <= 1.0:
            raise ConfigError(f"{self.name}: eps must be in [0, 1] (images are in [0, 1]), got {eps}")
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ConfigError(f"{self.name}: unknown setting(s) {', '.join(unknown)}; known: {known}")
        self.model = model
        self.eps = float(eps)
        self.settings: dict[str, Any] = {**self.defaults, **settings}
        if seed is not None and self.random:
            self.settings["seed"] = int(seed)
        self.seed = seed
        self.generator = generator
        self.warnings: list[str] = []   # things a report should show (filled by some attacks)
        self._seeded: dict[str, torch.Generator] = {}
        self.validate()

    def validate(self) -> None:
        """Check ``self.settings``; raise ConfigError for a bad value. Subclasses extend this."""

    def models(self) -> list[nn.Module]:
        """Every model the attack runs: these are put in eval mode and frozen during ``perturb``."""
        return [self.model]

    def rng(self, device: torch.device) -> torch.Generator | None:
        """The generator for random draws on ``device``: one seeded stream per device, across batches."""
        if self.generator is not None:
            if self.generator.device.type != device.type:
                raise ConfigError(f"{self.name}: the generator is on {self.generator.device} but the data is "
                                  f"on {device}; pass a generator for {device.type} or a seed")
            return self.generator
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._seeded:
            self._seeded[key] = torch.Generator(device=device).manual_seed(int(self.seed))
        return self._seeded[key]

    def int_seed(self) -> int:
        """An integer seed for third-party code that seeds torch's global RNG itself (pyautoattack)."""
        if self.generator is not None:
            draw = torch.randint(2**31 - 1, (1,), generator=self.generator, device=self.generator.device)
            return int(draw.item())
        return int(self.seed) if self.seed is not None else 0

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for (x, y): float32, within eps of x in L-inf, inside [0, 1]."""
        x_adv, _ = self.run(x, y)
        return x_adv

    def run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, correct): the adversarial examples and whether the model still gets each one right."""
        x = as_images(x).detach()
        y = y.detach().long().to(x.device)
        with attack_mode(self.models(), x.device.type):
            x_adv, correct = self._run(x, y)
        return x_adv.detach(), correct.detach()

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = project(self._perturb(x, y).detach().float(), x, self.eps)
        with torch.no_grad():
            correct = self.model(x_adv).argmax(dim=1) == y
        return x_adv, correct

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.6g}, {self.settings})"


class Clean(Attack):
    """No perturbation: the clean accuracy every robust accuracy is compared with."""

    name = "clean"
    random = False

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.clone()
