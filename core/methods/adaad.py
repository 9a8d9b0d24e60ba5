"""AdaAD (Huang et al., CVPR 2023): adaptive adversarial distillation, eqs. (4)-(5) of the paper."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import INITS, Batch, Method, full_precision
from core.methods.igdm import IGDM_DEFAULTS, with_igdm


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-element sum_k p_T,k (log p_T,k - log p_S,k), shape (B, C), differentiable in both inputs."""
    log_t = F.log_softmax(teacher_logits, dim=1)
    return log_t.exp() * (log_t - F.log_softmax(student_logits, dim=1))


class AdaAD(Method):
    """AdaAD: the adversarial example maximises the teacher-student divergence, teacher in the loop.

    inner:  x' = argmax_{||x' - x||_inf <= eps}  sum_i KL(softmax(T(x')) || softmax(S(x')))
    outer:  min_S  alpha * KL(T(x') || S(x')) + (1 - alpha) * KL(T(x) || S(x))

    Unlike RSLAD, the teacher is evaluated on the moving iterate and differentiated through its input at
    every PGD step (eval mode; its weights get no gradient): x' is where the student departs most from
    the teacher, not merely where it is wrong. That costs a teacher forward and backward per step.
    As in the official code (boyellow/AdaAD, ``adaad_inner_loss`` and ``main.py``): start x + 0.001 *
    N(0, 1), 10 steps, the student in eval mode for the attack, the inner KL summed; in the outer loss
    the teacher's labels T(x'), T(x) carry no gradient, the student runs on x before x' (BatchNorm
    statistics see them in that order) and S(x) is always computed, also when alpha = 1.
    kl_reduction 'reference' is ``nn.KLDivLoss()``'s mean over all B x C elements (the CIFAR-10 code);
    'batchmean' divides by B only (the CIFAR-100 code: set it for 100-class data).

    Where the code differs from the paper, this follows the code: alpha = 1 (``--AdaAD_alpha``
    default; the outer loss is the adversarial KL alone), eps 8/255 with steps of 2/255 (the training
    command in its README; ``main.py``'s argparse defaults, 16/255 and 4/255, are the paper's larger
    search radius of section 3.4), 200 epochs, learning rate 0.1 / 10 at 100 and 150, momentum 0.9,
    weight decay 5e-4, batch 128.

    ``igdm_weight`` > 0 adds the IGDM term (core.methods.igdm) with its epoch ramp.
    """

    name = "adaad"
    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "normal",
        "alpha": 1.0, "kl_reduction": "reference",
        **IGDM_DEFAULTS,
        "epochs": 200, "milestones": (100, 150), "weight_decay": 5e-4,
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init": INITS,
                                                     "kl_reduction": ("reference", "batchmean")}
    epoch_keys: ClassVar[tuple[str, ...]] = ("igdm_ramp_epochs",)

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        def kl_to_teacher_here(logits: torch.Tensor, x_cur: torch.Tensor) -> torch.Tensor:
            return kl_teacher_student(batch.teacher_logits_grad(x_cur), full_precision(logits)).sum()

        return self.ascend(student, batch, kl_to_teacher_here)

    def kl(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        elements = kl_teacher_student(teacher_logits.detach(), student_logits)
        return self.reduce_kl(elements)

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_nat = self.logits(student, batch, batch.x)
        logits_adv = self.logits(student, batch, x_adv)
        kl_adv = self.kl(batch.teacher_logits_on(x_adv), logits_adv)
        kl_nat = self.kl(batch.teacher_logits(), logits_nat)
        alpha = self.params["alpha"]
        loss = alpha * kl_adv + (1.0 - alpha) * kl_nat
        terms = {"kl_adv": kl_adv, "kl_nat": kl_nat}
        return with_igdm(loss, terms, self.params, student, batch, x_adv, epoch=epoch, logits=self.logits)
