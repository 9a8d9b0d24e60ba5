"""Attacks for robustness evaluation, one per file, and a registry by name.

``create_attack("pgd_sat", model, 8/255)`` builds one; ``ATTACKS`` maps every name to its class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.attacks.autoattack import AutoAttackStandard
from core.attacks.base import Attack, Clean
from core.attacks.cw import CWInf
from core.attacks.fgsm import FGSM
from core.attacks.pgd import pgd, random_start
from core.attacks.pgd_attacks import PGDSAT, PGDTRADES, PGDAttack
from core.attacks.square import Square
from core.attacks.transfer import Transfer
from core.errors import ConfigError

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (Clean, FGSM, PGDSAT, PGDTRADES, CWInf, AutoAttackStandard, Square, Transfer)
}


def create_attack(name: str, model: nn.Module, eps: float, **kwargs: Any) -> Attack:
    """The attack called ``name``; kwargs are its settings, ``seed``, ``generator`` (and ``surrogate``)."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[name](model, eps, **kwargs)


__all__ = ["ATTACKS", "Attack", "PGDAttack", "create_attack", "pgd", "random_start"]
