"""The client library alone, as a user installs it: a fresh virtual environment with only
``pip install ./clients/python`` (httpx, pydantic), no torch and no server code, drives the real stack
(the API under uvicorn, a Celery worker, PostgreSQL, Redis, S3): it uploads a teacher, creates a job,
streams its events, waits for it and downloads the student."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.integration.conftest_worker import Stack, WorkerServices, start_stack, worker_services
except ImportError:  # pytest's default import mode puts this folder itself on sys.path
    from conftest_worker import Stack, WorkerServices, start_stack, worker_services  # type: ignore[no-redef]

__all__ = ["worker_services"]  # a fixture: imported so that pytest finds it

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]

# Run by the virtual environment's python, in a folder outside the checkout (nothing of the server can
# be imported by accident). Prints one JSON line with what it saw.
SCRIPT = r'''
import importlib.util, json, sys
from distill_client import Client, EventOut

url, key, teacher_path, out = sys.argv[1:5]
missing = [m for m in ("torch", "fastapi", "sqlalchemy", "api", "core", "service")
           if importlib.util.find_spec(m) is not None]
with Client(url, key) as client:
    teacher = client.teachers.upload(teacher_path, arch="tiny_cnn", dataset="cifar10-partial")
    job = client.jobs.create(
        teacher_id=teacher.id, student="tiny_cnn", method="rslad", dataset="cifar10-partial", epochs=1,
        batch_size=64, train_subset=256, val_size=100, method_params={"steps": 2}, attacks=["clean"],
        n_eval=64, device="cpu", allow_degenerate=True,
    )
    streamed = [e for e in client.jobs.stream_events(job.id) if isinstance(e, EventOut)]
    done = client.jobs.wait(job.id, poll_s=0.5, timeout=240)
    paths = client.jobs.download(job.id, out)
    artifacts = {a.name: a.sha256 for a in client.jobs.artifacts(job.id)}
    report = client.jobs.report(job.id)
print(json.dumps({
    "importable": missing,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "api", "core")),
    "teacher": teacher.id, "job": job.id, "status": done.status, "error": done.error,
    "statuses": [e.payload.get("status") for e in streamed if e.type == "status"],
    "event_ids": [e.id for e in streamed],
    "files": sorted(p.name for p in paths), "artifacts": artifacts,
    "clean_rows": [r.attack for r in report.final["best"].rows],
}))
'''


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding only the client package and its own dependencies (once a session).

    It is installed from a copy of the two paths the client's pyproject names (clients/python and
    distill_client/), so the build leaves nothing in the checkout."""
    root = tmp_path_factory.mktemp("client-venv")
    src = root / "src"
    shutil.copytree(REPO / "clients" / "python", src / "clients" / "python",
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    shutil.copytree(REPO / "distill_client", src / "distill_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(src / "clients" / "python")],
        capture_output=True, text=True, timeout=400, cwd=root,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def stack(worker_services: WorkerServices, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(worker_services, tmp_path_factory.mktemp("stack")) as s:
        s.start_worker()
        yield s


def test_the_client_alone_runs_a_job_end_to_end(client_venv: Path, stack: Stack, tmp_path: Path) -> None:
    import torch

    from core.models import create_model

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("tiny_cnn", 10).state_dict(), teacher)
    (tmp_path / "run").mkdir()
    script = tmp_path / "run" / "use_client.py"
    script.write_text(SCRIPT)
    key = stack.client.http.headers["Authorization"].split()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    result = subprocess.run(
        [str(client_venv), str(script), str(stack.client.http.base_url), key, str(teacher),
         str(tmp_path / "out")],
        capture_output=True, text=True, timeout=400, cwd=tmp_path / "run", env=env,
    )
    assert result.returncode == 0, (result.stderr[-4000:], stack.worker_log())
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    assert seen["importable"] == [] and seen["modules"] == []  # httpx and pydantic only
    assert seen["status"] == "succeeded", (seen["error"], stack.worker_log())
    assert seen["statuses"] == ["queued", "running", "evaluating", "succeeded"]
    assert seen["event_ids"] == sorted(set(seen["event_ids"]))  # in order, none twice
    assert seen["files"] == sorted(seen["artifacts"])
    wanted = {"report.json", "student_best.pt", "student_last.pt", "model_card.json", "student_best.onnx"}
    assert wanted <= set(seen["files"])
    assert seen["clean_rows"] == ["clean"]
    import hashlib

    best = (tmp_path / "out" / "student_best.pt").read_bytes()
    assert hashlib.sha256(best).hexdigest() == seen["artifacts"]["student_best.pt"]
    weights = torch.load(tmp_path / "out" / "student_best.pt", map_location="cpu", weights_only=True)
    create_model("tiny_cnn", 10).load_state_dict(weights)  # the student, loadable as the architecture

    cli = client_venv.parent / "distill-client"  # the command comes with the package
    listed = subprocess.run(
        [str(cli), "--url", str(stack.client.http.base_url), "--key", key, "teacher", "list"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path / "run", env=env,
    )
    assert listed.returncode == 0, listed.stderr
    assert [t["id"] for t in json.loads(listed.stdout)] == [seen["teacher"]]
    watched = subprocess.run(  # no tqdm in this environment: the progress is plain lines
        [str(cli), "--url", str(stack.client.http.base_url), "--key", key, "job", "watch", seen["job"]],
        capture_output=True, text=True, timeout=60, cwd=tmp_path / "run", env=env,
    )
    assert watched.returncode == 0, watched.stderr
    assert f"{seen['job'][:8]} succeeded 100%" in watched.stderr
    assert "status: succeeded" in watched.stderr
    verify = subprocess.run(  # verify re-runs attacks: without torch it says so and exits 2
        [str(cli), "--url", str(stack.client.http.base_url), "--key", key, "job", "verify", seen["job"],
         "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "verify")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path / "run", env=env,
    )
    assert verify.returncode == 2, (verify.stdout, verify.stderr)
    assert "needs torch" in verify.stderr
