"""FGSM (Goodfellow et al.): one signed-gradient step of size eps on the cross entropy, no random start."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.attacks.base import Attack
from core.attacks.pgd import pgd


class FGSM(Attack):
    """The weakest white-box attack of the suite; a model that resists it but not PGD is normal."""

    name = "fgsm"
    random = False

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def loss(logits: torch.Tensor, _x_adv: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y, reduction="sum")

        return pgd(self.model, x, loss, eps=self.eps, step_size=self.eps, steps=1, init="none")
