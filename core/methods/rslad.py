"""RSLAD (Zi et al., ICCV 2021): robust soft label adversarial distillation, eq. (3) of the paper."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import ConfigError
from core.methods.base import INITS, Batch, Method, full_precision
from core.methods.igdm import IGDM_DEFAULTS, with_igdm

LOG_EPS = 1e-5  # the reference adds this inside log p_T in the outer KLs
SOURCES = ("natural", "adversarial")


class RSLAD(Method):
    """RSLAD: the teacher's robust soft labels replace the hard label in every loss term.

    eq. (3), with p_T = softmax(T(x)) the robust soft label of the clean input (no hard label anywhere):
    inner:  x_adv = argmax_{||x' - x||_inf <= eps}  sum_i sum_k KL(p_T || softmax(S(x')))
    outer:  min_S  adv_weight * KL(p_T || S(x_adv)) + nat_weight * KL(p_T || S(x))   (5/6 and 1/6)

    (The paper writes KL(S(.) || T(x)) in PyTorch's input/target order; the divergence computed is
    sum_k p_T,k * (log p_T,k - log p_S,k).) As in the reference (zibojia/RSLAD): start x + 0.001 * N(0, 1),
    10 steps of 2/255, the student in eval mode for the attack; the inner KL is summed; each outer KL
    uses log(p_T + 1e-5) and, with kl_reduction='reference', a mean over all B x C elements (= batch-mean
    KL / C); 'batchmean' divides by B only. kl_scale multiplies both outer KLs: the reference uses 10 on
    CIFAR-100, and the pipeline sets it for 100-class data. temperature stays 1 (section 3.2); other
    values divide both logits and multiply the outer KLs by t^2 (Hinton's convention).
    300 epochs, learning rate / 10 at 215, 260, 285 (section 4.1).

    Ablation knobs (section 4.3, Table 7; appendix C, Table 10):
    - soft_labels: 'natural' p_T(x) or 'adversarial' p_T(x_adv) for every term; soft_labels_inner /
      _adv / _nat override it per term. 'adversarial' in the inner maximisation means the teacher on
      the current PGD iterate, re-evaluated at every step and treated as a fixed label (no gradient
      through the teacher); in the outer terms it is the teacher on the final x_adv.
    - label_source: 'teacher' (RSL), 'non_robust_teacher' (NSL: the same computation; it only records
      that the teacher given was naturally trained) or 'smooth' (SSL: (1 - smoothing) * onehot(y) +
      smoothing / C, no teacher needed; the paper gives no value, smoothing=0.1 is Szegedy et al.'s).

    ``igdm_weight`` > 0 adds the IGDM term (core.methods.igdm) with its epoch ramp; it needs the teacher.
    """

    name = "rslad"
    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "normal",
        "adv_weight": 5 / 6, "nat_weight": 1 / 6, "temperature": 1.0,
        "kl_reduction": "reference", "kl_scale": 1.0,
        "soft_labels": "natural", "soft_labels_inner": None, "soft_labels_adv": None, "soft_labels_nat": None,
        "label_source": "teacher", "smoothing": 0.1,
        **IGDM_DEFAULTS,
        "epochs": 300, "milestones": (215, 260, 285),
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "init": INITS,
        "kl_reduction": ("reference", "batchmean"),
        "soft_labels": SOURCES,
        "soft_labels_inner": (None, *SOURCES),
        "soft_labels_adv": (None, *SOURCES),
        "soft_labels_nat": (None, *SOURCES),
        "label_source": ("teacher", "non_robust_teacher", "smooth"),
    }
    epoch_keys: ClassVar[tuple[str, ...]] = ("igdm_ramp_epochs",)

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.needs_teacher = self.params["label_source"] != "smooth" or self.params["igdm_weight"] > 0

    def _check_params(self, params: dict[str, Any]) -> None:
        super()._check_params(params)
        if params["label_source"] == "smooth":
            terms = ("inner", "adv", "nat")
            adversarial = [term for term in terms if self._source(params, term) == "adversarial"]
            if adversarial:
                raise ConfigError(f"method 'rslad': label_source='smooth' has no teacher, so soft labels "
                                   f"cannot be 'adversarial' (terms: {', '.join(adversarial)})")

    @staticmethod
    def _source(params: dict[str, Any], term: str) -> str:
        return params[f"soft_labels_{term}"] or params["soft_labels"]

    def label_for(self, batch: Batch, term: str, x_adv: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The target distribution of one loss term ('inner', 'adv' or 'nat'); never carries gradient."""
        if self.params["label_source"] == "smooth":
            s, num_classes = self.params["smoothing"], logits.shape[1]
            return (1.0 - s) * F.one_hot(batch.y, num_classes).to(logits.dtype) + s / num_classes
        if self._source(self.params, term) == "adversarial":
            logits = batch.teacher_logits_on(x_adv)
        else:
            logits = batch.teacher_logits()
        return F.softmax(logits / self.params["temperature"], dim=1)

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        t = self.params["temperature"]

        def kl_to_soft_labels(logits: torch.Tensor, x_cur: torch.Tensor) -> torch.Tensor:
            logits = full_precision(logits)
            target = self.label_for(batch, "inner", x_cur.detach(), logits)
            return F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="sum")

        return self.ascend(student, batch, kl_to_soft_labels)

    def kl(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The reference's outer KL: sum p_T (log(p_T + 1e-5) - log p_S), reduced and scaled."""
        t = self.params["temperature"]
        elements = target * (torch.log(target + LOG_EPS) - F.log_softmax(logits / t, dim=1))
        return self.params["kl_scale"] * t * t * self.reduce_kl(elements)

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_adv = self.logits(student, batch, x_adv)
        logits_nat = self.logits(student, batch, batch.x)
        kl_adv = self.kl(self.label_for(batch, "adv", x_adv, logits_adv), logits_adv)
        kl_nat = self.kl(self.label_for(batch, "nat", x_adv, logits_nat), logits_nat)
        loss = self.params["adv_weight"] * kl_adv + self.params["nat_weight"] * kl_nat
        terms = {"kl_adv": kl_adv, "kl_nat": kl_nat}
        return with_igdm(loss, terms, self.params, student, batch, x_adv, epoch=epoch, logits=self.logits)
