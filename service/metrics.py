"""Job and queue metrics read from the database and the broker when Prometheus scrapes.

Jobs live in worker processes and there may be several API processes, so nothing here is counted in
memory: every number is derived from the ``jobs`` table (and the broker's queue) at scrape time. Every API
process therefore reports the same values, they survive restarts, and no worker has to reach Prometheus
for them. Counters derived this way (``rd_job_attempts_total``...) sum over the jobs still in the table: a
deleted tenant takes its jobs' counts with it, which Prometheus reads as a counter reset.

Each source answers within ``RD_METRICS_TIMEOUT_S`` (a connect timeout, a statement timeout on
PostgreSQL, a socket timeout on Redis) or is left out of that scrape, with ``rd_metrics_source_up{source}``
saying so; a slow database never stalls the scrape. No label names a tenant, job, teacher or key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from service.models import JOB_STATUSES, TERMINAL_STATUSES, Job, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("running", "evaluating")
# Seconds: a job takes minutes to hours; it may wait in the queue from seconds to hours.
DURATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)
QUEUE_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


def _seconds_between(dialect: str, start: Any, end: Any) -> Any:
    """``end - start`` in seconds as a SQL expression, on PostgreSQL and SQLite alike."""
    if dialect == "sqlite":
        return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0
    return sa.func.extract("epoch", end - start)


def _histogram_columns(seconds: Any, buckets: Sequence[float]) -> list[Any]:
    """count, sum, then one cumulative count per bucket bound: one aggregate row makes a histogram."""
    columns = [sa.func.count(), sa.func.coalesce(sa.func.sum(seconds), 0.0)]
    columns += [sa.func.sum(sa.case((seconds <= bound, 1), else_=0)) for bound in buckets]
    return columns


def _histogram(row: Sequence[Any], buckets: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    count, total, *cumulative = row
    points = [(_bound(b), float(c or 0)) for b, c in zip(buckets, cumulative, strict=True)]
    return points + [("+Inf", float(count or 0))], float(total or 0.0)


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(float(value))


class JobMetricsCollector:
    """A Prometheus collector for the job table and the broker's queue (register it on a registry)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout_s = settings.metrics_timeout_s
        self._engine: sa.Engine | None = None

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: registering must not query the database.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "rd_metrics_source_up",
            "1 when the source answered this scrape within RD_METRICS_TIMEOUT_S, else 0",
            labels=["source"],
        )
        try:
            job_metrics = self._job_metrics()
            up.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics: the job table did not answer: %s", type(exc).__name__)
            job_metrics = []
            up.add_metric(["database"], 0)
        yield from job_metrics
        try:
            depth = self.queue_depth()
            up.add_metric(["broker"], 1)
        except Exception as exc:
            log.warning("metrics: the broker did not answer: %s", type(exc).__name__)
            depth = None
            up.add_metric(["broker"], 0)
        if depth is not None:
            help_text = "Messages waiting on the broker's job queue (not yet delivered)"
            yield GaugeMetricFamily("rd_queue_depth", help_text, value=depth)
        yield up

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # ----- the database ------------------------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        """One connection of its own, with timeouts: scrapes never take the request pool's connections."""
        if self._engine is None:
            from service.db import make_engine

            kwargs: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": self.timeout_s}
            if not self.settings.is_sqlite:
                kwargs["connect_args"] = {
                    "connect_timeout": max(1, math.ceil(self.timeout_s)),
                    "options": f"-c statement_timeout={int(self.timeout_s * 1000)}",
                }
            self._engine = make_engine(self.settings.database_url, **kwargs)
        return self._engine

    def _job_metrics(self) -> list[Metric]:
        engine = self.engine
        dialect = engine.dialect.name
        now = utcnow()
        with engine.connect() as conn:
            by_status = dict(conn.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status)).all())
            totals = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(Job.attempts), 0),
                    sa.func.coalesce(sa.func.sum(Job.lost_workers), 0),
                    sa.func.coalesce(sa.func.sum(Job.failed_attempts), 0),
                )
            ).one()
            run_seconds = _seconds_between(dialect, Job.started_at, Job.finished_at)
            durations = conn.execute(
                sa.select(Job.status, *_histogram_columns(run_seconds, DURATION_BUCKETS))
                .where(Job.status.in_(TERMINAL_STATUSES), Job.started_at.is_not(None),
                       Job.finished_at.is_not(None))
                .group_by(Job.status)
            ).all()
            wait_seconds = _seconds_between(dialect, Job.created_at, Job.started_at)
            waits = conn.execute(
                sa.select(*_histogram_columns(wait_seconds, QUEUE_WAIT_BUCKETS))
                .where(Job.started_at.is_not(None))
            ).one()
            oldest_queued_at = conn.execute(
                sa.select(sa.func.min(Job.created_at)).where(Job.status == "queued")
            ).scalar()
            oldest_beat = conn.execute(
                sa.select(sa.func.min(Job.updated_at)).where(Job.status.in_(ACTIVE_STATUSES))
            ).scalar()

        jobs = GaugeMetricFamily("rd_jobs", "Jobs in the database by status", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], int(by_status.get(status, 0)))
        attempts, lost, failed = (int(v) for v in totals)
        duration = HistogramMetricFamily(
            "rd_job_duration_seconds",
            "From a job's first start to its end (requeues and retries included), by final status",
            labels=["status"],
        )
        for status, *row in durations:
            buckets, total = _histogram(row, DURATION_BUCKETS)
            duration.add_metric([status], buckets, total)
        wait_buckets, wait_total = _histogram(waits, QUEUE_WAIT_BUCKETS)
        wait = HistogramMetricFamily(
            "rd_job_queue_wait_seconds", "From a job's creation to its first start (jobs that started)"
        )
        wait.add_metric([], wait_buckets, wait_total)
        return [
            jobs,
            CounterMetricFamily("rd_job_attempts", "Attempts started (deliveries that claimed a job)",
                                value=attempts),
            CounterMetricFamily("rd_job_lost_workers", "Attempts lost with their worker (killed, OOM, gone)",
                                value=lost),
            CounterMetricFamily("rd_job_failed_attempts",
                                "Attempts ended by the job's own unexpected error (retried or final)",
                                value=failed),
            duration,
            wait,
            GaugeMetricFamily("rd_job_oldest_queued_seconds", "Age of the oldest queued job (0 when none)",
                              value=_age(now, oldest_queued_at)),
            GaugeMetricFamily(
                "rd_job_oldest_heartbeat_seconds",
                "Time since the stalest running job's last heartbeat (its lease; 0 when none runs)",
                value=_age(now, oldest_beat),
            ),
        ]

    # ----- the broker ----------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Messages waiting on the job queue: Redis LLEN, or the folder broker's message files."""
        url, queue = self.settings.broker_url, self.settings.queue
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(
                url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            try:
                return int(client.llen(queue))
            finally:
                client.close()
        if url.startswith("filesystem://"):
            return sum(1 for _ in (self.settings.broker_dir / "queue").glob(f"*.{queue}.msg"))
        raise ValueError("this broker's queue cannot be measured")


def _age(now: datetime, then: datetime | None) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:  # raw SQLite values from an aggregate bypass the column type
        from datetime import timezone

        then = then.replace(tzinfo=timezone.utc)
    return max(0.0, (now - then).total_seconds())
