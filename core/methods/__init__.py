"""Training methods, one per file, by name: natural, SAT, TRADES, MART, ARD, IAD and RSLAD, and three
published after RSLAD: AdaAD (teacher inside the attack), ABSLD (per-class teacher temperatures for the
worst classes) and the IGDM add-on term (``igdm_weight`` of RSLAD and AdaAD, core.methods.igdm)."""

from __future__ import annotations

from typing import Any

from core.errors import ConfigError
from core.methods.absld import ABSLD
from core.methods.adaad import AdaAD
from core.methods.ard import ARD
from core.methods.base import Batch, Method
from core.methods.iad import IAD
from core.methods.mart import MART
from core.methods.natural import Natural
from core.methods.rslad import RSLAD
from core.methods.sat import SAT
from core.methods.trades import TRADES

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Natural, SAT, TRADES, MART, ARD, IAD, RSLAD, AdaAD, ABSLD)
}


def create_method(name: str, **overrides: Any) -> Method:
    """The method called ``name`` with its reference defaults, updated by ``overrides``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
    return cls(**overrides)


def list_methods() -> list[dict[str, Any]]:
    """``describe()`` of every method, for the CLI, the README and the API."""
    return [cls.describe() for cls in METHODS.values()]


__all__ = ["ABSLD", "ARD", "IAD", "MART", "METHODS", "RSLAD", "SAT", "TRADES", "AdaAD", "Batch", "Method",
           "Natural", "create_method", "list_methods"]
