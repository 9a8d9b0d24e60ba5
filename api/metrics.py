"""Prometheus metrics of the API: ``GET /metrics`` (text format), not behind an API key.

What one API process counts itself: requests by route template, method and status with their latency,
open event streams, and upload bytes by kind. The job and queue metrics come from the database and the
broker at scrape time (``service.metrics``), so every API process shows the same ones.

Settings: ``RD_METRICS=off`` removes the endpoint (the middleware too); ``RD_METRICS_PORT`` serves the
metrics on a port of their own (a small server thread of this process, on ``RD_METRICS_HOST``) instead of
on the API's port, so that they can stay off the public listener.

No label holds a tenant's data: a request is labelled with the template of the route it matched
(``/v1/jobs/{job_id}``, never the concrete path), a path that matched no route with ``unmatched``, and an
unusual method with ``other``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import JobMetricsCollector
from service.settings import Settings

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds to the response's first byte (an event stream's whole life would say nothing about latency).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UPLOAD_KINDS = {"/v1/teachers": "teacher", "/v1/datasets": "dataset"}


@dataclass
class _RequestUploads:
    """Bytes of the files one request uploaded; filled by ``note_upload`` wherever the route reads them."""

    sizes: list[int] = field(default_factory=list)


_uploads: ContextVar[_RequestUploads | None] = ContextVar("rd_request_uploads", default=None)


def note_upload(size: int) -> None:
    """Count an uploaded file's bytes towards the current request (api/uploads.py calls this)."""
    current = _uploads.get()
    if current is not None:
        current.sizes.append(size)


def route_label(scope: Scope) -> str:
    """The matched route's template, or ``unmatched``: never a concrete path (it may hold ids)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class ApiMetrics:
    """The API's registry: its own instruments and the job collector, served as Prometheus text."""

    def __init__(self, settings: Settings, app: FastAPI) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "rd_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "rd_http_request_duration_seconds",
            "Seconds from a request's arrival to its response's first byte",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.upload_bytes = Counter(
            "rd_upload_bytes", "Bytes of uploaded files received, by kind (teacher or dataset)",
            ["kind"], registry=self.registry,
        )
        self.uploads = Counter(
            "rd_uploads", "Uploaded files received, by kind (teacher or dataset)", ["kind"],
            registry=self.registry,
        )
        for kind in UPLOAD_KINDS.values():  # present from the start, so rate() sees the first upload
            self.upload_bytes.labels(kind)
            self.uploads.labels(kind)
        self.registry.register(_StreamsCollector(app))
        self.jobs = JobMetricsCollector(settings)
        self.registry.register(self.jobs)
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    def observe(self, route: str, method: str, status: int, seconds: float, uploads: list[int]) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)
        if uploads:
            kind = UPLOAD_KINDS.get(route, "other")
            self.upload_bytes.labels(kind).inc(sum(uploads))
            self.uploads.labels(kind).inc(len(uploads))

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the scraper asks for (Prometheus text or OpenMetrics), its type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    # ----- RD_METRICS_PORT -----------------------------------------------------------------------------

    def start_server(self) -> None:
        """Serve the registry on ``RD_METRICS_PORT`` from a daemon thread (it ends with this process)."""
        port = self.settings.metrics_port
        if port is None or self._server is not None:
            return
        from prometheus_client import start_http_server

        try:
            self._server, self._server_thread = start_http_server(
                port, addr=self.settings.metrics_host, registry=self.registry
            )
        except OSError as exc:  # e.g. a second API process on the same machine: the first one serves
            log.error("metrics: cannot listen on port %d (RD_METRICS_PORT): %s", port, exc)
            return
        log.info("metrics: serving on port %d", port)

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = self._server_thread = None
        self.jobs.close()


class _StreamsCollector:
    """Open event streams of this process, read from ``app.state.streams`` (api/streams.py) at scrape."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        slots = getattr(self.app.state, "streams", None)
        value = 0 if slots is None else slots.open_total
        return [GaugeMetricFamily("rd_event_streams_open", "Open server-sent event streams", value=value)]


class MetricsMiddleware:
    """Counts every HTTP request once its response has started (pure ASGI: streams pass straight through)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        first_byte: float | None = None
        status = 500
        uploads = _RequestUploads()
        token = _uploads.set(uploads)

        async def timed_send(message: Message) -> None:
            nonlocal first_byte, status
            if message["type"] == "http.response.start":
                first_byte = time.perf_counter()
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            _uploads.reset(token)
            if route_label(scope) != METRICS_PATH:
                seconds = (first_byte or time.perf_counter()) - started
                self.metrics.observe(route_label(scope), scope["method"], status, seconds, uploads.sizes)


def install(app: FastAPI, settings: Settings) -> ApiMetrics | None:
    """Add the middleware and ``GET /metrics`` (or, with RD_METRICS_PORT, nothing on the API's port)."""
    if not settings.metrics:
        app.state.metrics = None
        return None
    disable_created_metrics()  # no *_created series beside every counter: half the lines, nothing lost
    metrics = ApiMetrics(settings, app)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.metrics_port is None:

        async def serve_metrics(request: Request) -> Response:
            # The job collector queries the database: off the event loop.
            body, content_type = await run_in_threadpool(metrics.exposition, request.headers.get("accept"))
            return Response(body, headers={"Content-Type": content_type})

        app.add_api_route(METRICS_PATH, serve_metrics, methods=["GET"], include_in_schema=False)
    return metrics
