"""Who owns a running job, and what happens when its worker dies.

The broker alone cannot say: with ``acks_late`` a Redis message of a SIGKILLed worker stays unacknowledged
until the visibility timeout (days, so that long jobs are not redelivered while they run), and the
folder broker keeps unacknowledged messages only in the dead process's memory. So the database holds a
lease instead: the task that runs a job touches ``jobs.updated_at`` every ``heartbeat_s``, fenced by the
attempt number, and every worker's parent process runs a reaper that puts a running job whose row has not
been touched for ``stale_after_s`` back on the queue. The task that picks it up resumes from the job's
last checkpoint in the object store.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.db import make_engine, make_session_factory, session_scope
from service.jobs import IllegalTransition, add_event, transition
from service.models import Job, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("running", "evaluating")


class WorkerSettings(BaseSettings):
    """Worker-only knobs (env prefix ``RD_``), kept apart from the settings the API shares."""

    model_config = SettingsConfigDict(env_prefix="RD_", extra="ignore")

    heartbeat_s: float = Field(default=10.0, gt=0)  # RD_HEARTBEAT_S
    stale_after_s: float = Field(default=120.0, gt=0)  # RD_STALE_AFTER_S
    reap_every_s: float = Field(default=30.0, gt=0)  # RD_REAP_EVERY_S
    cancel_poll_s: float = Field(default=0.5, gt=0)  # RD_CANCEL_POLL_S
    # A job whose worker died this many times (OOM, segfault, a lost machine) fails instead of looping.
    max_attempts: int = Field(default=3, ge=1)  # RD_MAX_ATTEMPTS
    # Redis only: seconds before an unacknowledged message is handed out again (RD_VISIBILITY_TIMEOUT).
    # Unset keeps service.queue's value (longer than any job); the lease makes early redelivery harmless.
    visibility_timeout: int | None = Field(default=None, gt=0)


def is_stale(updated_at: datetime | None, stale_after_s: float, now: datetime | None = None) -> bool:
    if updated_at is None:
        return True
    return (now or utcnow()) - updated_at > timedelta(seconds=stale_after_s)


def touch(session: Any, job_id: str, attempt: int) -> bool:
    """Renew the lease of ``attempt``; False when another attempt took the job or it has finished."""
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status.in_(ACTIVE_STATUSES))
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def gave_up(attempts: int, max_attempts: int) -> str:
    return (
        f"the worker running this job was lost {attempts} time(s) (killed, out of memory or its machine "
        f"gone); giving up after {max_attempts} attempts (RD_MAX_ATTEMPTS)"
    )


def reap_once(session_factory: Any, enqueue: Any, stale_after_s: float, max_attempts: int = 3) -> list[str]:
    """Requeue (or, when a cancel was asked for, cancel) every active job whose lease ran out.

    The status move is a compare-and-set, so several workers' reapers never requeue a job twice; the
    message is sent only after the move is committed. Returns the ids of the requeued jobs.
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with session_scope(session_factory) as session:
        ids = list(
            session.scalars(sa.select(Job.id).where(Job.status.in_(ACTIVE_STATUSES), Job.updated_at < cutoff))
        )
    requeued: list[str] = []
    for job_id in ids:
        try:
            with session_scope(session_factory) as session:
                job = session.get(Job, job_id)
                if job is None or job.status not in ACTIVE_STATUSES:
                    continue
                if not is_stale(job.updated_at, stale_after_s):
                    continue
                message = (
                    f"worker lost: no heartbeat for over {stale_after_s:g} s during attempt {job.attempts}"
                )
                if job.cancel_requested:
                    transition(session, job, "cancelled", error=f"{message}; cancel was requested")
                    log.warning("job %s: %s; cancelled", job_id, message)
                    continue
                if job.attempts >= max_attempts:
                    transition(session, job, "failed", error=gave_up(job.attempts, max_attempts))
                    log.error("job %s: %s; failed after %d attempts", job_id, message, job.attempts)
                    continue
                add_event(
                    session,
                    job_id,
                    "warning",
                    {"message": f"{message}; requeued"},
                    dedupe_key=f"requeue:{job.attempts}",
                )
                transition(session, job, "queued")
        except IllegalTransition:
            continue  # another reaper, or the job itself, moved first
        try:
            enqueue(job_id)
        except Exception:
            log.exception("job %s: requeued in the database but the broker refused the message", job_id)
            continue
        log.warning("job %s: worker lost, requeued", job_id)
        requeued.append(job_id)
    return requeued


class Reaper(threading.Thread):
    """A daemon thread in the worker's parent process; it never touches torch."""

    def __init__(self, settings: Settings, worker_settings: WorkerSettings) -> None:
        super().__init__(name="rd-reaper", daemon=True)
        self.settings, self.worker_settings = settings, worker_settings
        self.stopping = threading.Event()
        self.engine: sa.Engine | None = None

    def run(self) -> None:
        from service.queue import CeleryQueue

        self.engine = make_engine(self.settings.database_url)
        factory = make_session_factory(self.engine)
        queue = CeleryQueue(self.settings)
        while not self.stopping.is_set():
            try:
                reap_once(
                    factory,
                    queue.enqueue,
                    self.worker_settings.stale_after_s,
                    self.worker_settings.max_attempts,
                )
            except Exception:
                log.exception("reaper pass failed; trying again in %g s", self.worker_settings.reap_every_s)
            self.stopping.wait(self.worker_settings.reap_every_s)
        self.engine.dispose()

    def stop(self) -> None:
        self.stopping.set()
