"""Square attack (Andriushchenko et al. 2020): the query-based black-box attack of the paper's Table 5.

It uses only the model's outputs, never its gradients, so it cannot be fooled by masked gradients; a
model much weaker under Square than under PGD is a sign of gradient masking. The implementation is
pyautoattack's, with AutoAttack's Linf settings (p_init 0.8, one restart, no schedule rescaling).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from core.attacks.autoattack import contained
from core.attacks.base import Attack
from core.errors import ConfigError


class Square(Attack):
    """Random square-shaped updates at the corners of the eps-ball, kept when the margin loss drops."""

    name = "square"
    defaults: dict[str, Any] = {"n_queries": 5000, "p_init": 0.8, "n_restarts": 1, "rescale_schedule": False}

    def validate(self) -> None:
        n_queries, n_restarts = self.settings["n_queries"], self.settings["n_restarts"]
        if not isinstance(n_queries, int) or n_queries < 1:
            raise ConfigError(f"square: n_queries must be a positive integer, got {n_queries!r}")
        if not isinstance(n_restarts, int) or n_restarts < 1:
            raise ConfigError(f"square: n_restarts must be a positive integer, got {n_restarts!r}")
        if not 0 < float(self.settings["p_init"]) <= 1:
            raise ConfigError(f"square: p_init must be in (0, 1], got {self.settings['p_init']!r}")

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack.square import SquareAttack

        settings = self.settings
        attack = SquareAttack(self.model, norm="Linf", n_queries=int(settings["n_queries"]), eps=self.eps,
                              p_init=float(settings["p_init"]), n_restarts=int(settings["n_restarts"]),
                              seed=self.int_seed(), verbose=False, targeted=False, loss="margin",
                              resc_schedule=bool(settings["rescale_schedule"]), device=x.device)
        with contained() as captured, torch.no_grad():
            x_adv = attack.perturb(x, y)
        for record in captured.records:
            message = f"square (pyautoattack): {record.getMessage()}"
            if record.levelno >= logging.WARNING and message not in self.warnings:
                self.warnings.append(message)
        return x_adv
