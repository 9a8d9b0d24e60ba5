"""Architectures by name, so configs, the CLI and the teacher loader can say "resnet18" and get a model.

A factory is any callable ``factory(num_classes, **kwargs) -> nn.Module``. Keyword arguments are checked
against the factory's signature before it is called, so a typo in a config becomes a ``ConfigError`` that
names the accepted keywords instead of a ``TypeError`` from deep inside a constructor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from core.errors import ConfigError

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: make ``factory(num_classes, **kwargs)`` available as ``create_model(name, ...)``."""
    key = name.strip().lower()
    if not key:
        raise ValueError("model name must be non-empty")

    def decorate(factory: F) -> F:
        if key in _REGISTRY and _REGISTRY[key] is not factory:
            raise ValueError(f"model name {key!r} is already registered")
        _REGISTRY[key] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def _accepted_kwargs(factory: ModelFactory) -> tuple[set[str], bool]:
    """Keyword names the factory takes besides num_classes, and whether it takes **kwargs."""
    params = inspect.signature(factory).parameters.values()
    names = {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "num_classes"
    }
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    return names, open_ended


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the architecture registered as ``name`` with a ``num_classes``-way head.

    Unknown names, unknown keyword arguments and bad values raise ``ConfigError`` with a message that
    says what would have been accepted.
    """
    key = str(name).strip().lower()
    factory = _REGISTRY.get(key)
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    accepted, open_ended = _accepted_kwargs(factory)
    unknown = sorted(set(kwargs) - accepted)
    if unknown and not open_ended:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(
            f"model {key!r} does not take argument(s) {', '.join(unknown)}; accepted: {allowed}"
        )
    try:
        return factory(num_classes=num_classes, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {key!r} with {kwargs!r}: {exc}") from exc
