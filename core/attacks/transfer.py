"""Transfer attack: examples crafted white-box on a surrogate model, then shown to the target model.

This is the paper's black-box setting (Table 5): PGD-20 or CW-inf on an adversarially trained ResNet-50
surrogate. It measures robustness without using the target's gradients at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.attacks.base import Attack
from core.attacks.cw import CWInf
from core.attacks.fgsm import FGSM
from core.attacks.pgd_attacks import PGDSAT, PGDTRADES
from core.errors import ConfigError

SOURCE_ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (PGDSAT, PGDTRADES, CWInf, FGSM)}


class Transfer(Attack):
    """``source_attack`` (default PGD-20, step 2/255) run on ``surrogate``; ``source_settings`` tune it."""

    name = "transfer"
    defaults: dict[str, Any] = {"source_attack": "pgd_sat", "source_settings": {}}

    def __init__(self, model: nn.Module, eps: float, *, surrogate: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, eps, **kwargs)
        if surrogate is None:
            raise ConfigError("transfer: needs a surrogate model (surrogate=...) to craft the examples on, "
                              "e.g. an adversarially trained ResNet-50")
        if surrogate is model:
            self.warnings.append("transfer: the surrogate is the evaluated model itself, so this is a "
                                 "white-box attack")
        source = SOURCE_ATTACKS[self.settings["source_attack"]]
        self.source = source(surrogate, eps, seed=self.seed, generator=self.generator,
                             **dict(self.settings["source_settings"]))
        self.surrogate = surrogate
        self.settings["source_settings"] = {k: v for k, v in self.source.settings.items() if k != "seed"}
        self.settings["surrogate"] = type(surrogate).__name__

    def validate(self) -> None:
        if self.settings["source_attack"] not in SOURCE_ATTACKS:
            raise ConfigError(f"transfer: unknown source_attack {self.settings['source_attack']!r}; "
                              f"known: {', '.join(SOURCE_ATTACKS)}")
        if not isinstance(self.settings["source_settings"], dict):
            raise ConfigError("transfer: source_settings must be a dict of the source attack's settings")

    def models(self) -> list[nn.Module]:
        return [self.model, self.surrogate]

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.source.perturb(x, y)
