"""The guardrails through the service: the API on its embedded stack (SQLite migrated to head, a local
object folder) and the worker's ``JobRun`` in this process. A job shows what the checks found
(``warnings``, ``teacher_accuracy``, ``degenerate_student``) and fails with the checks' message.

The dataset's labels are drawn at random, so nothing can learn it: every teacher and every student is at
chance on it, in seconds and on any machine.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.auth import create_api_key
from service.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Any, TestClient, dict[str, str], Settings]]:
    data = tmp_path / "data"
    (data / "cifar-10-batches-py-partial").mkdir(parents=True)  # the API only checks the folder is there
    (data / "cifar-10-batches-py-partial" / "batches.meta").write_bytes(b"x")
    settings = Settings(var_dir=tmp_path / "var", data_root=data, max_upload_bytes=2_000_000)
    app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
    with TestClient(app) as client:
        with app.state.session_factory() as session:
            key = create_api_key(session, "alice")
            session.commit()
        yield app, client, {"Authorization": f"Bearer {key}"}, settings


def _unlearnable_npz() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    images = rng.integers(0, 256, size=(600, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 600)
    np.savez(buf, x=images[:500], y=labels[:500], x_test=images[500:], y_test=labels[500:])
    return buf.getvalue()


def _run(settings: Settings, job_id: str) -> str:
    from worker.lease import WorkerSettings
    from worker.tasks import JobRun

    return JobRun(job_id, settings, WorkerSettings(cancel_poll_s=0.05)).execute()


def _job(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    body = {"student": "tiny_cnn", "epochs": 2, "batch_size": 64, "val_size": 150, "attacks": ["clean"],
            "n_eval": 100, "device": "cpu", **body}
    r = client.post("/v1/jobs", headers=headers, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_jobs_show_what_the_guardrails_found(stack: Any) -> None:
    import torch

    from core.models import create_model

    app, client, alice, settings = stack
    dataset = client.post("/v1/datasets", headers=alice, files={"file": ("noise.npz", _unlearnable_npz())})
    assert dataset.status_code == 201, dataset.text
    buf = io.BytesIO()
    torch.manual_seed(0)
    torch.save(create_model("tiny_cnn", 4).state_dict(), buf)
    teacher = client.post("/v1/teachers", headers=alice, files={"file": ("t.pt", buf.getvalue())},
                          data={"arch": "tiny_cnn", "num_classes": "4"})
    assert teacher.status_code == 201, teacher.text
    data_id, teacher_id = dataset.json()["id"], teacher.json()["id"]

    # A teacher at chance fails the job before training, naming normalisation; its accuracy is shown.
    misread = _job(client, alice, dataset=data_id, teacher_id=teacher_id, method="rslad",
                   method_params={"steps": 1})
    assert misread["warnings"] == [] and misread["degenerate_student"] is False  # the new fields, empty
    assert _run(settings, misread["id"]) == "failed"
    job = client.get(f"/v1/jobs/{misread['id']}", headers=alice).json()
    assert job["status"] == "failed" and job["error"].startswith("teacher check failed")
    assert "normalize" in job["error"] and str(settings.var_dir) not in job["error"]
    assert job["teacher_accuracy"] is not None and job["teacher_accuracy"] < 0.4
    assert client.get(f"/v1/jobs/{misread['id']}/metrics", headers=alice).json()["items"] == []  # no epoch

    # A student at chance fails the job at the end of training ...
    degenerate = _job(client, alice, dataset=data_id, method="natural", collapse_patience=1)
    assert _run(settings, degenerate["id"]) == "failed"
    job = client.get(f"/v1/jobs/{degenerate['id']}", headers=alice).json()
    assert "degenerate" in job["error"] and "allow_degenerate" in job["error"]
    assert any("has not learnt" in w for w in job["warnings"])

    # ... or, asked to keep going, succeeds flagged, with the warnings on the job and first in the report.
    kept = _job(client, alice, dataset=data_id, method="natural", collapse_patience=1, allow_degenerate=True)
    assert _run(settings, kept["id"]) == "succeeded"
    job = client.get(f"/v1/jobs/{kept['id']}", headers=alice).json()
    assert job["degenerate_student"] is True and job["params"]["allow_degenerate"] is True
    assert any(w.startswith("DEGENERATE STUDENT") for w in job["warnings"])
    listed = client.get("/v1/jobs", headers=alice).json()["items"]
    assert [j["degenerate_student"] for j in listed if j["id"] == kept["id"]] == [True]
    report = client.get(f"/v1/jobs/{kept['id']}/report", headers=alice).json()
    assert list(report)[:2] == ["degenerate_student", "warnings"] and report["degenerate_student"] is True
    assert report["train_config"]["lr_rule"] == "linear: 0.1 x 64/128"


def test_job_settings_are_bounded(stack: Any) -> None:
    _, client, alice, _ = stack
    body = {"student": "tiny_cnn", "method": "sat", "dataset": "cifar10-partial", "lr": 0.05,
            "warmup_epochs": 2, "collapse_patience": 0, "allow_degenerate": True}
    assert client.post("/v1/jobs", headers=alice, json=body).status_code == 201
    for change in ({"lr": 100.0}, {"warmup_epochs": 10**6}, {"collapse_patience": -1},
                   {"teacher_claimed_accuracy": 67}, {"method_params": {"steps": 10**100}},
                   {"method": "trades", "method_params": {"beta": 1e300}},
                   {"method_params": {"milestones": [5, 10**12]}}):
        r = client.post("/v1/jobs", headers=alice, json={**body, **change})
        assert r.status_code == 422, (change, r.text)
        field = next(iter(change.get("method_params") or change))
        assert field in r.text, r.text


def test_the_client_prints_the_findings_last(capsys: pytest.CaptureFixture) -> None:
    from distill_client.cli import finish
    from distill_client.models import JobOut

    chance = "best checkpoint: clean accuracy 9.00% on 300 images is chance level"
    job = JobOut.model_construct(id="j1", status="succeeded", error=None, teacher_accuracy=0.686,
                                 warnings=[chance], degenerate_student=True)
    assert finish(job) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "teacher: 68.6% clean accuracy on the check images"
    assert lines[1].startswith("warning: best checkpoint: clean accuracy 9.00%")
    assert lines[-1].startswith("DEGENERATE STUDENT")
    failed = job.model_copy(update={"status": "failed", "error": "teacher check failed: ...",
                                    "degenerate_student": False})
    assert finish(failed) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "job j1 failed: teacher check failed: ..."


def test_teacher_upload_naming_a_builtin_dataset_measures_its_accuracy(tmp_path: Path,
                                                                       shared_dir: Path) -> None:
    """The third-party CNN-A-Adv teacher uploaded without its normalisation is recorded as misread, with
    the normalisation hint, and with its normalisation as passing (real CIFAR-10 validation images)."""
    weights = shared_dir / "weights" / "abcrown_sdp_cifar_cnn_a_adv.model"
    settings = Settings(var_dir=tmp_path / "var", data_root=shared_dir / "data")
    app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
    with TestClient(app) as client:
        with app.state.session_factory() as session:
            key = create_api_key(session, "alice")
            session.commit()
        alice = {"Authorization": f"Bearer {key}"}

        def upload(**form: str) -> dict[str, Any]:
            files = {"file": ("cnn_a.model", weights.read_bytes())}
            r = client.post("/v1/teachers", headers=alice, files=files,
                            data={"arch": "cnn_a", "dataset": "cifar10-partial", **form})
            assert r.status_code == 201, r.text
            return r.json()["probe"]["accuracy_check"]

        misread = upload(claimed_accuracy="0.6")
        assert misread["measured"] and misread["n"] == 500 and misread["passed"] is False
        assert any("normalize" in w for w in misread["warnings"]), misread
        assert any("well below the claimed 60.0%" in w for w in misread["warnings"]), misread
        right = upload(normalize="0.4914,0.4824,0.4467;0.2471,0.2435,0.2616")
        assert right["passed"] is True and right["accuracy"] > 0.5 and right["warnings"] == [], right
        # Without a dataset nothing is measured (the job-start check still runs).
        r = client.post("/v1/teachers", headers=alice, files={"file": ("cnn_a.model", weights.read_bytes())},
                        data={"arch": "cnn_a", "num_classes": "10"})
        assert r.status_code == 201 and "accuracy_check" not in r.json()["probe"], r.text


def test_a_failed_jobs_error_names_no_server_path(stack: Any) -> None:
    """The data folder here is broken: core's message names the folder; the job's error must not."""
    app, client, alice, settings = stack
    job = _job(client, alice, method="sat", dataset="cifar10-partial")
    assert _run(settings, job["id"]) == "failed"
    shown = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert shown["status"] == "failed" and shown["error"], shown
    for root in (settings.data_root, settings.var_dir, settings.work_dir):
        assert str(root) not in shown["error"] and str(Path(root).resolve()) not in shown["error"], shown
    assert not re.search(r"(^|[\s'\"(])/[A-Za-z]", shown["error"]), shown["error"]  # nor any absolute path


def test_job_exports_are_chosen_and_checked_before_the_job_exists(stack: Any) -> None:
    app, client, alice, settings = stack
    job = _job(client, alice, method="sat", dataset="cifar10-partial", exports=["onnx"])
    assert job["params"]["exports"] == ["onnx"]
    assert _job(client, alice, method="sat", dataset="cifar10-partial", exports=[])["params"]["exports"] == []
    default = _job(client, alice, method="sat", dataset="cifar10-partial")["params"]["exports"]
    assert sorted(default) == ["export", "onnx", "safetensors", "torchscript"]
    for bad in (["bogus"], ["onnx", "onnx"]):
        r = client.post("/v1/jobs", headers=alice, json={"method": "sat", "dataset": "cifar10-partial",
                                                           "exports": bad})
        assert r.status_code == 422 and "export" in r.json()["detail"], r.text
