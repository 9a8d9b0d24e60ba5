"""Cross-entropy PGD-20 in the two parameterisations of the paper: Madry's (SAT) and TRADES'.

Both maximise the summed cross entropy from a uniform random start; they differ in step size only
(2/255 versus 0.003 at eps 8/255), which is why the paper (after Carmon et al.) reports them separately.
At another eps the default step keeps its ratio to eps (2/255 per 8/255: eps/4; 0.003 per 8/255), so
an evaluation at eps 2/255 takes steps of 0.5/255 and 0.00075; a ``step_size`` given explicitly is used
as is. The step used is in ``settings`` and so in every report row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.attacks.base import Attack
from core.attacks.pgd import pgd
from core.errors import ConfigError

REFERENCE_EPS = 8 / 255  # the eps the default steps are given for


class PGDAttack(Attack):
    """L-inf PGD on a loss of (logits, y); subclasses fix the defaults and may swap ``loss``."""

    defaults: dict[str, Any] = {"steps": 20, "step_size": 2 / 255, "init": "uniform"}

    def __init__(self, model: nn.Module, eps: float, **kwargs: Any) -> None:
        if "step_size" not in kwargs and float(eps) > 0:  # the default step scaled to eps (exact at 8/255)
            kwargs["step_size"] = float(self.defaults["step_size"]) * (float(eps) / REFERENCE_EPS)
        super().__init__(model, eps, **kwargs)

    def validate(self) -> None:
        steps, step_size, init = self.settings["steps"], self.settings["step_size"], self.settings["init"]
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"{self.name}: steps must be a positive integer, got {steps!r}")
        if not float(step_size) > 0:
            raise ConfigError(f"{self.name}: step_size must be > 0, got {step_size!r}")
        if init not in ("uniform", "normal", "none"):
            raise ConfigError(f"{self.name}: init must be uniform, normal or none, got {init!r}")

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross entropy: summing keeps per-example gradients independent of the batch size."""
        return F.cross_entropy(logits, y, reduction="sum")

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(self.model, x, lambda logits, _x_adv: self.loss(logits, y), eps=self.eps,
                   step_size=float(self.settings["step_size"]), steps=int(self.settings["steps"]),
                   init=self.settings["init"], generator=self.rng(x.device))


class PGDSAT(PGDAttack):
    """PGD_SAT: Madry et al.'s attack, 20 steps of 2/255 from a uniform start."""

    name = "pgd_sat"
    defaults = {"steps": 20, "step_size": 2 / 255, "init": "uniform"}


class PGDTRADES(PGDAttack):
    """PGD_TRADES: Zhang et al.'s white-box evaluation, 20 steps of 0.003 from a uniform start."""

    name = "pgd_trades"
    defaults = {"steps": 20, "step_size": 0.003, "init": "uniform"}
