"""Natural (standard) training: the non-robust baseline of Tables 3 and 4."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.methods.base import Batch, Method


class Natural(Method):
    """Natural training on clean images, no attack.

    min_S  CE(S(x), y)

    100 epochs, learning rate / 10 at epochs 75 and 90 (paper section 4.1).
    """

    name = "natural"
    needs_teacher = False
    defaults: ClassVar[dict[str, Any]] = {"epochs": 100, "milestones": (75, 90)}

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(self.logits(student, batch, batch.x), batch.y), {}
