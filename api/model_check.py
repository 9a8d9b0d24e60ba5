"""Loading and probing an uploaded model file, in a separate process.

An uploaded model is untrusted and can be big: loading it builds the whole network in memory (a 200 MB
state dict costs the loading process about twice that). Doing it in a spawned child keeps the API
process small and unharmed: its memory does not grow with the model, and a file that crashes the
loader (or exhausts its memory) takes down the child, not the API. The child is reused between uploads.
The loaders themselves never unpickle code (core/teachers.py); the child is a second wall, not the first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _check_model(
    path: Path, arch: str | None, num_classes: int | None, normalize: str | None, fmt: str
) -> CheckedModel:
    """Load and probe the file on the CPU (blocking; runs in the checking process)."""
    from core.errors import ModelLoadError, UserError
    from core.teachers import load_model_file

    try:
        loaded = load_model_file(path, arch=arch, num_classes=num_classes, normalize=normalize, fmt=fmt)
    except UserError:
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
    del loaded
    gc.collect()
    return checked


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def shutdown() -> None:
    """Stop the checking process (the app's shutdown calls this)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


async def check_model_isolated(
    path: Path, arch: str | None, num_classes: int | None, normalize: str | None, fmt: str
) -> CheckedModel:
    """``_check_model`` in the checking process; a crash there refuses the file (and a fresh process
    serves the next upload)."""
    from core.errors import ModelLoadError

    try:
        return await asyncio.wrap_future(
            _executor().submit(_check_model, path, arch, num_classes, normalize, fmt)
        )
    except BrokenProcessPool:
        log.warning("the model-checking process died on an upload; starting a new one for the next")
        shutdown()
        raise ModelLoadError(
            "loading the model file crashed the checking process (out of memory or a malformed file)"
        ) from None
