"""Who owns a running job, and what happens when its worker dies.

The broker alone cannot say: with ``acks_late`` a Redis message of a SIGKILLed worker stays unacknowledged
until the visibility timeout (days, so that long jobs are not redelivered while they run), and the
folder broker keeps unacknowledged messages only in the dead process's memory. So the database holds a
lease instead: the task that runs a job touches ``jobs.updated_at`` every ``heartbeat_s``, fenced by the
attempt number, and every worker's parent process runs a reaper that puts a running job whose row has not
been touched for ``stale_after_s`` back on the queue. The task that picks it up resumes from the job's
last checkpoint in the object store.

The database is the source of truth for queued jobs too: a broker that restarts without persistence
forgets its messages, so the reaper also sends again every job that has been ``queued`` for longer than
``requeue_queued_after_s`` without a message waiting on the broker (``jobs.enqueued_at`` is the marker: one
resend per period). A resend whose message was not lost after all makes a duplicate delivery, which the
task's claim absorbs at once (worker/tasks.py ``JobRun._claim``).

Two counters bound a job's attempts apart: ``lost_workers`` (the worker died under it: SIGKILL, out of
memory, a lost machine; not the job's fault, so the bound is generous) and ``failed_attempts`` (the attempt
ended in the job's own unexpected error and was retried from its checkpoint). The error of a job that
gives up says which bound it reached.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.db import make_engine, make_session_factory, session_scope
from service.jobs import IllegalTransition, add_event, transition
from service.models import ROW_ID, Job, utcnow
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
    # A job whose own unexpected error ended this many attempts fails (a UserError fails at once).
    max_attempts: int = Field(default=3, ge=1)  # RD_MAX_ATTEMPTS
    # A job whose worker died under it this many times (killed, OOM, a lost machine) fails instead of
    # looping; generous, because a worker's death is usually not the job's fault.
    max_lost_workers: int = Field(default=10, ge=1)  # RD_MAX_LOST_WORKERS
    # A job queued this long with no message waiting on the broker is sent again (RD_REQUEUE_QUEUED_AFTER_S).
    requeue_queued_after_s: float = Field(default=120.0, gt=0)
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


def lost_too_often(lost_workers: int, max_lost_workers: int) -> str:
    return (
        f"the worker running this job was lost {lost_workers} time(s) (killed, out of memory or its machine "
        f"gone); giving up after {max_lost_workers} lost workers (RD_MAX_LOST_WORKERS)"
    )


def failed_too_often(failed_attempts: int, error: str) -> str:
    return (
        f"{error} (the job's own error ended {failed_attempts} attempt(s); giving up after "
        f"{failed_attempts} (RD_MAX_ATTEMPTS))"
    )


def lose_worker(session: Any, job: Job, max_lost_workers: int, message: str) -> str:
    """The attempt on ``job`` (running or evaluating) lost its worker: count it, then requeue, cancel
    (a cancel was asked for) or fail (too many lost workers). Returns the new status. The caller sends
    a message for a requeued job after committing; the status moves are compare-and-set."""
    lost = _count(session, job.id, lost_workers=job.lost_workers + 1)
    if job.cancel_requested:
        transition(session, job, "cancelled", error=f"{message}; cancel was requested")
    elif lost >= max_lost_workers:
        transition(session, job, "failed", error=lost_too_often(lost, max_lost_workers))
    else:
        note = f"{message}; requeued (lost worker {lost} of {max_lost_workers})"
        _requeue(session, job, note, dedupe_key=f"requeue:{job.attempts}")
    return job.status


def retry_or_fail(session: Any, job_id: str, attempt: int, error: str, max_attempts: int) -> str:
    """Attempt ``attempt`` ended in the job's own unexpected error (not a UserError: a store or database
    hiccup, a crash in the code): requeue the job to resume from its checkpoint until ``max_attempts``
    attempts have ended so, then fail it saying so. Returns "retrying" (the caller sends the message
    after committing), "failed", or "lost lease" when another attempt owns the job."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.is_terminal or job.attempts != attempt:
        return "lost lease"
    failed = _count(session, job_id, failed_attempts=job.failed_attempts + 1)
    if job.cancel_requested or failed >= max_attempts:
        final = error if job.cancel_requested else failed_too_often(failed, error)
        transition(session, job, "failed", error=final)
        log.info("job %s: failed: %s", job_id, final)
        return "failed"
    note = f"attempt {attempt} failed ({error}); retry {failed} of {max_attempts - 1}"
    _requeue(session, job, note, dedupe_key=f"retry:{attempt}")
    return "retrying"


def _count(session: Any, job_id: str, **counter: int) -> int:
    """Store one of the job's attempt counters (``lost_workers=n`` or ``failed_attempts=n``); returns n."""
    session.execute(
        sa.update(Job).where(Job.id == job_id).values(**counter).execution_options(synchronize_session=False)
    )
    return next(iter(counter.values()))


def _requeue(session: Any, job: Job, note: str, dedupe_key: str) -> None:
    """Back to ``queued`` with a warning saying why; the caller sends the message after committing."""
    add_event(session, job.id, "warning", {"message": note}, dedupe_key=dedupe_key)
    transition(session, job, "queued")
    mark_enqueued(session, job.id)


def mark_enqueued(session: Any, job_id: str) -> None:
    session.execute(
        sa.update(Job)
        .where(Job.id == job_id)
        .values(enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def reap_once(
    session_factory: Any, enqueue: Any, stale_after_s: float, max_lost_workers: int = 10
) -> list[str]:
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
                job = session.get(Job, job_id, with_for_update=True)
                if job is None or job.status not in ACTIVE_STATUSES:
                    continue
                if not is_stale(job.updated_at, stale_after_s):
                    continue
                message = (
                    f"worker lost: no heartbeat for over {stale_after_s:g} s during attempt {job.attempts}"
                )
                status = lose_worker(session, job, max_lost_workers, message)
                if status != "queued":
                    log.warning("job %s: %s; %s", job_id, message, status)
                    continue
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


def resend_queued(
    session_factory: Any, enqueue: Any, waiting: Any, after_s: float, limit: int = 1000
) -> list[str]:
    """Send again every job queued for over ``after_s`` whose message is not waiting on the broker.

    ``waiting()`` gives the job ids with a message on the broker's queue, or None when the broker cannot
    be listed (then every job past the bound is sent again; the claim absorbs duplicates). Moving
    ``enqueued_at`` is a compare-and-set, so several reapers send one message, not one each, and a job
    is sent at most once per ``after_s``. Returns the ids sent.
    """
    cutoff = utcnow() - timedelta(seconds=after_s)
    last_sent = sa.func.coalesce(Job.enqueued_at, Job.created_at)
    with session_scope(session_factory) as session:
        ids = list(
            session.scalars(
                sa.select(Job.id)
                .where(Job.status == "queued", last_sent < cutoff)
                .order_by(Job.created_at)
                .limit(limit)
            )
        )
    if not ids:
        return []
    pending = waiting()
    sent: list[str] = []
    for job_id in ids:
        if pending is not None and job_id in pending:
            continue
        with session_scope(session_factory) as session:
            moved = session.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.status == "queued", last_sent < cutoff)
                .values(enqueued_at=utcnow())
                .execution_options(synchronize_session=False)
            ).rowcount
        if moved != 1:
            continue
        try:
            enqueue(job_id)
        except Exception:
            log.exception("job %s: queued without a message, and the broker refused a new one", job_id)
            continue
        log.warning("job %s: queued for over %g s with no message on the broker; sent again", job_id, after_s)
        sent.append(job_id)
    return sent


def clean_work_dir(session_factory: Any, work_dir: Path, stale_after_s: float) -> list[str]:
    """Remove the scratch folders (``<work>/<job id>``) that no live attempt on this machine uses.

    A SIGKILLed worker leaves its job's folder behind (teacher, dataset, checkpoints). A folder is kept
    while its job is running or evaluating under a fresh lease (a sibling worker sharing the folder), and
    while it is younger than a lease period (an attempt that has just claimed its job and is filling it).
    Other names in the folder (the API's ``uploads``) are not the worker's and are left alone.
    """
    if not work_dir.is_dir():
        return []
    cutoff = time.time() - stale_after_s
    candidates: list[Path] = []
    for folder in work_dir.iterdir():
        try:
            if ROW_ID.match(folder.name) and folder.is_dir() and folder.stat().st_mtime < cutoff:
                candidates.append(folder)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    with session_scope(session_factory) as session:
        rows = session.execute(
            sa.select(Job.id, Job.status, Job.updated_at).where(Job.id.in_([f.name for f in candidates]))
        ).all()
    live = {r.id for r in rows if r.status in ACTIVE_STATUSES and not is_stale(r.updated_at, stale_after_s)}
    removed = []
    for folder in candidates:
        if folder.name not in live:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        log.warning("removed %d scratch folder(s) of attempts that died: %s", len(removed), removed)
    return removed


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
                ws = self.worker_settings
                reap_once(factory, queue.enqueue, ws.stale_after_s, ws.max_lost_workers)
                resend_queued(factory, queue.enqueue, queue.waiting_ids, ws.requeue_queued_after_s)
                if self.settings.work_dir is not None:
                    clean_work_dir(factory, Path(self.settings.work_dir), ws.stale_after_s)
            except Exception:
                log.exception("reaper pass failed; trying again in %g s", self.worker_settings.reap_every_s)
            self.stopping.wait(self.worker_settings.reap_every_s)
        self.engine.dispose()

    def stop(self) -> None:
        self.stopping.set()
