"""End to end through real processes: the API under uvicorn, Celery workers, PostgreSQL, Redis and S3.

The teacher is a tiny CNN trained here for a few seconds on the real CIFAR-10 images in ../shared/data,
so the student's numbers are real (if modest) and the report can be checked against the weights.
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distill_client.cli import main as client_main
from distill_client.cli import watch

try:
    from tests.integration.conftest_worker import Stack, WorkerServices, db_rows, start_stack, worker_services
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import (  # type: ignore[no-redef]
        Stack,
        WorkerServices,
        db_rows,
        start_stack,
        worker_services,
    )

__all__ = ["worker_services"]  # a fixture: imported so that pytest finds it

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

N_EVAL = 128
# What every job hands out besides its weights and report: the exported students and the model card.
HANDED_OUT = tuple(f"student_{which}{suffix}" for which in ("best", "last")
                   for suffix in (".safetensors", ".torchscript.pt", ".pt2", ".onnx")) + (
                       "model_card.md", "model_card.json")
JOB = {
    "student": "tiny_cnn",
    "method": "rslad",
    "dataset": "cifar10-partial",
    "batch_size": 64,
    "train_subset": 512,
    "val_size": 200,
    "method_params": {"steps": 2},
    "attacks": ["clean", "fgsm", "pgd_sat"],
    "n_eval": N_EVAL,
    "device": "cpu",
    # Two epochs on 512 images leave the student at chance (one class for every image): the guardrails
    # would fail such a job; these scenarios test the plumbing, so they keep it, flagged.
    "allow_degenerate": True,
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A tiny_cnn trained for a few seconds (plain cross-entropy) on the partial CIFAR-10 training set."""
    import torch
    import torch.nn.functional as F

    from core.data import iterate_batches, load_dataset
    from core.models import create_model

    torch.manual_seed(0)
    data = load_dataset("cifar10-partial", shared_dir / "data", val_size=0, seed=0)
    model = create_model("tiny_cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        batches = iterate_batches(data.train, 128, shuffle=True, augment=False, generator=gen, device="cpu")
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def stack(worker_services: WorkerServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker on a queue of their own, shared by the first two scenarios."""
    with start_stack(worker_services, tmp_path_factory.mktemp("stack")) as s:
        s.start_worker()
        yield s


@pytest.fixture(scope="module")
def teacher_id(stack: Stack, teacher_file: Path) -> str:
    return stack.client.teachers.upload(teacher_file, arch="tiny_cnn", dataset="cifar10-partial").id


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def clean_accuracy(weights: Path, shared_dir: Path, n: int) -> float:
    """The student's clean accuracy on the first n test images, computed here from the downloaded file."""
    import torch

    from core.data import iterate_batches, load_dataset
    from core.models import create_model

    model = create_model("tiny_cnn", 10)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    test = load_dataset("cifar10-partial", shared_dir / "data", val_size=0, seed=0).test
    test.x, test.y = test.x[:n], test.y[:n]
    correct = 0
    with torch.no_grad():
        for x, y in iterate_batches(test, 64, shuffle=False, augment=False, generator=None, device="cpu"):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / n


def test_job_runs_to_a_report_that_matches_the_weights(
    stack: Stack, teacher_id: str, shared_dir: Path, tmp_path: Path
) -> None:
    client = stack.client
    job = client.jobs.create(teacher_id=teacher_id, epochs=2, **JOB)
    assert job.status == "queued"

    shown = io.StringIO()
    job = watch(client, job.id, timeout=300, poll_s=0.5, out=shown)
    assert job.status == "succeeded", (job.error, stack.worker_log())
    assert job.attempts == 1
    assert job.progress.fraction == pytest.approx(1.0)
    assert "epoch 2/2" in shown.getvalue()

    names = {a.name for a in client.jobs.artifacts(job.id)}
    assert names == {"student_best.pt", "student_last.pt", "report.json", *HANDED_OUT}
    best = client.jobs.download_artifact(job.id, "student_best.pt", tmp_path)
    report = client.jobs.report(job.id)
    assert report.resumed_from_epoch == 0
    assert [h["epoch"] for h in report.history or []] == [1, 2]
    assert report.final is not None
    rows = {row.attack: row for row in report.final["best"].rows}
    assert set(rows) == {"clean", "fgsm", "pgd_sat"}
    assert rows["clean"].n == N_EVAL
    # The job shows what the guardrails found, as the report says it (on PostgreSQL's JSON columns).
    assert list(client.http.get(f"/v1/jobs/{job.id}/report").json())[:2] == ["degenerate_student", "warnings"]
    assert job.degenerate_student == report.degenerate_student
    assert set(report.warnings) <= set(job.warnings)
    assert report.teacher is not None
    assert job.teacher_accuracy == pytest.approx(report.teacher["check"]["accuracy"])
    assert report.teacher["id"] == teacher_id and "path" not in report.teacher
    assert clean_accuracy(best, shared_dir, N_EVAL) == pytest.approx(rows["clean"].accuracy, abs=1e-12)

    # The console command against the same server: watch returns at once, download fetches all three.
    base = ["--url", str(client.http.base_url), "--key", client.http.headers["Authorization"].split()[1]]
    assert client_main([*base, "--quiet", "job", "watch", job.id]) == 0
    assert client_main([*base, "job", "download", job.id, "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(names)
    assert (tmp_path / "cli" / "student_best.pt").read_bytes() == best.read_bytes()

    metrics = client.jobs.metrics(job.id)
    assert [m.epoch for m in metrics] == [1, 2]
    statuses = [e.payload["status"] for e in client.jobs.iter_events(job.id) if e.type == "status"]
    assert statuses == ["queued", "running", "evaluating", "succeeded"]


def test_several_students_in_one_job(stack: Stack, teacher_id: str, shared_dir: Path, tmp_path: Path) -> None:
    """Two students, one data pass: each gets its weights and report, and both reports are honest."""
    client = stack.client
    students = [
        {"student": "tiny_cnn", "method": "rslad", "method_params": {"steps": 2}},
        {"student": "tiny_cnn", "method": "ard", "method_params": {"steps": 2}},
    ]
    body = {**JOB, "attacks": ["clean", "pgd_sat"], "students": students}
    job = client.jobs.create(teacher_id=teacher_id, epochs=2, **body)
    job = client.jobs.wait(job.id, timeout=300, poll_s=0.5)
    assert job.status == "succeeded", (job.error, stack.worker_log())

    names = {a.name for a in client.jobs.artifacts(job.id)}
    prefixes = ("tiny_cnn-rslad", "tiny_cnn-ard")
    files = ("student_best.pt", "student_last.pt", "report.json", *HANDED_OUT)
    assert names == {"report.json"} | {f"{p}.{f}" for p in prefixes for f in files}
    report = client.jobs.report(job.id)
    assert report.students is not None and list(report.students) == list(prefixes)
    for prefix in prefixes:
        weights = client.jobs.download_artifact(job.id, f"{prefix}.student_best.pt", tmp_path)
        single = report.students[prefix]
        assert single.final is not None
        rows = {row.attack: row for row in single.final["best"].rows}
        assert rows["pgd_sat"].accuracy <= rows["clean"].accuracy
        expected = rows["clean"].accuracy
        assert clean_accuracy(weights, shared_dir, N_EVAL) == pytest.approx(expected, abs=1e-12)
    metrics = client.jobs.metrics(job.id)
    assert [m.epoch for m in metrics] == [1, 2]
    assert all(set(m.metrics["students"]) == set(prefixes) for m in metrics)


def test_cancel_stops_a_running_job_within_seconds(stack: Stack, teacher_id: str) -> None:
    client = stack.client
    job = client.jobs.create(teacher_id=teacher_id, epochs=30, **JOB)

    def training() -> bool:
        current = client.jobs.get(job.id)
        assert current.status in ("queued", "running"), current
        return current.status == "running" and (current.progress.step or 0) >= 1

    wait_for(training, 180, "the job to be training")
    asked = time.monotonic()
    assert client.jobs.cancel(job.id).cancel_requested is True
    done = wait_for(
        lambda: (j := client.jobs.get(job.id)).status in ("cancelled", "failed", "succeeded") and j,
        30,
        "the job to stop",
    )
    took = time.monotonic() - asked
    assert done.status == "cancelled", (done.error, stack.worker_log())
    assert took < 15, f"cancel took {took:.1f} s"
    types = [e.type for e in client.jobs.iter_events(job.id)]
    assert "cancel_requested" in types and types[-1] == "status"
    assert client.jobs.artifacts(job.id) == []

    # The worker is free again: a queued job after a cancel still runs.
    follow = client.jobs.create(teacher_id=teacher_id, epochs=1, **{**JOB, "attacks": ["clean"]})
    assert client.jobs.wait(follow.id, timeout=240).status == "succeeded", stack.worker_log()


def test_killed_worker_job_resumes_from_its_checkpoint(
    worker_services: WorkerServices, teacher_file: Path, tmp_path: Path
) -> None:
    """SIGKILL the worker (parent and children) after a checkpoint; a new worker finishes the job.

    Redis keeps the killed worker's unacknowledged message for the visibility timeout (days, by
    design), so it is the lease (worker/lease.py) that brings the job back: the new worker's reaper sees
    no heartbeat for RD_STALE_AFTER_S, requeues the job, and the new attempt resumes from checkpoint.pt.
    """
    epochs = 4
    with start_stack(worker_services, tmp_path) as s:
        client = s.client
        first = s.start_worker()
        teacher = client.teachers.upload(teacher_file, arch="tiny_cnn", dataset="cifar10-partial")
        job = client.jobs.create(teacher_id=teacher.id, epochs=epochs, **JOB)

        def checkpoints() -> list[int]:
            return [e.payload["epoch"] for e in client.jobs.iter_events(job.id) if e.type == "checkpoint"]

        wait_for(checkpoints, 240, "the first checkpoint")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        saved = max(checkpoints())
        assert saved < epochs, "the job finished before the worker could be killed"
        killed_at = client.jobs.get(job.id)
        assert killed_at.status == "running" and killed_at.attempts == 1

        s.start_worker()
        job = client.jobs.wait(job.id, timeout=300, poll_s=0.5)
        assert job.status == "succeeded", (job.error, s.worker_log())
        assert job.attempts == 2

        report = client.jobs.report(job.id)
        assert (report.resumed_from_epoch or 0) >= saved >= 1
        assert [h["epoch"] for h in report.history or []] == list(range(1, epochs + 1))
        events = list(client.jobs.iter_events(job.id))
        resumes = [e.payload for e in events if e.type == "resume"]
        assert len(resumes) == 1 and resumes[0]["attempt"] == 2 and resumes[0]["checkpoint"] is True
        assert resumes[0]["checkpoint_epoch"] >= saved
        statuses = [e.payload["status"] for e in events if e.type == "status"]
        assert statuses == ["queued", "running", "queued", "running", "evaluating", "succeeded"]
        # Replayed epochs wrote nothing twice: one metrics event and one metrics row per epoch.
        assert [e.payload["epoch"] for e in events if e.type == "metrics"] == list(range(1, epochs + 1))
        assert [m.epoch for m in client.jobs.metrics(job.id)] == list(range(1, epochs + 1))
        keys = [
            k
            for (k,) in db_rows(
                s,
                "SELECT dedupe_key FROM job_events WHERE job_id = :id AND dedupe_key IS NOT NULL",
                id=job.id,
            )
        ]
        assert len(keys) == len(set(keys))
