"""The job state machine and the writers for events, progress, metrics and artifacts.

Shared by the API and the worker so both obey the same rules. Every function works inside the caller's
transaction and never commits: the caller decides when a group of writes becomes visible.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import TERMINAL_STATUSES, Artifact, Job, JobEvent, JobMetric, utcnow

# queued -> running -> evaluating -> succeeded | failed | cancelled. A job whose worker died goes back
# to queued when its task is redelivered (the task then moves it to running again). queued -> failed
# covers a job that could not be put on the queue.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"evaluating", "succeeded", "failed", "cancelled", "queued"}),
    "evaluating": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class IllegalTransition(ValueError):
    """The status machine does not allow this move (or another process moved the job first)."""


def _insert(session: Session, model: type) -> Any:
    """INSERT with ON CONFLICT support for the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported backends
        raise NotImplementedError(f"no upsert for database dialect {dialect!r}")
    return insert(model)


def add_event(
    session: Session,
    job_id: str,
    type: str,
    payload: dict[str, Any] | None = None,
    dedupe_key: str | None = None,
) -> int | None:
    """Append an event. With a ``dedupe_key`` a second write of the same key is silently dropped
    (a redelivered task replaying an epoch). Returns the new event id, or None when dropped."""
    stmt = (
        _insert(session, JobEvent)
        .values(job_id=job_id, type=type, payload=payload or {}, dedupe_key=dedupe_key, created_at=utcnow())
        .on_conflict_do_nothing()
        .returning(JobEvent.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def transition(session: Session, job: Job, new_status: str, *, error: str | None = None) -> Job:
    """Move ``job`` to ``new_status`` and write a ``status`` event.

    The UPDATE only applies when the row still has the status we saw, so two processes racing (a cancel
    against a finishing worker) cannot both win; the loser gets ``IllegalTransition``.
    """
    old = job.status
    if new_status not in TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"job {job.id} cannot go from {old} to {new_status}")
    now = utcnow()
    values: dict[str, Any] = {"status": new_status, "updated_at": now}
    if error is not None:
        values["error"] = error[:10000]
    if new_status == "running":
        values["attempts"] = Job.attempts + 1
        values["finished_at"] = None
        if job.started_at is None:
            values["started_at"] = now
    if new_status in TERMINAL_STATUSES:
        values["finished_at"] = now
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job.id, Job.status == old)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    if result.rowcount != 1:
        raise IllegalTransition(f"job {job.id} is {job.status} now, not {old}; cannot go to {new_status}")
    payload: dict[str, Any] = {"status": new_status, "from": old}
    if error is not None:
        payload["error"] = error[:2000]
    add_event(session, job.id, "status", payload)
    return job


def start_attempt(session: Session, job: Job) -> bool:
    """What the worker calls first: move the job to running, whatever a redelivery left behind.

    Returns False when the job must not run (already finished, or cancelled while queued).
    """
    session.refresh(job)
    if job.is_terminal:
        return False
    if job.cancel_requested:
        if job.status in ("running", "evaluating"):
            transition(session, job, "queued")
        transition(session, job, "cancelled")
        return False
    if job.status in ("running", "evaluating"):
        add_event(session, job.id, "warning", {"message": f"redelivered after attempt {job.attempts}"})
        transition(session, job, "queued")
    transition(session, job, "running")
    return True


def request_cancel(session: Session, job: Job) -> Job:
    """Ask a job to stop: a queued job is cancelled at once, a running one when its worker next checks."""
    session.refresh(job)
    if job.is_terminal:
        raise IllegalTransition(f"job {job.id} already {job.status}")
    session.execute(
        sa.update(Job)
        .where(Job.id == job.id)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    if job.status == "queued":
        try:
            return transition(session, job, "cancelled")
        except IllegalTransition:
            # A worker picked it up meanwhile: the flag stops it at its next check.
            if job.is_terminal:
                raise
    add_event(session, job.id, "cancel_requested", {}, dedupe_key="cancel_requested")
    return job


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """A fresh read of the flag (the worker's ``should_stop``)."""
    return bool(session.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id)))


def set_progress(
    session: Session, job_id: str, progress: dict[str, Any] | None = None, **fields: Any
) -> None:
    """Update the job's progress {epoch, epochs, step, steps, fraction, eta_s}; keys not given keep their
    value (the API sets ``epochs`` at creation). Not an event: it changes every step and only the latest
    value matters."""
    data = {
        **(session.scalar(sa.select(Job.progress).where(Job.id == job_id)) or {}),
        **(progress or {}),
        **fields,
    }
    data.pop("type", None)
    session.execute(
        sa.update(Job)
        .where(Job.id == job_id)
        .values(progress=data, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def upsert_metrics(session: Session, job_id: str, epoch: int, metrics: dict[str, Any]) -> None:
    """Store one epoch's metrics (replacing a replayed epoch) and make them the job's latest."""
    stmt = _insert(session, JobMetric).values(job_id=job_id, epoch=epoch, metrics=metrics)
    stmt = stmt.on_conflict_do_update(
        index_elements=[JobMetric.job_id, JobMetric.epoch], set_={"metrics": stmt.excluded.metrics}
    )
    session.execute(stmt)
    session.execute(
        sa.update(Job)
        .where(Job.id == job_id)
        .values(latest_metrics={"epoch": epoch, **metrics}, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def record_artifact(
    session: Session, job_id: str, name: str, object_key: str, size_bytes: int, sha256: str
) -> None:
    """Register (or replace, on a rerun) a file the job wrote to the object store."""
    stmt = _insert(session, Artifact).values(
        job_id=job_id,
        name=name,
        object_key=object_key,
        size_bytes=size_bytes,
        sha256=sha256,
        created_at=utcnow(),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Artifact.job_id, Artifact.name],
        set_={
            "object_key": stmt.excluded.object_key,
            "size_bytes": stmt.excluded.size_bytes,
            "sha256": stmt.excluded.sha256,
            "created_at": stmt.excluded.created_at,
        },
    )
    session.execute(stmt)


def run_config(job: Job, *, teacher_path: str | None, data_root: str) -> dict[str, Any]:
    """The job's stored ``DistillConfig`` dict with this machine's paths filled in.

    The API stores ``teacher_path`` and ``data_root`` as None because only the worker knows them:
    ``teacher_path`` is where it downloaded the teacher (``teachers.object_key``); ``data_root`` is
    ``RD_DATA_ROOT`` for a builtin dataset, or the downloaded file itself when ``job.dataset_id`` is set
    (then ``params["dataset"]`` is ``"npz"``).
    """
    return {**job.params, "teacher_path": teacher_path, "data_root": data_root}


def release_for_delete(session: Session, column: Any, row_id: str) -> str | None:
    """Before deleting a teacher or dataset: the id of an unfinished job that uses it (then it must stay),
    else clear the reference of the finished jobs that used it, so they keep their record.

    ``jobs.teacher_id`` and ``jobs.dataset_id`` have no ON DELETE action, so a job that is created after
    this check (a race with the delete) makes the DELETE itself fail in the database: the caller answers
    409 on that IntegrityError. A job that needs a teacher never exists without one.
    """
    busy = session.scalar(
        sa.select(Job.id).where(column == row_id, Job.status.not_in(TERMINAL_STATUSES)).limit(1)
    )
    if busy:
        return busy
    session.execute(
        sa.update(Job)
        .where(column == row_id, Job.status.in_(TERMINAL_STATUSES))
        .values({column.key: None})
        .execution_options(synchronize_session=False)
    )
    return None
