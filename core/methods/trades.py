"""TRADES (Zhang et al.): the student is its own teacher, Table 1 second row."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import INITS, Batch, Method, full_precision


class TRADES(Method):
    """TRADES: CE on clean inputs plus a KL pull of the adversarial prediction towards the clean one.

    inner:  x_adv = argmax  KL(S(x) || S(x'))        summed over batch and classes; S(x) fixed, eval mode
    outer:  min_S  CE(S(x), y) + beta * (1/B) sum_i KL(S(x)_i || S(x_adv)_i)

    As in the reference (yaodongyu/TRADES): start x + 0.001 * N(0, 1), 10 steps of 0.007, eps 0.031
    (TRADES's own value; 8/255 = 0.0314), beta 6. In the outer KL the clean prediction is not detached:
    gradients flow through both sides, as in the reference. S(x) is computed once per step here (the
    reference repeats that forward, which only adds batch-norm running-statistic updates).
    Epochs: 100, learning rate / 10 at 75 and 90 (paper appendix D: TRADES ran 100 epochs; 75/90 are the
    decay points of the TRADES script, whose default run of 76 or 80 epochs, by version, ends soon after 75).
    """

    name = "trades"
    needs_teacher = False
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 0.031, "step_size": 0.007, "steps": 10, "init": "normal", "beta": 6.0,
        "epochs": 100, "milestones": (75, 90),
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init": INITS}

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        with torch.no_grad():
            p_nat = F.softmax(self.logits(student, batch, batch.x), dim=1)

        def kl_to_clean(logits: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(full_precision(logits), dim=1), p_nat, reduction="sum")

        return self.ascend(student, batch, kl_to_clean)

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_nat = self.logits(student, batch, batch.x)
        logits_adv = self.logits(student, batch, x_adv)
        ce = F.cross_entropy(logits_nat, batch.y)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
        return ce + self.params["beta"] * kl, {"ce_nat": ce, "kl_adv": kl}
