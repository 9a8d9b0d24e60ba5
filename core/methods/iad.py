"""IAD (Zhu et al.): introspective adversarial distillation, Table 1 fifth row."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import INITS, Batch, Method


class IAD(Method):
    """IAD: ARD, plus (after a warm-up) a self-distillation term used where the teacher is unreliable.

    inner:  x_adv = argmax  CE(S(x'), y)          PGD-10, step 2/255, uniform start, student in train mode
    outer:  min_S  alpha * t^2 * (1/B) sum_i KL(softmax(T(x)_i/t) || softmax(S(x_adv)_i/t))
                   + [epoch >= warmup_epochs] * alpha * (1/B) sum_i (1 - w_i) * KL(S(x)_i || S(x_adv)_i)
                   + (1 - alpha) * CE(S(x), y)
            w_i = P_T(y_i | x_adv_i) ** beta       (the teacher's reliability on the attacked input, no grad)

    This is the formula of the reference code (ZFancy/IAD, IAD-I.py) and of the design notes: the
    teacher term itself is not weighted by w (the IAD paper's equation weights it; the code does not).
    Unlike ARD, both KLs are batch means (sum over classes, mean over the batch), as in that code, and
    one alpha weights both KL terms. S(x) is not detached inside the second KL (reference). Epochs are
    0-based: with warmup_epochs = 60 the extra term starts on the 61st epoch, as in ``epoch >= 60``.
    When ``epochs`` is overridden and ``warmup_epochs`` is not, the warm-up scales with it like the
    milestones (60 of 200 -> 6 of 20). Defaults t = 1, alpha = 1, beta = 0.1; 200 epochs, milestones 100
    and 150 with the reference's schedule: its adjust_learning_rate(optimizer, epoch, lr) multiplies the
    base lr by 0.1 at each milestone, so the lr is 0.1, then 0.01 from epoch 100 on, never 0.001
    (lr_schedule='reference'; 'step' divides by 10 at every milestone).
    """

    name = "iad"
    needs_teacher = True
    attack_mode = "train"
    epoch_keys = ("warmup_epochs",)
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "uniform",
        "temperature": 1.0, "alpha": 1.0, "beta": 0.1, "warmup_epochs": 60,
        "epochs": 200, "milestones": (100, 150), "lr_schedule": "reference",
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init": INITS, "lr_schedule": ("reference", "step")}

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        return self.ascend(student, batch, self.ce_sum(batch.y))

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, alpha = self.params["temperature"], self.params["alpha"]
        logits_adv = self.logits(student, batch, x_adv)
        logits_nat = self.logits(student, batch, batch.x)
        p_teacher = F.softmax(batch.teacher_logits() / t, dim=1)
        kl_teacher = F.kl_div(F.log_softmax(logits_adv / t, dim=1), p_teacher, reduction="batchmean")
        ce = F.cross_entropy(logits_nat, batch.y)
        loss = alpha * t * t * kl_teacher + (1.0 - alpha) * ce
        terms = {"kl_teacher": kl_teacher, "ce_nat": ce}
        if epoch >= self.params["warmup_epochs"]:
            p_teacher_adv = F.softmax(batch.teacher_logits_on(x_adv), dim=1)
            w = p_teacher_adv.gather(1, batch.y[:, None]).squeeze(1) ** self.params["beta"]
            kl_rows = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                               reduction="none").sum(dim=1)
            kl_self = ((1.0 - w) * kl_rows).mean()
            loss = loss + alpha * kl_self
            terms.update({"kl_self": kl_self, "teacher_reliability": w.mean()})
        return loss, terms
