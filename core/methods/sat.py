"""SAT: standard adversarial training (Madry et al.), Table 1 first row."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import INITS, Batch, Method


class SAT(Method):
    """Standard adversarial training: the hard label supervises both the attack and the update.

    inner:  x_adv = argmax_{||x' - x||_inf <= eps}  CE(S(x'), y)     PGD-10, step 2/255, uniform start
    outer:  min_S  CE(S(x_adv), y)

    Epochs: 100, learning rate / 10 at 75 and 90. Appendix D of the paper states SAT was trained for
    100 epochs; the milestones are the 75/90 schedule the paper uses for its 100-epoch runs.
    """

    name = "sat"
    needs_teacher = False
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "uniform",
        "epochs": 100, "milestones": (75, 90),
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init": INITS}

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        return self.ascend(student, batch, self.ce_sum(batch.y))

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(self.logits(student, batch, x_adv), batch.y), {}
