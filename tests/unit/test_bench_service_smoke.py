"""bench/service_overhead.py runs end to end at a tiny size on its embedded stack (SQLite, folder broker,
folder store, a real uvicorn API, the bare app, a Celery worker and the load-generator process) and prints
its result lines. Nothing here is about speed: no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_service_overhead_runs_and_prints_results(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "bench.service_overhead", "--embedded",
        "--clients", "3", "--requests-per-client", "3", "--paced-requests", "2", "--poll-interval", "0.1",
        "--rounds", "1", "--upload-mb", "1", "--teacher-arch", "tiny_cnn", "--streams", "9",
        "--stream-seconds", "1",
        "--log-dir", str(tmp_path / "logs"), "--json", str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted((tmp_path / "logs").glob("*.log")))  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"

    text = proc.stdout
    tail = text[text.index("== service overhead") :]
    for line in (
        "ours: p50",
        "bare: p50",
        "ratio ours/bare",
        "-- 9 open event streams (2 keys",
        "GET /v1/teachers       without streams: p50",
        "one more on a full key: HTTP 429",
        "-- upload 1 MB",
        "dataset (junk",
        "teacher tiny_cnn",
        "-- targets",
        "poll p99 < 25 ms",
        "peak RSS growth < 64 MB",
    ):
        assert line in tail, f"{line!r} missing from:\n{tail}"
    assert "Celery worker" in tail

    result = json.loads(out.read_text())
    for mode in ("paced", "saturate"):
        for target in ("ours", "bare"):
            numbers = result["polling"][mode][target]
            assert numbers["requests"] > 0 and numbers["errors"] == 0, numbers
    assert result["polling"]["status"] == "cancelled"
    for phase in ("without", "with"):
        for load in ("status_poll", "normal_request"):
            numbers = result["streams"][phase][load]
            assert numbers["requests"] > 0 and numbers["errors"] == 0, (phase, load, numbers)
    assert result["streams"]["with"]["stream_statuses"] == {"200": 9}
    assert result["uploads"]["dataset"]["status"] == 422
    assert result["uploads"]["teacher"]["status"] == 201
    assert not [note for note in result["notes"] if "worker" in note], result["notes"]
