"""The worker's bookkeeping without a broker or torch: lease, reaper, dedupe of replayed epochs."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.db import make_engine, make_session_factory, session_scope, upgrade_to_head
from service.models import Job, JobEvent, JobMetric, Teacher, Tenant, utcnow
from service.queue import CeleryQueue
from service.settings import Settings
from worker.lease import WorkerSettings, clean_work_dir, reap_once, resend_queued, touch
from worker.tasks import JobRun, finite


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(var_dir=tmp_path / "var")
    upgrade_to_head(s.database_url)
    return s


@pytest.fixture
def sessions(settings: Settings):
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


def make_job(sessions, status: str = "queued", attempts: int = 0, age_s: float = 0.0, **kw) -> str:
    with session_scope(sessions) as session:
        tenant = Tenant(name=f"t{utcnow().timestamp()}")
        session.add(tenant)
        session.flush()
        job = Job(
            tenant_id=tenant.id,
            student_arch="tiny_cnn",
            method="natural",
            params={},
            status=status,
            attempts=attempts,
            **kw,
        )
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope(sessions) as session:
        # onupdate would stamp now; set the heartbeat's age explicitly.
        beat = utcnow() - timedelta(seconds=age_s)
        session.execute(sa.update(Job).where(Job.id == job_id).values(updated_at=beat))
    return job_id


def events(sessions, job_id: str) -> list[tuple[str, dict]]:
    with sessions() as session:
        rows = session.scalars(sa.select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [(e.type, e.payload) for e in rows]


def test_reaper_requeues_only_jobs_whose_lease_ran_out(sessions) -> None:
    stale = make_job(sessions, "running", attempts=1, age_s=60)
    fresh = make_job(sessions, "running", attempts=1, age_s=1)
    sent: list[str] = []
    assert reap_once(sessions, sent.append, stale_after_s=30) == [stale]
    assert sent == [stale]
    with sessions() as session:
        assert session.get(Job, stale).status == "queued"
        assert session.get(Job, fresh).status == "running"
    assert [t for t, _ in events(sessions, stale)] == ["warning", "status"]
    # A second pass (another worker's reaper) finds nothing to do.
    assert reap_once(sessions, sent.append, stale_after_s=30) == []


def test_reaper_cancels_or_fails_instead_of_requeueing(sessions) -> None:
    cancelled = make_job(sessions, "running", attempts=1, age_s=60, cancel_requested=True)
    exhausted = make_job(sessions, "evaluating", attempts=10, age_s=60, lost_workers=9)
    sent: list[str] = []
    assert reap_once(sessions, sent.append, stale_after_s=30, max_lost_workers=10) == []
    assert sent == []
    with sessions() as session:
        assert session.get(Job, cancelled).status == "cancelled"
        failed = session.get(Job, exhausted)
        assert failed.status == "failed" and failed.lost_workers == 10
        assert "lost 10 time(s)" in failed.error and "RD_MAX_LOST_WORKERS" in failed.error


def test_lost_workers_are_not_counted_as_the_jobs_attempts(sessions) -> None:
    """Three SIGKILLs of the worker during one job used to end it failed; a lost worker is not the job's
    fault: it is counted apart and bounded generously (RD_MAX_LOST_WORKERS)."""
    job_id = make_job(sessions, "running", attempts=3, age_s=60, lost_workers=2)
    sent: list[str] = []
    assert reap_once(sessions, sent.append, stale_after_s=30, max_lost_workers=10) == [job_id]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "queued" and job.lost_workers == 3 and job.failed_attempts == 0
        assert job.enqueued_at is not None and utcnow() - job.enqueued_at < timedelta(seconds=10)
    assert "lost worker 3 of 10" in events(sessions, job_id)[-2][1]["message"]


def _queued_since(sessions, age_s: float, **kw) -> str:
    job_id = make_job(sessions, "queued", **kw)
    with session_scope(sessions) as session:
        then = utcnow() - timedelta(seconds=age_s)
        session.execute(sa.update(Job).where(Job.id == job_id).values(enqueued_at=then, created_at=then))
    return job_id


def test_jobs_queued_too_long_without_a_message_are_sent_again(sessions) -> None:
    """The database is the source of truth: a broker that lost its messages (Redis restarted without
    persistence) does not lose the jobs. A message still waiting is not duplicated, and the marker keeps
    it to one resend per period even across several reapers."""
    lost = _queued_since(sessions, 60)
    waiting = _queued_since(sessions, 60)
    young = _queued_since(sessions, 1)
    running = make_job(sessions, "running", attempts=1)
    sent: list[str] = []
    assert resend_queued(sessions, sent.append, lambda: {waiting}, after_s=30) == [lost]
    # Its message is gone now too:
    assert resend_queued(sessions, sent.append, lambda: set(), after_s=30) == [waiting]
    assert resend_queued(sessions, sent.append, lambda: None, after_s=30) == []  # both marked just now
    assert sent == [lost, waiting]
    with sessions() as session:
        assert session.get(Job, young).status == "queued" and session.get(Job, running).status == "running"
    # A broker that cannot be listed: every job past the bound is sent again (the claim absorbs duplicates).
    unknown = _queued_since(sessions, 60)
    assert resend_queued(sessions, sent.append, lambda: None, after_s=30) == [unknown]


def test_claim_absorbs_duplicate_deliveries_at_once(settings: Settings, sessions) -> None:
    """A duplicate of a job a live worker runs returns at once (it does not hold this worker for a lease
    period); a duplicate of a finished job is a no-op; a stale lease is a lost worker, taken over."""
    ws = WorkerSettings(stale_after_s=120, heartbeat_s=10)
    live = make_job(sessions, "running", attempts=1, age_s=1)
    done = make_job(sessions, "succeeded", attempts=1)
    stale = make_job(sessions, "running", attempts=1, age_s=300)
    outcomes = {}
    for job_id in (live, done, stale):
        run = JobRun(job_id, settings, ws)
        started = time.monotonic()
        try:
            outcomes[job_id] = run._claim()
        finally:
            run.engine.dispose()
        assert time.monotonic() - started < 5, "the claim held the worker"
    assert outcomes[live] == "running on a live worker (duplicate delivery)"
    assert outcomes[done] == "already succeeded"
    assert outcomes[stale] is None
    with sessions() as session:
        assert (session.get(Job, live).status, session.get(Job, live).attempts) == ("running", 1)
        assert session.get(Job, done).status == "succeeded"
        taken = session.get(Job, stale)
        assert (taken.status, taken.attempts, taken.lost_workers) == ("running", 2, 1)


def test_the_jobs_own_errors_are_retried_then_fail_saying_so(settings: Settings, sessions) -> None:
    """An unexpected error requeues the job (with a message on the broker) until RD_MAX_ATTEMPTS attempts
    ended so; the final error names the bound. Lost workers do not count here."""
    job_id = make_job(sessions, lost_workers=4)
    ws = WorkerSettings(max_attempts=2)
    queue = CeleryQueue(settings)
    outcomes = []
    for _ in range(2):
        run = JobRun(job_id, settings, ws)
        try:
            assert run._claim() is None
            outcomes.append(run._retry_or_fail("internal error: OSError: the store hiccuped"))
        finally:
            run.engine.dispose()
        if outcomes[-1] == "retrying":
            assert job_id in (queue.waiting_ids() or set())
    assert outcomes == ["retrying", "failed"]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.failed_attempts, job.lost_workers) == ("failed", 2, 2, 4)
        assert job.error.startswith("internal error: OSError: the store hiccuped")
        assert "RD_MAX_ATTEMPTS" in job.error


def test_worker_scratch_of_dead_attempts_is_removed(sessions, tmp_path: Path) -> None:
    """A SIGKILLed worker leaves <work>/<job id> behind; the reaper removes it unless a live attempt
    (fresh lease) or a just-started one (young folder) uses it. The API's uploads folder is not touched."""
    dead = make_job(sessions, "running", attempts=1, age_s=300)
    live = make_job(sessions, "running", attempts=1, age_s=1)
    done = make_job(sessions, "succeeded", attempts=1)
    starting = make_job(sessions, "running", attempts=1, age_s=300)
    work = tmp_path / "work"
    old = time.time() - 600
    for name in (dead, live, done, "f" * 32, "uploads", starting):
        (work / name / "out").mkdir(parents=True)
        if name != starting:
            os.utime(work / name, (old, old))
    assert sorted(clean_work_dir(sessions, work, stale_after_s=30)) == sorted([dead, done, "f" * 32])
    assert sorted(p.name for p in work.iterdir()) == sorted([live, "uploads", starting])


def test_touch_is_fenced_by_the_attempt(sessions) -> None:
    job_id = make_job(sessions, "running", attempts=2, age_s=60)
    with session_scope(sessions) as session:
        assert touch(session, job_id, 1) is False
        assert touch(session, job_id, 2) is True


def test_replayed_epoch_writes_nothing_twice(settings: Settings, sessions) -> None:
    job_id = make_job(sessions)
    run = JobRun(job_id, settings, WorkerSettings())
    try:
        assert run._claim() is None and run.attempt == 1
        run.out.mkdir(parents=True)
        ckpt = run.out / "checkpoint.pt"
        ckpt.write_bytes(b"checkpoint")
        (run.out / "student_best.pt").write_bytes(b"best")
        for loss in (1.0, 0.5):  # the second pass is a replay after a redelivery
            run._on_event(
                {
                    "type": "epoch",
                    "epoch": 1,
                    "epochs": 2,
                    "metrics": {"loss": loss, "best": True, "val_robust_acc": float("nan")},
                }
            )
            run._on_event({"type": "checkpoint", "epoch": 1, "path": str(ckpt)})
            run._on_event({"type": "warning", "message": "same warning"})
    finally:
        run.engine.dispose()
    kinds = [t for t, _ in events(sessions, job_id)]
    assert kinds.count("metrics") == 1 and kinds.count("checkpoint") == 1 and kinds.count("warning") == 1
    with sessions() as session:
        [row] = session.scalars(sa.select(JobMetric).where(JobMetric.job_id == job_id))
        assert row.metrics["loss"] == 0.5 and row.metrics["val_robust_acc"] is None
    assert run.store.exists(run._key("checkpoint.pt")) and run.store.exists(run._key("student_best.pt"))


def test_helpers() -> None:
    assert finite({"a": float("inf"), "b": [1.0, float("nan")]}) == {"a": None, "b": [1.0, None]}
    assert Teacher(normalize={"mean": [0.5, 0.25], "std": [1, 2]}).normalize_spec == "0.5,0.25;1.0,2.0"
    assert Teacher(normalize=None).normalize_spec is None
