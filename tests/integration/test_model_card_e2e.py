"""A job on the real stack (API under uvicorn, a Celery worker, PostgreSQL, Redis, S3) ends with every
exported student and both model-card files as artifacts whose recorded sha256 matches the downloaded
bytes, and ``distill-client job verify`` re-runs the card's attacks locally and reproduces its numbers.

A teacher-free method (natural training) for one epoch on the real partial CIFAR-10 images: the plumbing
is under test, so the (weak) student is kept with ``allow_degenerate``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill_client.cli import main as client_main

try:
    from tests.integration.conftest_worker import Stack, WorkerServices, start_stack, worker_services
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import Stack, WorkerServices, start_stack, worker_services  # type: ignore[no-redef]

__all__ = ["worker_services"]  # a fixture: imported so that pytest finds it

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

SUFFIXES = (".safetensors", ".torchscript.pt", ".pt2", ".onnx")
JOB = {
    "student": "tiny_cnn", "method": "natural", "dataset": "cifar10-partial", "epochs": 1, "batch_size": 64,
    "train_subset": 256, "val_size": 100, "attacks": ["clean", "fgsm"], "n_eval": 64, "device": "cpu",
    "allow_degenerate": True,
}


@pytest.fixture(scope="module")
def stack(worker_services: WorkerServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(worker_services, tmp_path_factory.mktemp("stack")) as s:
        s.start_worker()
        yield s


def test_job_hands_out_exports_and_a_card_that_verify_reproduces(
    stack: Stack, shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = stack.client
    job = client.jobs.wait(client.jobs.create(**JOB).id, timeout=150, poll_s=0.5)
    assert job.status == "succeeded", (job.error, stack.worker_log())

    artifacts = {a.name: a.sha256 for a in client.jobs.artifacts(job.id)}
    exports = {f"student_{which}{suffix}" for which in ("best", "last") for suffix in SUFFIXES}
    assert set(artifacts) == {"report.json", "student_best.pt", "student_last.pt", "model_card.md",
                              "model_card.json"} | exports
    paths = client.jobs.download(job.id, tmp_path / "all")
    for path in paths:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifacts[path.name], path.name

    card = json.loads((tmp_path / "all" / "model_card.json").read_text())
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert card["job_id"] == job.id
    for which in ("best", "last"):
        assert [(r["attack"], r["accuracy"], r["n"]) for r in card["evaluation"][which]["rows"]] == [
            (r["attack"], r["accuracy"], r["n"]) for r in report["final"][which]["rows"]]
        for record in card["exports"][which]:  # the card's hashes are the artifacts' hashes
            assert record["ok"] and artifacts[record["file"]] == record["sha256"]
    assert f"distill-client job verify {job.id}" in (tmp_path / "all" / "model_card.md").read_text()

    base = ["--url", str(client.http.base_url), "--key", client.http.headers["Authorization"].split()[1]]
    capsys.readouterr()
    assert client_main([*base, "job", "download", job.id, "--out", str(tmp_path / "one"), "--format", "onnx",
                        "--which", "last"]) == 0
    one = tmp_path / "one" / "student_last.onnx"
    assert capsys.readouterr().out.strip() == str(one)
    assert one.read_bytes() == (tmp_path / "all" / "student_last.onnx").read_bytes()

    code = client_main([*base, "job", "verify", job.id, "--data-root", str(shared_dir / "data"),
                        "--out", str(tmp_path / "verify")])
    shown = capsys.readouterr().out
    assert code == 0, shown
    assert "verified: the local figures agree with the card" in shown
    for row in card["evaluation"]["best"]["rows"]:
        line = next(line for line in shown.splitlines() if line.startswith(row["attack"] + " "))
        assert f"{row['accuracy']:.2%}" in line
    # the clean figure of the same images through the .pt2 program is the card's, exactly
    clean = next(line for line in shown.splitlines() if line.startswith("clean "))
    assert clean.endswith("equal")
