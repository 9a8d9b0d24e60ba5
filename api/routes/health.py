"""Liveness and readiness for orchestrators: /healthz says the process runs, /readyz that it can serve."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def _check(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:  # a readiness probe reports every failure, whatever its kind
        return f"error: {type(exc).__name__}: {str(exc)[:300]}"
    return "ok"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state

    def database() -> None:
        with state.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    checks = {
        "database": await run_in_threadpool(_check, database),
        "broker": await run_in_threadpool(_check, state.broker_ping),
        "store": await run_in_threadpool(_check, state.store.ping),
    }
    ok = all(v == "ok" for v in checks.values())
    body = Readiness(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
