"""CW-inf: PGD on the Carlini-Wagner margin loss with confidence kappa 50, as in the IAD code and the
PGD attack of Madry et al.'s CIFAR-10 challenge code (the RSLAD repository has no evaluation code to
follow).

The margin loss sidesteps the softmax saturation of cross entropy, so it still pushes on points the
model classifies very confidently; it is a cheap check against gradient masking by large logits.
"""

from __future__ import annotations

from typing import Any

import torch

from core.attacks.pgd_attacks import PGDAttack
from core.errors import ConfigError


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Summed ``min(max_{j != y} z_j - z_y, kappa)``: what the attacker maximises.

    This is IAD's ``-clamp(z_y - max_other + kappa, min=0)`` up to a constant: the gain stops once an
    example is misclassified with confidence kappa, while examples still correct always get a gradient.
    """
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    margin = others.max(dim=1).values - true_logit
    return margin.clamp(max=kappa).sum()


class CWInf(PGDAttack):
    """20 steps of 2/255 from a uniform start (the paper's 20 PGD steps; IAD's code uses 30), kappa 50
    (IAD's and Madry et al.'s margin)."""

    name = "cw_inf"
    defaults: dict[str, Any] = {"steps": 20, "step_size": 2 / 255, "init": "uniform", "kappa": 50.0}

    def validate(self) -> None:
        super().validate()
        if not float(self.settings["kappa"]) >= 0:
            raise ConfigError(f"cw_inf: kappa must be >= 0, got {self.settings['kappa']!r}")

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cw_margin_loss(logits, y, float(self.settings["kappa"]))
