"""Losing no work on the real stack: a job created while its teacher is deleted, jobs whose broker message
was lost, workers killed again and again, and what dead requests leave in the bucket and the scratch folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app
from bench.stack import redis_server
from service.auth import create_api_key
from service.models import Job, Teacher, Tenant
from service.queue import CeleryQueue
from service.settings import Settings

try:
    from tests.integration.conftest_worker import WorkerServices, start_stack, worker_services
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import WorkerServices, start_stack, worker_services  # type: ignore[no-redef]

__all__ = ["worker_services"]  # a fixture: imported so that pytest finds it

# A job of a few seconds that needs no teacher.
TINY_JOB = {
    "student": "tiny_cnn",
    "method": "sat",
    "dataset": "cifar10-partial",
    "epochs": 1,
    "batch_size": 32,
    "train_subset": 64,
    "val_size": 0,
    "method_params": {"steps": 1},
    "attacks": ["clean"],
    "n_eval": 32,
    "device": "cpu",
    "allow_degenerate": True,  # a few seconds of training is no better than chance; that is not the point
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("clean_state"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def app(service_settings: Settings) -> Any:
    return create_app(service_settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def _key(app: Any, tenant: str) -> dict[str, str]:
    with app.state.session_factory() as session:
        key = create_api_key(session, tenant)
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def _teacher_row(app: Any, tenant: str) -> str:
    """A teacher row straight into the database (the race is about rows, not about checking a model)."""
    with app.state.session_factory() as session:
        tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == tenant))
        row = Teacher(
            tenant_id=tenant_id,
            name="t",
            format="state_dict",
            arch="tiny_cnn",
            num_classes=10,
            sha256="0" * 64,
            size_bytes=1,
            num_params=1,
            probe={},
            object_key=f"{tenant_id}/teachers/none.pt",
        )
        session.add(row)
        session.commit()
        return row.id


def _race(create: Any, delete: Any) -> dict[str, httpx.Response]:
    """Both requests released at once from two threads."""
    start = threading.Barrier(2)
    answers: dict[str, httpx.Response] = {}

    def run(name: str, call: Any) -> None:
        start.wait()
        answers[name] = call()

    threads = [threading.Thread(target=run, args=item) for item in (("create", create), ("delete", delete))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return answers


def test_a_job_created_while_its_teacher_is_deleted_never_loses_it(client: TestClient, app: Any) -> None:
    """Create and delete race 30 times: either the job exists with its teacher, or the delete won and the
    create was refused; never a queued job without a teacher, never a 500."""
    headers = _key(app, "alice")
    body = {"student": "tiny_cnn", "method": "rslad", "dataset": "cifar10-partial", "epochs": 1}
    outcomes: set[tuple[int, int]] = set()
    for _ in range(30):
        teacher_id = _teacher_row(app, "alice")
        answers = _race(
            lambda t=teacher_id: client.post("/v1/jobs", headers=headers, json={**body, "teacher_id": t}),
            lambda t=teacher_id: client.delete(f"/v1/teachers/{t}", headers=headers),
        )
        created, deleted = answers["create"].status_code, answers["delete"].status_code
        assert created in (201, 404, 409), answers["create"].text
        assert deleted in (204, 409), answers["delete"].text
        # Exactly one side wins: a created job keeps its teacher, a deleted teacher has no job.
        assert (created == 201) == (deleted == 409), (answers["create"].text, answers["delete"].text)
        outcomes.add((created, deleted))
        if created == 201:
            job = client.get(f"/v1/jobs/{answers['create'].json()['id']}", headers=headers).json()
            assert job["teacher_id"] == teacher_id
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    with app.state.session_factory() as session:
        orphans = session.scalar(
            sa.select(sa.func.count()).select_from(Job).where(Job.method == "rslad", Job.teacher_id.is_(None))
        )
    assert orphans == 0
    # A teacher whose jobs are finished can still be deleted; the finished job keeps its record.
    teacher_id = _teacher_row(app, "alice")
    job_id = client.post("/v1/jobs", headers=headers, json={**body, "teacher_id": teacher_id}).json()["id"]
    assert client.delete(f"/v1/teachers/{teacher_id}", headers=headers).status_code == 409
    client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert client.delete(f"/v1/teachers/{teacher_id}", headers=headers).status_code == 204
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "cancelled" and job["teacher_id"] is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_whose_message_redis_lost_still_runs(worker_services: WorkerServices, tmp_path: Path) -> None:
    """Redis restarted without persistence while no worker ran: the job's message is gone, the database
    still says queued. A worker's reaper sends it again (RD_REQUEUE_QUEUED_AFTER_S) and it runs once."""
    import redis

    # A private redis-server (port 9 never answers), so emptying it disturbs nobody else.
    with redis_server("redis://127.0.0.1:9/0", tmp_path / "redis") as (url, started):
        assert started
        services = WorkerServices({**worker_services.env, "RD_BROKER_URL": url}, worker_services.new_database)
        (tmp_path / "stack").mkdir()
        with start_stack(services, tmp_path / "stack") as stack:
            stack.env["RD_REQUEUE_QUEUED_AFTER_S"] = "2"
            job = stack.client.jobs.create(**TINY_JOB)
            broker = redis.Redis.from_url(url)
            assert broker.llen(stack.queue) == 1
            waiting = CeleryQueue(Settings(var_dir=tmp_path / "var", broker_url=url, queue=stack.queue))
            assert waiting.waiting_ids() == {job.id}  # while it is there, it is not sent again
            broker.flushall()  # what a restart without persistence leaves
            assert waiting.waiting_ids() == set()
            broker.close()
            stack.start_worker()
            deadline = time.monotonic() + 180
            while (got := stack.client.jobs.get(job.id)).status in ("queued", "running", "evaluating"):
                assert time.monotonic() < deadline, (got, stack.worker_log())
                time.sleep(0.5)
            assert got.status == "succeeded" and got.attempts == 1, (got.error, stack.worker_log())


def test_start_up_removes_what_dead_requests_left(
    service_settings: Settings, s3: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API killed mid-upload leaves its scratch folder and the parts of a multipart put. The next
    API process removes both at start-up (once older than their bounds) and leaves younger ones alone."""
    import os

    monkeypatch.setenv("RD_INCOMPLETE_UPLOAD_MAX_AGE_S", "3")
    s3c = s3.client()

    def begin_upload(key: str) -> str:
        upload_id = s3c.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
        s3c.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * (5 << 20))
        return upload_id

    def uploads() -> set[str]:
        return {u["UploadId"] for u in s3c.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])}

    dead_upload = begin_upload("tenants/t/teachers/dead/teacher.pt")
    scratch = service_settings.upload_dir
    dead, live = scratch / "upload-dead", scratch / "upload-live"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "teacher.pt").write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    for path in (dead / "teacher.pt", dead):
        os.utime(path, (two_hours_ago, two_hours_ago))
    time.sleep(4)
    young_upload = begin_upload("tenants/t/teachers/live/teacher.pt")
    try:
        app = create_app(service_settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
        with TestClient(app):
            deadline = time.monotonic() + 20
            while dead.exists() or dead_upload in uploads():
                assert time.monotonic() < deadline, "the start-up clean-up did not run"
                time.sleep(0.2)
        assert live.is_dir() and (live / "teacher.pt").is_file()
        assert young_upload in uploads()
    finally:
        s3c.abort_multipart_upload(
            Bucket=s3_bucket, Key="tenants/t/teachers/live/teacher.pt", UploadId=young_upload
        )


def test_duplicate_deliveries_of_a_queued_job_claim_it_once(app: Any, service_settings: Settings) -> None:
    """Several deliveries of one queued job (a resend while the first message was still there) race to
    claim it on PostgreSQL: one attempt runs it, the others return at once as duplicates."""
    from worker.lease import WorkerSettings
    from worker.tasks import JobRun

    _key(app, "alice")
    with app.state.session_factory() as session:
        tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == "alice"))
        job = Job(tenant_id=tenant_id, student_arch="tiny_cnn", method="sat", params={}, status="queued")
        session.add(job)
        session.commit()
        job_id = job.id
    start = threading.Barrier(4)
    outcomes: list[str | None] = []

    def deliver() -> None:
        run = JobRun(job_id, service_settings, WorkerSettings())
        try:
            start.wait()
            outcomes.append(run._claim())
        finally:
            run.engine.dispose()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes.count(None) == 1, outcomes
    duplicate = {"running on a live worker (duplicate delivery)", "claimed by another delivery"}
    assert set(outcomes) - {None} <= duplicate
    with app.state.session_factory() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.lost_workers) == ("running", 1, 0)


def test_three_lost_workers_do_not_fail_the_job(app: Any, service_settings: Settings) -> None:
    """Three SIGKILLs of the worker during one job used to end it failed ("giving up after 3 attempts").
    On PostgreSQL: each attempt claims the job, its worker falls silent, the reaper requeues it; the job
    keeps going, the lost workers counted apart from the job's own failures."""
    from datetime import timedelta

    from worker.lease import WorkerSettings, reap_once
    from worker.tasks import JobRun

    _key(app, "alice")
    with app.state.session_factory() as session:
        tenant_id = session.scalar(sa.select(Tenant.id).where(Tenant.name == "alice"))
        job = Job(tenant_id=tenant_id, student_arch="tiny_cnn", method="sat", params={}, status="queued")
        session.add(job)
        session.commit()
        job_id = job.id
    ws = WorkerSettings(stale_after_s=30)  # RD_MAX_ATTEMPTS 3, RD_MAX_LOST_WORKERS 10: the defaults
    sent: list[str] = []
    for attempt in range(1, 5):
        run = JobRun(job_id, service_settings, ws)
        try:
            assert run._claim() is None and run.attempt == attempt
        finally:
            run.engine.dispose()
        with app.state.session_factory() as session:  # SIGKILL: no heartbeat from now on
            silent_since = sa.func.now() - timedelta(seconds=60)
            session.execute(sa.update(Job).where(Job.id == job_id).values(updated_at=silent_since))
            session.commit()
        reap_once(app.state.session_factory, sent.append, ws.stale_after_s, ws.max_lost_workers)
        with app.state.session_factory() as session:
            job = session.get(Job, job_id)
            assert job.status == "queued", job.error
            assert (job.attempts, job.lost_workers, job.failed_attempts) == (attempt, attempt, 0)
    assert sent == [job_id] * 4
    # The fifth delivery still runs it (the bound itself: tests/unit/test_worker_lease.py).
    run = JobRun(job_id, service_settings, ws)
    try:
        assert run._claim() is None and run.attempt == 5
    finally:
        run.engine.dispose()
