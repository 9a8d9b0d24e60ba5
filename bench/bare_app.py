"""The baseline for bench/service_overhead.py: a bare FastAPI app with one GET endpoint that returns a
constant JSON body, the job document the real API returned (``BENCH_BARE_BODY``), so both send the same
bytes. The endpoint is a plain ``def`` like the real ``GET /v1/jobs/{id}``, so it too runs in the
thread pool; what it lacks is the API key lookup, the database session and the pydantic response model.

    BENCH_BARE_BODY='{"id": "x"}' uvicorn --factory bench.bare_app:create_app
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import FastAPI


def create_app() -> FastAPI:
    body: dict[str, Any] = json.loads(os.environ.get("BENCH_BARE_BODY") or '{"status": "queued"}')
    app = FastAPI(title="bare baseline")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return body

    return app
