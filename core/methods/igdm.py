"""IGDM (Lee et al., ICLR 2024): the indirect gradient distillation module, an add-on term.

Matching the input gradients of teacher and student directly needs double back-propagation. IGDM
matches them indirectly, through the symmetric difference of the logits along the adversarial
perturbation d = x_adv - x, scaled by b = igdm_beta and g = igdm_gamma (a first-order Taylor
expansion of both models around x):

    L_IGDM = KL( softmax(T(x + b d) - T(x - g d)) || softmax(S(x + b d) - S(x - g d)) )

batch-mean KL, no hard labels, the teacher without gradient, the student in train mode. It is added to
the host method's loss with a weight that ramps up linearly with the epoch:

    loss = L_host + igdm_weight * (epoch + 1) / igdm_ramp_epochs * L_IGDM      (epoch 0-based)

As in the published code (``alpha * (epoch / 200) * loss`` with a 1-based epoch): the ramp divides by a
fixed 200 epochs whatever the run's length, so with RSLAD's 300 epochs the weight keeps growing to
1.5 x igdm_weight; b = g = 1; x - g d is not clipped to [0, 1]. The code's alpha is 20
for RSLAD and AdaAD on CIFAR; ``igdm_weight`` defaults to 0 here (off), so that the host method is
unchanged unless the term is asked for. ``igdm_ramp_epochs`` scales with a run's ``epochs`` like
the learning-rate milestones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# The parameters a host method adds to its defaults to offer the term.
IGDM_DEFAULTS: dict[str, Any] = {"igdm_weight": 0.0, "igdm_ramp_epochs": 200, "igdm_beta": 1.0,
                                 "igdm_gamma": 1.0}

LogitsFn = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def igdm_ramp(weight: float, ramp_epochs: int, epoch: int) -> float:
    """The term's weight in (0-based) ``epoch``: weight x (epoch + 1) / ramp_epochs, not capped."""
    return weight * (epoch + 1) / max(int(ramp_epochs), 1)


def igdm_divergence(student_plus: torch.Tensor, student_minus: torch.Tensor, teacher_plus: torch.Tensor,
                    teacher_minus: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(softmax(T+ - T-) || softmax(S+ - S-)); the teacher side carries no gradient."""
    target = F.softmax((teacher_plus - teacher_minus).detach(), dim=1)
    log_student = F.log_softmax(student_plus - student_minus, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean")


def igdm_term(params: dict[str, Any], student: nn.Module, batch: Any, x_adv: torch.Tensor, *, epoch: int,
              logits: LogitsFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The weighted IGDM term of a host method with ``params``, and its raw value for the log; None when
    ``igdm_weight`` is 0 (nothing is computed, so the host's loss stays bit for bit what it was).

    ``logits(student, batch, x)`` is the host's student forward (its autocast, fp32 out).
    """
    weight = igdm_ramp(params["igdm_weight"], params["igdm_ramp_epochs"], epoch)
    if weight == 0.0:
        return None
    x = batch.x
    delta = (x_adv - x).detach()
    x_plus, x_minus = x + params["igdm_beta"] * delta, x - params["igdm_gamma"] * delta
    divergence = igdm_divergence(logits(student, batch, x_plus), logits(student, batch, x_minus),
                                 batch.teacher_logits_on(x_plus), batch.teacher_logits_on(x_minus))
    return weight * divergence, {"igdm": divergence, "igdm_weight": torch.tensor(weight)}


def with_igdm(loss: torch.Tensor, terms: dict[str, torch.Tensor], params: dict[str, Any], student: nn.Module,
              batch: Any, x_adv: torch.Tensor, *, epoch: int,
              logits: LogitsFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A host method's (loss, terms) with the IGDM term added (unchanged when ``igdm_weight`` is 0)."""
    extra = igdm_term(params, student, batch, x_adv, epoch=epoch, logits=logits)
    if extra is None:
        return loss, terms
    return loss + extra[0], {**terms, **extra[1]}
