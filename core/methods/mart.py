"""MART (Wang et al.): misclassification-aware adversarial training, Table 1 third row."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import INITS, Batch, Method


class MART(Method):
    """MART: a boosted CE on x_adv plus a KL term weighted towards misclassified clean examples.

    inner:  x_adv = argmax  CE(S(x'), y)                                   PGD-10, step 0.007
    outer:  min_S  CE(S(x_adv), y) - log(1.0001 - max_{k != y} p_adv,k + 1e-12)
                   + beta * (1/B) sum_i [ sum_k KL(p_nat,i || p_adv,i) ] * (1.0000001 - p_nat,i[y_i])

    with p = softmax(S(.)), KL computed against log(p_adv + 1e-12). The constants 1.0001, 1e-12 and
    1.0000001 are the reference's (YisenWang/MART) and are kept so the numbers match. p_nat is not
    detached, as in the reference. Start x + 0.001 * N(0, 1) (the reference code's start); eps 8/255
    (the reference uses 0.031; this library uses 8/255 everywhere except TRADES). beta 6 is the
    reference's WideResNet value; its ResNet-18 script uses beta 5 with SGD lr 0.01 and weight decay
    3.5e-3: pass beta=5, lr=0.01, weight_decay=3.5e-3 to match it (the defaults here are the shared
    lr 0.1 x batch/128, momentum 0.9, weight decay 2e-4). With another eps the step scales as 0.007 per 8/255.
    Epochs: 100, learning rate / 10 at 75 and 90, like SAT and TRADES.
    """

    name = "mart"
    needs_teacher = False
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 0.007, "steps": 10, "init": "normal", "beta": 6.0,
        "epochs": 100, "milestones": (75, 90),
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init": INITS}

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        return self.ascend(student, batch, self.ce_sum(batch.y))

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = batch.y
        logits_nat = self.logits(student, batch, batch.x)
        logits_adv = self.logits(student, batch, x_adv)
        p_adv = F.softmax(logits_adv, dim=1)
        p_nat = F.softmax(logits_nat, dim=1)

        is_true = F.one_hot(y, p_adv.shape[1]).bool()
        best_wrong = p_adv.masked_fill(is_true, -1.0).argmax(dim=1)  # argmax_{k != y} p_adv,k
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), best_wrong)

        kl_rows = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(dim=1)
        p_true = p_nat.gather(1, y[:, None]).squeeze(1)
        kl = (kl_rows * (1.0000001 - p_true)).mean()
        return bce + self.params["beta"] * kl, {"bce_adv": bce, "kl_weighted": kl}
