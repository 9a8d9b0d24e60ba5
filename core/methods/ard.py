"""ARD (Goldblum et al.): adversarially robust distillation, Table 1 fourth row."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import INITS, Batch, Method


class ARD(Method):
    """ARD: match the teacher's tempered clean prediction on the student's adversarial example.

    inner:  x_adv = argmax  CE(S(x'), y)                   PGD-10, step 2/255, uniform start, hard labels
    outer:  min_S  alpha * t^2 * KL(softmax(T(x)/t) || softmax(S(x_adv)/t)) + (1 - alpha) * CE(S(x), y)

    Reference (goldblum/AdversarialRobustnessDistillation) details kept on purpose:
    - the student stays in train mode during the attack (its batch-norm statistics see the PGD
      iterates), unlike every other method here;
    - the KL is nn.KLDivLoss's default element-wise mean, i.e. divided by B * C (batch x classes),
      not the batch mean; with t = 30 the t^2 = 900 factor compensates (kl_reduction='reference';
      'batchmean' divides by B only, Hinton's scale, which the 'auto' recipe picks for short runs);
    - S(x) is computed even when alpha = 1 (its CE weight is then 0), because that train-mode forward
      also updates batch-norm running statistics in the reference.
    The reference's uniform start is not clipped to [0, 1] before the first step; the shared pgd clips
    it (a difference only at the image borders, for the first gradient).
    - the learning rate: the reference's adjust_learning_rate(optimizer, epoch, lr) is called with the
      base lr every epoch and sets lr * 0.1 at each milestone, so the lr is 0.1 until epoch 100 and 0.01
      from then on, never 0.001 (lr_schedule='reference'; 'step' divides by 10 at every milestone).
    Defaults t = 30, alpha = 1; 200 epochs, milestones 100 and 150 (SGD lr 0.1, momentum 0.9, weight decay
    2e-4, batch 128; the reference's CIFAR-100 runs use batch 256: pass --batch-size 256 to match them).
    """

    name = "ard"
    needs_teacher = True
    attack_mode = "train"
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "uniform",
        "temperature": 30.0, "alpha": 1.0, "kl_reduction": "reference",
        "epochs": 200, "milestones": (100, 150), "lr_schedule": "reference",
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "init": INITS, "kl_reduction": ("reference", "batchmean"), "lr_schedule": ("reference", "step"),
    }

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        return self.ascend(student, batch, self.ce_sum(batch.y))

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, alpha = self.params["temperature"], self.params["alpha"]
        p_teacher = F.softmax(batch.teacher_logits() / t, dim=1)
        logits_adv = self.logits(student, batch, x_adv)
        logits_nat = self.logits(student, batch, batch.x)
        kl_elements = F.kl_div(F.log_softmax(logits_adv / t, dim=1), p_teacher, reduction="none")
        kl = self.reduce_kl(kl_elements)
        ce = F.cross_entropy(logits_nat, batch.y)
        return alpha * t * t * kl + (1.0 - alpha) * ce, {"kl_adv": kl, "ce_nat": ce}
