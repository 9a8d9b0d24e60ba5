"""What dead requests leave behind on the embedded stack (folder store): removed once old enough."""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.cleanup import CleanupSettings, cleanup_once
from service.storage import LocalStore


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_old_scratch_and_half_written_objects_go_young_ones_stay(tmp_path: Path) -> None:
    uploads, objects = tmp_path / "work" / "uploads", tmp_path / "objects"
    for name in ("upload-dead", "upload-live", "not-an-upload"):
        (uploads / name).mkdir(parents=True)
        (uploads / name / "x.npz").write_bytes(b"x")
        _age(uploads / name / "x.npz", 7200)
        _age(uploads / name, 7200)
    (uploads / "upload-live" / "x.npz").write_bytes(b"still being written")  # fresh mtime inside
    store = LocalStore(objects)
    (objects / "tenants" / "t").mkdir(parents=True)
    dead_tmp, live_tmp, kept = (objects / "tenants" / "t" / n for n in (".tmp-dead", ".tmp-live", "x.pt"))
    for path in (dead_tmp, live_tmp, kept):
        path.write_bytes(b"x")
    _age(dead_tmp, 7200)
    _age(kept, 7200)

    bounds = CleanupSettings(scratch_max_age_s=3600, incomplete_upload_max_age_s=3600)
    done = cleanup_once(uploads, store, bounds)
    assert done == {"scratch": 1, "uploads": 1}
    assert sorted(p.name for p in uploads.iterdir()) == ["not-an-upload", "upload-live"]
    assert sorted(p.name for p in (objects / "tenants" / "t").iterdir()) == [".tmp-live", "x.pt"]
