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


@dataclass(frozen=True)
class AccuracyCheck:
    """Where the checking process measures the teacher: a builtin dataset's validation split."""

    dataset: str
    data_root: str
    claimed_accuracy: float | None = None


# The validation split a default job carves (val_size 1000, seed 0): the job-start check measures the
# same kind of images, on the job's own split.
UPLOAD_CHECK_VAL_SIZE = 1000


def _measure_accuracy(loaded: Any, check: AccuracyCheck) -> dict[str, Any]:
    """The teacher's clean accuracy on the dataset's validation split and the guardrails' verdict
    (core.guardrails.check_teacher), recorded, never raised: the job-start check is what fails a job."""
    from core.data import load_dataset
    from core.errors import UserError
    from core.guardrails import check_teacher

    try:
        data = load_dataset(check.dataset, check.data_root, val_size=UPLOAD_CHECK_VAL_SIZE, seed=0)
    except UserError:
        return {"dataset": check.dataset, "measured": False, "note": "the dataset could not be read here"}
    verdict = check_teacher(
        loaded.model, data.val, data.num_classes, "cpu", normalize=loaded.normalize,
        claimed_accuracy=check.claimed_accuracy,
    )
    record = {"dataset": check.dataset, "measured": True, **verdict.record}
    warnings = list(verdict.warnings)
    if verdict.failure:
        warnings.insert(0, f"a job on this teacher will fail its teacher check: {verdict.failure}")
    record["warnings"] = warnings
    return record


def _check_model(
    path: Path,
    arch: str | None,
    num_classes: int | None,
    normalize: str | None,
    fmt: str,
    limits: ExpansionLimits | None,
    accuracy_on: AccuracyCheck | None = None,
) -> CheckedModel:
    """Load and probe the file on the CPU (blocking; runs in the checking process); with
    ``accuracy_on``, also measure its clean accuracy (``probe["accuracy_check"]``)."""
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
    probe = dict(loaded.probe)
    if accuracy_on is not None:
        probe["accuracy_check"] = _measure_accuracy(loaded, accuracy_on)
    checked = CheckedModel(
        format=loaded.format,
        arch=loaded.arch,
        num_classes=loaded.num_classes,
        num_params=loaded.num_params,
        normalize=norm,
        probe=probe,
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
    accuracy_on: AccuracyCheck | None = None,
) -> CheckedModel:
    """``_check_model`` in a checking process; a limit or a crash there refuses the file (422)."""
    limits = expansion_limits(settings)
    return await checker.run(_check_model, path, arch, num_classes, normalize, fmt, limits, accuracy_on)


async def check_dataset_isolated(
    checker: IsolatedChecker, settings: Settings, path: Path, name: str
) -> CheckedDataset:
    """``_check_dataset`` in a checking process: never in the API process, whatever the file declares."""
    limits = expansion_limits(settings)
    return await checker.run(_check_dataset, path, name, limits)
