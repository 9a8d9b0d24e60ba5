"""The worker's bookkeeping without a broker or torch: lease, reaper, dedupe of replayed epochs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.db import make_engine, make_session_factory, session_scope, upgrade_to_head
from service.models import Job, JobEvent, JobMetric, Teacher, Tenant, utcnow
from service.settings import Settings
from worker.lease import WorkerSettings, reap_once, touch
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
    exhausted = make_job(sessions, "evaluating", attempts=3, age_s=60)
    sent: list[str] = []
    assert reap_once(sessions, sent.append, stale_after_s=30, max_attempts=3) == []
    assert sent == []
    with sessions() as session:
        assert session.get(Job, cancelled).status == "cancelled"
        failed = session.get(Job, exhausted)
        assert failed.status == "failed" and "giving up after 3 attempts" in failed.error


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
