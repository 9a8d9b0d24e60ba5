"""The FastAPI application. Serve it with ``uvicorn --factory api.app:create_app``.

Nothing heavy is imported here: torch and the core library load only when an upload or a job needs them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import core
from api import docs, errors, metrics, model_check
from api.routes import datasets, health, jobs, teachers, ui
from api.streams import JobWatch, StreamSlots
from api.uploads import BodySizeLimit
from core.errors import UserError
from service.auth import ensure_dev_key
from service.cleanup import periodic_cleanup
from service.db import make_engine, make_session_factory, upgrade_to_head
from service.jobs import IllegalTransition
from service.paths import scrub_paths, server_roots
from service.polling import StatusPoller
from service.queue import CeleryQueue
from service.settings import Settings, get_settings
from service.storage import ObjectNotFound, open_store

log = logging.getLogger("api")


def _prepare_embedded(app: FastAPI) -> None:
    """SQLite default: bring the schema up to date and make sure someone can log in."""
    settings: Settings = app.state.settings
    upgrade_to_head(settings.database_url)
    with app.state.session_factory() as session:
        key = ensure_dev_key(session, settings.var_dir)
    if key:
        path = settings.var_dir / "dev-api-key"
        print(f"Created an API key for tenant 'dev': {key}  (also written to {path})", flush=True)


def _location(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")] or [str(p) for p in loc]
    return ".".join(parts)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with a one-line ``detail`` naming every bad field, plus the structured list."""
    items = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{_location(tuple(e['loc']))}: {e['msg']}" for e in items) or "invalid request"
    return JSONResponse(errors.error_body(detail, items), status_code=422)


async def _user_error(request: Request, exc: UserError) -> JSONResponse:
    detail = scrub_paths(str(exc), server_roots(request.app.state.settings))
    return JSONResponse({"detail": detail}, status_code=422)


async def _conflict(request: Request, exc: IllegalTransition) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _missing_object(request: Request, exc: ObjectNotFound) -> JSONResponse:
    return JSONResponse({"detail": f"stored file {exc} is missing"}, status_code=404)


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Callable[[str], None] | None = None,
    revoke: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app for ``settings`` (default: the environment). ``enqueue``/``revoke`` replace the
    Celery calls, e.g. with a recorder in tests that run no broker; they also live on ``app.state``."""
    settings = settings or get_settings()
    engine = make_engine(
        settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
    )
    poller = StatusPoller(settings.database_url, pool_size=settings.db_poll_pool_size)
    queue = CeleryQueue(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes and dependencies run in anyio's thread pool: no more threads than connections, so
        # under load requests queue for a thread instead of timing out on the connection pool.
        connections = settings.db_pool_size + settings.db_max_overflow
        to_thread.current_default_thread_limiter().total_tokens = connections
        app.state.db_gate = asyncio.Semaphore(connections)  # see api.deps.get_session
        if settings.is_sqlite:
            await run_in_threadpool(_prepare_embedded, app)
        # Scratch folders and incomplete uploads of requests that died with an earlier process.
        cleaner = asyncio.create_task(periodic_cleanup(settings.upload_dir, app.state.store))
        if app.state.metrics is not None:
            app.state.metrics.start_server()  # RD_METRICS_PORT only
        yield
        cleaner.cancel()
        if app.state.metrics is not None:
            app.state.metrics.stop_server()
        app.state.checker.shutdown()
        await poller.close()
        engine.dispose()

    app = FastAPI(
        title="Robust distillation service",
        summary="Upload a robust teacher, get a small robust student trained with RSLAD and its report.",
        version=core.__version__,
        lifespan=lifespan,
        docs_url=None,  # api.docs serves /docs and /redoc from local files
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.checker = model_check.make_checker(settings)
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.poller = poller
    app.state.store = open_store(settings)
    app.state.queue = queue
    app.state.enqueue = enqueue or queue.enqueue
    app.state.revoke = revoke or queue.revoke
    app.state.broker_ping = queue.ping
    app.state.sse_poll_seconds = 1.0
    app.state.streams = StreamSlots(per_key=settings.max_streams_per_key, total=settings.max_streams)
    app.state.job_watch = JobWatch(poller, lambda: app.state.sse_poll_seconds)

    app.add_middleware(BodySizeLimit, max_upload_bytes=settings.max_upload_bytes)
    metrics.install(app, settings)  # GET /metrics and the request counts (outermost: sees every request)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(UserError, _user_error)  # type: ignore[arg-type]
    app.add_exception_handler(IllegalTransition, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(ObjectNotFound, _missing_object)  # type: ignore[arg-type]
    errors.install(app)  # HTTPExceptions in the same shape; the OpenAPI document declares it
    docs.install(app)
    for module in (health, teachers, datasets, jobs, ui):
        app.include_router(module.router)
    return app
