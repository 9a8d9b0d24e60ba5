"""Losing no work on the real stack: a job created while its teacher is deleted, jobs whose broker message
was lost, workers killed again and again, and what dead requests leave in the bucket and the scratch folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app
from service.auth import create_api_key
from service.models import Job, Teacher, Tenant
from service.settings import Settings

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
