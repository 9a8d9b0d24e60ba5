"""The metrics on the real stack: the API under uvicorn and a Celery worker with its metrics port, on
PostgreSQL, Redis and S3. A tiny job (like tests/integration/test_e2e_worker.py's) must move each counter
by exactly what it did, and no label may name the tenant, its key, the job or the teacher."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

try:
    from tests.integration.conftest_worker import (
        Stack,
        WorkerServices,
        db_rows,
        free_port,
        start_stack,
        worker_services,
    )
    from tests.integration.test_e2e_worker import JOB, teacher_file, wait_for
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import (  # type: ignore[no-redef]
        Stack,
        WorkerServices,
        db_rows,
        free_port,
        start_stack,
        worker_services,
    )
    from test_e2e_worker import JOB, teacher_file, wait_for  # type: ignore[no-redef]

__all__ = ["teacher_file", "worker_services"]  # fixtures: imported so that pytest finds them

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture(scope="module")
def stack(worker_services: WorkerServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(worker_services, tmp_path_factory.mktemp("metrics")) as s:
        s.env["RD_WORKER_METRICS_PORT"] = str(free_port())
        s.start_worker()
        yield s


def api_url(stack: Stack) -> str:
    return str(stack.client.http.base_url.join("/metrics"))


def worker_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.env['RD_WORKER_METRICS_PORT']}/metrics"


def worker_answers(stack: Stack) -> Samples | None:
    try:
        return scrape(worker_url(stack))
    except httpx.HTTPError:
        assert all(w.poll() is None for w in stack.workers), stack.worker_log()
        return None


def test_a_job_moves_each_counter_by_what_it_did(stack: Stack, teacher_file: Path) -> None:
    client = stack.client
    worker_before = wait_for(lambda: worker_answers(stack), 120, "the worker's metrics port")
    assert ("rd_worker_train_images_total", ()) in worker_before  # the parent's zeros, before any job
    assert value(worker_before, "rd_worker_busy") == 0
    before = scrape(api_url(stack))

    teacher = client.teachers.upload(teacher_file, arch="tiny_cnn", dataset="cifar10-partial",
                                     name=f"metrics-teacher-{stack.queue}")
    epochs = 2
    job = client.jobs.create(teacher_id=teacher.id, epochs=epochs, **JOB)

    def worker_busy() -> bool:  # the running child's live gauges reach the parent's port (JOB: on the CPU)
        samples = worker_answers(stack) or {}
        return value(samples, "rd_worker_busy") == 1 and value(samples, "rd_worker_device", type="cpu") == 1

    wait_for(worker_busy, 240, "the worker to report the job running on the CPU")
    job = client.jobs.wait(job.id, timeout=300, poll_s=0.5)
    assert job.status == "succeeded", (job.error, stack.worker_log())
    report = client.jobs.report(job.id)
    assert report.final is not None
    after = scrape(api_url(stack))

    # The API: one job created, one teacher's bytes received, polls labelled by their route template.
    assert moved(before, after, "rd_http_requests_total", route="/v1/jobs", method="POST", status="201") == 1
    assert moved(before, after, "rd_http_requests_total", route="/v1/teachers", method="POST",
                 status="201") == 1
    assert moved(before, after, "rd_http_requests_total", route="/v1/jobs/{job_id}", method="GET",
                 status="200") >= 1
    assert moved(before, after, "rd_upload_bytes_total", kind="teacher") == teacher_file.stat().st_size
    assert moved(before, after, "rd_uploads_total", kind="teacher") == 1
    assert value(after, "rd_event_streams_open") == 0

    # The jobs, read from PostgreSQL; the queue, from Redis.
    assert moved(before, after, "rd_jobs", status="succeeded") == 1
    assert value(after, "rd_jobs", status="queued") == value(after, "rd_jobs", status="running") == 0
    assert moved(before, after, "rd_job_duration_seconds_count", status="succeeded") == 1
    assert moved(before, after, "rd_job_queue_wait_seconds_count") == 1
    assert moved(before, after, "rd_job_attempts_total") == job.attempts == 1
    assert moved(before, after, "rd_job_lost_workers_total") == 0
    assert moved(before, after, "rd_job_failed_attempts_total") == 0
    assert value(after, "rd_queue_depth") == 0
    assert value(after, "rd_job_oldest_heartbeat_seconds") == 0
    assert value(after, "rd_metrics_source_up", source="database") == 1
    assert value(after, "rd_metrics_source_up", source="broker") == 1

    # The worker: its pool child recorded the attempt before it exited; the parent serves the sum.
    def worker_done() -> Samples | None:
        samples = worker_answers(stack)
        done = samples and moved(worker_before, samples, "rd_worker_attempts_total", outcome="succeeded") == 1
        return samples if done else None

    worker_after = wait_for(worker_done, 60, "the worker's attempt counter")
    checkpoints = report.final.values()
    evaluated = sum(len(result.rows) for result in checkpoints)
    assert evaluated == len(report.final) * len(JOB["attacks"])
    assert moved(worker_before, worker_after, "rd_worker_eval_seconds_count", attack="other") == 0
    for attack in JOB["attacks"]:
        assert moved(worker_before, worker_after, "rd_worker_eval_seconds_count", attack=attack) == len(
            report.final
        )
    assert total(worker_after, "rd_worker_eval_seconds_count") - total(
        worker_before, "rd_worker_eval_seconds_count") == evaluated
    steps = math.ceil(JOB["train_subset"] / JOB["batch_size"])
    assert moved(worker_before, worker_after, "rd_worker_train_images_total") == epochs * steps * JOB[
        "batch_size"]
    wait_for(lambda: value(worker_answers(stack) or {}, "rd_worker_busy") == 0 or None, 60, "an idle worker")

    # No label anywhere holds the tenant's data: its id and name, its key, the job, the teacher.
    key = client.http.headers["Authorization"].split()[1]
    secrets = {job.id, teacher.id, teacher.name, key, key.split("_")[1]}
    secrets |= {str(v) for row in db_rows(stack, "SELECT id, name FROM tenants") for v in row}
    labels = {v for samples in (after, worker_after) for _, pairs in samples for _, v in pairs}
    assert not [(v, s) for v in labels for s in secrets if s in v]


def test_a_database_that_does_not_answer_leaves_the_scrape_standing(stack: Stack) -> None:
    """A lock held on the job table stalls every query on it: the scrape answers anyway (after the
    statement timeout, RD_METRICS_TIMEOUT_S), without the job metrics, and says the database did not."""
    from service.db import make_engine

    engine = make_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
            stalled = scrape(api_url(stack))
            conn.rollback()
    finally:
        engine.dispose()
    assert value(stalled, "rd_metrics_source_up", source="database") == 0
    assert value(stalled, "rd_metrics_source_up", source="broker") == 1
    assert not [k for k in stalled if k[0] == "rd_jobs"]
    assert value(scrape(api_url(stack)), "rd_metrics_source_up", source="database") == 1
