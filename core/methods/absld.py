"""ABSLD (Zhao et al., NeurIPS 2024): anti-bias soft label distillation for robust fairness."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import ConfigError
from core.methods.base import INITS, Batch, Method, full_precision
from core.methods.rslad import LOG_EPS


class ABSLD(Method):
    """ABSLD: RSLAD with a teacher temperature per class, re-balanced each epoch toward the worst classes.

    With tau_y the temperature of the sample's true class y, p_T^a = softmax(T(x) / tau^a_y) and
    p_T^n = softmax(T(x) / tau^n_y):
    inner:  x_adv = argmax_{||x' - x||_inf <= eps}  sum_i KL(p_T^a || softmax(S(x')))
    outer:  min_S  adv_weight * KL(p_T^a || S(x_adv)) + nat_weight * KL(p_T^n || S(x))   (5/6 and 1/6)
    after each epoch, with L_c the summed cross-entropy CE(S(x_adv), y) (resp. CE(S(x), y)) of class c
    over the epoch and r the temperature rate:
            tau_c <- clip(tau_c - r * (L_c - mean_c L) / max_c |L_c - mean_c L|, temp_min, temp_max)
    A class the student finds hard (high loss) gets a lower temperature, i.e. a sharper, more confident
    soft label, and an easy class a softer one: the error of the worst classes is pushed down.

    As in the official code (zhaoshiji123/ABSLD, ``resnet18_absld_cifar10.py``): every tau starts at 1,
    r = 0.1 and is divided by 10 at each learning-rate milestone before that epoch's update, tau in
    [0.5, 5]; the losses are summed (not averaged) per class, from the student's train-mode logits of
    the outer loss; the outer KLs are RSLAD's (log(p_T + 1e-5), mean over all B x C elements, no
    t^2 factor; kl_reduction 'batchmean' divides by B only, as for RSLAD); start x + 0.001 * N(0, 1),
    10 steps of 2/255 in an 8/255 box, the student in eval mode for the attack; 300 epochs, lr 0.1 / 10
    at 215, 260, 285, momentum 0.9, weight decay 2e-4.
    One departure from the code: there both rescaled teacher logits are views of one tensor, divided
    in place, so each sample's logits end up divided by tau^a_y * tau^n_y in both terms; this keeps the
    two temperatures apart, as the paper's equations do. An update with all class losses equal (the
    code divides 0 by 0) leaves the temperatures unchanged.

    The temperatures are this method's state: ``state_dict`` holds them (the checkpoint restores them
    on resume, and each epoch's history records them).
    """

    name = "absld"
    needs_teacher = True
    defaults: ClassVar[dict[str, Any]] = {
        "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "normal",
        "adv_weight": 5 / 6, "nat_weight": 1 / 6, "kl_reduction": "reference",
        "temp_rate": 0.1, "temp_min": 0.5, "temp_max": 5.0,
        "epochs": 300, "milestones": (215, 260, 285),
    }
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {"init": INITS,
                                                     "kl_reduction": ("reference", "batchmean")}

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.temperature_adv: torch.Tensor | None = None  # (C,), created at the first batch
        self.temperature_nat: torch.Tensor | None = None
        self._loss_adv: torch.Tensor | None = None        # per-class loss sums of the current epoch
        self._loss_nat: torch.Tensor | None = None

    def _check_params(self, params: dict[str, Any]) -> None:
        super()._check_params(params)
        if not params["temp_min"] <= 1.0 <= params["temp_max"]:
            raise ConfigError(f"method 'absld': temperatures start at 1, so temp_min <= 1 <= temp_max is "
                              f"needed, got [{params['temp_min']}, {params['temp_max']}]")

    # ----- per-class temperatures ------------------------------------------------------------------------

    def _ensure_state(self, num_classes: int, device: torch.device) -> None:
        if self.temperature_adv is None:
            self.temperature_adv = torch.ones(num_classes, dtype=torch.float64)
            self.temperature_nat = torch.ones(num_classes, dtype=torch.float64)
        if self.temperature_adv.numel() != num_classes:
            raise ConfigError(f"method 'absld': {self.temperature_adv.numel()} class temperatures, but the "
                              f"model has {num_classes} outputs")
        if self._loss_adv is None:  # on the batch's device: no host sync per step
            self._loss_adv = torch.zeros(num_classes, device=device)
            self._loss_nat = torch.zeros(num_classes, device=device)

    def soft_labels(self, batch: Batch, temperatures: torch.Tensor) -> torch.Tensor:
        """softmax(T(x) / tau_y) per sample, no gradient."""
        logits = batch.teacher_logits()
        tau = temperatures.to(device=logits.device, dtype=logits.dtype)[batch.y]
        return F.softmax(logits / tau[:, None], dim=1)

    def rate(self, epoch: int) -> float:
        """The temperature step after (0-based) ``epoch``: temp_rate / 10 per milestone reached."""
        passed = sum(1 for m in self.params["milestones"] if m <= epoch + 1)
        return self.params["temp_rate"] * 0.1 ** passed

    def end_epoch(self, epoch: int) -> None:
        if self._loss_adv is None:
            return
        rate = self.rate(epoch)
        loss_adv, loss_nat = self._loss_adv.double().cpu(), self._loss_nat.double().cpu()
        self.temperature_adv = self._rebalanced(self.temperature_adv, loss_adv, rate)
        self.temperature_nat = self._rebalanced(self.temperature_nat, loss_nat, rate)
        self._loss_adv = self._loss_nat = None

    def _rebalanced(self, temperatures: torch.Tensor, class_loss: torch.Tensor, rate: float) -> torch.Tensor:
        gap = class_loss - class_loss.mean()
        scale = gap.abs().max()
        if scale == 0:
            return temperatures
        return (temperatures - rate * gap / scale).clamp(self.params["temp_min"], self.params["temp_max"])

    def state_dict(self) -> dict[str, Any]:
        if self.temperature_adv is None:
            return {}
        return {"temperature_adv": self.temperature_adv.tolist(),
                "temperature_nat": self.temperature_nat.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loss_adv = self._loss_nat = None
        if not state:
            self.temperature_adv = self.temperature_nat = None
            return
        self.temperature_adv = torch.tensor(state["temperature_adv"], dtype=torch.float64)
        self.temperature_nat = torch.tensor(state["temperature_nat"], dtype=torch.float64)

    # ----- the two losses --------------------------------------------------------------------------------

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor:
        teacher_logits = batch.teacher_logits()
        self._ensure_state(teacher_logits.shape[1], teacher_logits.device)
        target = self.soft_labels(batch, self.temperature_adv)

        def kl_to_soft_labels(logits: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(full_precision(logits), dim=1), target, reduction="sum")

        return self.ascend(student, batch, kl_to_soft_labels)

    def kl(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """RSLAD's reference KL: sum p_T (log(p_T + 1e-5) - log p_S) / (B x C), or / B ('batchmean')."""
        elements = target * (torch.log(target + LOG_EPS) - F.log_softmax(logits, dim=1))
        return self.reduce_kl(elements)

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_logits = batch.teacher_logits()
        self._ensure_state(teacher_logits.shape[1], teacher_logits.device)
        logits_adv = self.logits(student, batch, x_adv)
        logits_nat = self.logits(student, batch, batch.x)
        kl_adv = self.kl(self.soft_labels(batch, self.temperature_adv), logits_adv)
        kl_nat = self.kl(self.soft_labels(batch, self.temperature_nat), logits_nat)
        with torch.no_grad():  # the per-class statistics of the temperature update
            for sums, logits in ((self._loss_adv, logits_adv), (self._loss_nat, logits_nat)):
                per_sample = F.cross_entropy(logits.float(), batch.y, reduction="none")
                sums.index_add_(0, batch.y, per_sample)
        loss = self.params["adv_weight"] * kl_adv + self.params["nat_weight"] * kl_nat
        return loss, {"kl_adv": kl_adv, "kl_nat": kl_nat}
