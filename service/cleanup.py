"""What dead requests leave behind, removed at the API's start-up and periodically.

A request killed mid-upload (SIGKILL of the API, an OOM kill, a lost machine) never runs its ``finally``:
its private scratch folder (``<work>/uploads/upload-*``, up to ``RD_MAX_UPLOAD_BYTES``) stays on disk and
the parts of its multipart put stay in the bucket, invisible to listings but billed. Every API process
removes both once they are older than a bound, at start-up and every ``RD_CLEANUP_EVERY_S``:

- scratch folders whose newest entry is older than ``RD_SCRATCH_MAX_AGE_S`` (default 1 h). Several API
  processes may share the folder, so age is the test of "dead": a live request writes its file
  continuously and its checks are time-limited far below the bound.
- incomplete uploads begun over ``RD_INCOMPLETE_UPLOAD_MAX_AGE_S`` ago (default 1 h): aborted on the store
  itself (S3 ``ListMultipartUploads`` + ``AbortMultipartUpload``, which SeaweedFS, MinIO and AWS all
  implement), or the ``.tmp-*`` files of the folder store. On AWS a bucket lifecycle rule
  (``AbortIncompleteMultipartUpload``) does the same and may be used instead; this needs no bucket rights
  beyond the service's own.

A worker cleans its own scratch (``<work>/<job id>``) in its reaper (worker/lease.py ``clean_work_dir``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

UPLOAD_SCRATCH_PREFIX = "upload-"  # api/uploads.py names each request's folder so


class CleanupSettings(BaseSettings):
    """The API's clean-up bounds (env prefix ``RD_``)."""

    model_config = SettingsConfigDict(env_prefix="RD_", extra="ignore")

    scratch_max_age_s: float = Field(default=3600.0, gt=0)  # RD_SCRATCH_MAX_AGE_S
    incomplete_upload_max_age_s: float = Field(default=3600.0, gt=0)  # RD_INCOMPLETE_UPLOAD_MAX_AGE_S
    cleanup_every_s: float = Field(default=900.0, gt=0)  # RD_CLEANUP_EVERY_S


def newest_mtime(path: Path) -> float:
    """The latest modification time of a folder or anything in it (a live writer keeps it fresh)."""
    newest = path.stat().st_mtime
    for child in path.rglob("*"):
        try:
            newest = max(newest, child.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest


def clean_upload_scratch(upload_dir: Path, max_age_s: float) -> int:
    """Remove the scratch folders of upload requests untouched for ``max_age_s``; returns how many."""
    if not upload_dir.is_dir():
        return 0
    cutoff, removed = time.time() - max_age_s, 0
    for folder in upload_dir.glob(f"{UPLOAD_SCRATCH_PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or newest_mtime(folder) >= cutoff:
                continue
        except FileNotFoundError:  # its request finished meanwhile
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def cleanup_once(upload_dir: Path, store: Any, bounds: CleanupSettings) -> dict[str, int]:
    """One pass; a store that cannot be reached is logged and tried again next time."""
    done = {"scratch": clean_upload_scratch(upload_dir, bounds.scratch_max_age_s), "uploads": 0}
    try:
        done["uploads"] = store.abort_incomplete(bounds.incomplete_upload_max_age_s)
    except Exception:
        log.warning("could not abort the store's incomplete uploads; trying again later", exc_info=True)
    if any(done.values()):
        log.warning(
            "removed %d dead request scratch folder(s), aborted %d incomplete upload(s)",
            done["scratch"],
            done["uploads"],
        )
    return done


async def periodic_cleanup(upload_dir: Path, store: Any, bounds: CleanupSettings | None = None) -> None:
    """Run ``cleanup_once`` now (start-up) and every ``cleanup_every_s`` until cancelled."""
    bounds = bounds or CleanupSettings()
    while True:
        try:
            await asyncio.to_thread(cleanup_once, upload_dir, store, bounds)
        except Exception:
            log.exception("clean-up pass failed")
        await asyncio.sleep(bounds.cleanup_every_s)
