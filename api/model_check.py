"""Checking an uploaded model or dataset before it is kept, never in the API process itself.

An upload is untrusted and can be big: loading a model builds the whole network in memory, and a small
file can declare far more than it holds. Every check runs in its own child process with a time and a
memory limit (api.check_process), after the file's declared expansion was bounded from its headers
(core.archive_limits). The loaders themselves never unpickle code (core/teachers.py); the child is a
second wall, not the first. Messages name the file by the user's filename only (``name``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from api.check_process import IsolatedChecker
from core.archive_limits import ExpansionLimits
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class CheckedModel:
    """What loading the file taught us; the model itself is dropped at once."""

    format: str
    arch: str | None
    num_classes: int
    num_params: int
    normalize: dict[str, list[float]] | None
    probe: dict[str, Any]


@dataclass
class CheckedDataset:
    """What a valid ``.npz`` dataset holds (the numbers its row records)."""

    num_classes: int
    n_train: int
    n_test: int


def expansion_limits(settings: Settings) -> ExpansionLimits:
    """The bounds on what an upload may expand to, from the settings."""
    return ExpansionLimits.from_upload_limit(
        settings.max_upload_bytes, settings.max_expansion_ratio, settings.max_array_elements
    )


def make_checker(settings: Settings) -> IsolatedChecker:
    return IsolatedChecker(
        timeout_s=settings.check_timeout_s,
        memory_mb=settings.check_memory_mb,
        concurrency=settings.check_concurrency,
    )


def _checker(request: Request) -> IsolatedChecker:
    return request.app.state.checker


CheckerDep = Annotated[IsolatedChecker, Depends(_checker)]


def _check_model(
    path: Path,
    arch: str | None,
    num_classes: int | None,
    normalize: str | None,
    fmt: str,
    limits: ExpansionLimits | None,
) -> CheckedModel:
    """Load and probe the file on the CPU (blocking; runs in the checking process)."""
    from core.errors import ModelLoadError, UserError
    from core.teachers import load_model_file

    try:
        loaded = load_model_file(
            path, arch=arch, num_classes=num_classes, normalize=normalize, fmt=fmt, limits=limits
        )
    except UserError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # whatever a hostile or broken file trips over is still the file's problem
        log.warning("unexpected error loading an uploaded model", exc_info=True)
        raise ModelLoadError(f"the model file could not be loaded: {type(exc).__name__}: {exc}") from exc
    norm = None
    if loaded.normalize is not None:
        mean, std = loaded.normalize
        norm = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    checked = CheckedModel(
        format=loaded.format,
        arch=loaded.arch,
        num_classes=loaded.num_classes,
        num_params=loaded.num_params,
        normalize=norm,
        probe=dict(loaded.probe),
    )
    del loaded  # the checking process collects and trims after each check (api.check_process)
    return checked


def _check_dataset(path: Path, name: str, limits: ExpansionLimits | None) -> CheckedDataset:
    """Validate the ``.npz`` completely (blocking; runs in the checking process, numpy only)."""
    from core.errors import DataError, UserError
    from core.npz_check import check_npz

    try:
        summary = check_npz(path, limits, name)
    except (UserError, MemoryError):
        raise
    except Exception as exc:  # whatever a malformed file trips over is still the file's problem
        raise DataError(f"{name} is not a readable .npz dataset: {type(exc).__name__}: {exc}") from exc
    n_train = summary.n_train if summary.n_test else summary.n_train - summary.n_train // 5
    n_test = summary.n_test or summary.n_train // 5
    return CheckedDataset(num_classes=summary.num_classes, n_train=n_train, n_test=n_test)


async def check_model_isolated(
    checker: IsolatedChecker,
    settings: Settings,
    path: Path,
    arch: str | None,
    num_classes: int | None,
    normalize: str | None,
    fmt: str,
) -> CheckedModel:
    """``_check_model`` in a checking process; a limit or a crash there refuses the file (422)."""
    limits = expansion_limits(settings)
    return await checker.run(_check_model, path, arch, num_classes, normalize, fmt, limits)


async def check_dataset_isolated(
    checker: IsolatedChecker, settings: Settings, path: Path, name: str
) -> CheckedDataset:
    """``_check_dataset`` in a checking process: never in the API process, whatever the file declares."""
    limits = expansion_limits(settings)
    return await checker.run(_check_dataset, path, name, limits)
