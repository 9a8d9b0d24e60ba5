"""The OpenAPI document tells the truth: schemathesis fuzzes every operation of the app on PostgreSQL + S3.

All checks (server errors, status codes, content types, headers and bodies against the document, negative
data rejected, unsupported methods, auth ignored or not, use after delete...) over the examples, coverage,
fuzzing and stateful phases, authenticated with a real API key. Seeded rows (a teacher, an uploaded
dataset, a queued job and a finished job with a report and a weights file) are offered through
schemathesis dictionaries, so about half the generated ids and references hit real rows and the rest are
random. Every endpoint added later is fuzzed the same way without touching this test.

The run is bounded by the number of examples per operation (fewer for uploads, each checked in a child
process) and stateful scenarios, about a minute on 2 cores; a timeout catches a hang. It runs the
schemathesis CLI as a child process (killed on the timeout) against uvicorn serving the app in a thread of
this process, and reads the JUnit report: every documented operation tested, no failure, no error.

Configuration decisions (in ``_config``): unknown query parameters and headers are not negative data (the
API ignores them, as HTTP APIs do); for POST /v1/jobs, GET /v1/jobs and the uploads a schema-valid request
may still be a 422, because what they check (registries, class counts, an opaque cursor, file contents)
is beyond a JSON schema; redirects are not followed (a 307 is the answer); a stream is read for two events.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest

from api.app import create_app
from service import jobs as job_state
from service.auth import create_api_key
from service.models import Job, Teacher, Tenant, new_id
from service.settings import Settings
from service.storage import job_key, teacher_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_state"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

MAX_EXAMPLES = 8  # per operation and phase
UPLOAD_EXAMPLES = 3  # per upload operation and phase: each check starts a child process
STATEFUL_SCENARIOS = 20
MAX_STEPS = 5  # per stateful scenario
RUN_TIMEOUT_S = 400  # a hang, not a slow machine: a run takes about a minute on 2 cores
SEED = 1


@dataclass
class Seeded:
    key: str
    teacher_id: str
    dataset_id: str
    queued_job: str
    finished_job: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(service_settings: Settings) -> Iterator[tuple[str, Any]]:
    """The app under uvicorn in a thread (real HTTP, so schemathesis sees what a client sees)."""
    import uvicorn

    app = create_app(service_settings, enqueue=lambda _: None, revoke=lambda _: None)  # jobs stay queued
    app.state.sse_poll_seconds = 0.05
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="fuzzed-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _npz() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8), y=np.arange(40) % 10)
    return buf.getvalue()


def _seed(base: str, app: Any) -> Seeded:
    """A teacher row (no worker loads it), a dataset and two jobs made through the API (which also pays
    the first upload check's and the first job's start-up costs before the fuzzer's clock runs), and one
    job taken to ``succeeded`` the way the worker does, with a report and a weights file."""
    store = app.state.store
    with app.state.session_factory() as session:
        key = create_api_key(session, "fuzz")
        tenant = session.query(Tenant).filter_by(name="fuzz").one()
        teacher_id = new_id()
        object_key = teacher_key(tenant.id, teacher_id, "t.pt")
        store.put_stream(object_key, io.BytesIO(b"weights"))
        session.add(
            Teacher(
                id=teacher_id, tenant_id=tenant.id, name="t", format="state_dict", arch="tiny_cnn",
                num_classes=10, normalize=None, sha256="0" * 64, size_bytes=7, num_params=1, probe={},
                object_key=object_key,
            )
        )
        session.commit()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=180) as client:
        r = client.post("/v1/datasets", files={"file": ("d.npz", _npz())}, data={"name": "d"})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        body = {"teacher_id": teacher_id, "dataset": dataset_id, "student": "tiny_cnn", "val_size": 5}
        jobs = []
        for _ in range(2):
            r = client.post("/v1/jobs", json={**body, "epochs": 1, "n_eval": 8})
            assert r.status_code == 201, r.text
            jobs.append(r.json()["id"])
    with app.state.session_factory() as session:
        finished = session.get(Job, jobs[1])
        job_state.start_attempt(session, finished)
        job_state.upsert_metrics(session, finished.id, 0, {"val_pgd": 0.25})
        job_state.transition(session, finished, "evaluating")
        report = json.dumps({"final": {"best": {"clean": 0.5}}}).encode()
        for name, blob in (("report.json", report), ("student_best.pt", b"w" * 100)):
            object_key = job_key(tenant.id, finished.id, name)
            store.put_stream(object_key, io.BytesIO(blob))
            job_state.record_artifact(session, finished.id, name, object_key, len(blob), "2" * 64)
        job_state.transition(session, finished, "succeeded")
        session.commit()
    return Seeded(key, teacher_id, dataset_id, jobs[0], jobs[1])


def _config(seeded: Seeded) -> str:
    """schemathesis.toml: every check, every phase, the key, and dictionaries of real ids."""
    jobs = json.dumps([seeded.queued_job, seeded.finished_job])
    accepted = json.dumps(["2xx", "401", "404", "409", "413", "422", "429"])
    return f"""
headers = {{ Authorization = "Bearer {seeded.key}" }}
seed = {SEED}
request-timeout = 30  # generous: a loaded CI machine is not a failure
max-redirects = 0
max-stream-events = 2  # a stream of a queued job never ends: read its first two events
suppress-health-check = ["all"]

[checks]
enabled = true

[generation]
max-examples = {MAX_EXAMPLES}
# Unknown query parameters and headers are ignored, as HTTP APIs do (proxies add headers): sending them is
# not negative data. (With them, schemathesis 4.32 also misreads an integer header as a string.)
allow-extra-parameters = false

[phases]
enabled = true

[phases.stateful]
max-steps = {MAX_STEPS}
generation.max-examples = {STATEFUL_SCENARIOS}

[dictionaries.jobs]
values = {jobs}

[dictionaries.teachers]
values = ["{seeded.teacher_id}"]

[dictionaries.datasets]
values = ["{seeded.dataset_id}", "cifar10-partial"]

[dictionaries.artifacts]
values = ["report.json", "student_best.pt"]

[parameters]
"path.job_id" = {{ dictionary = "jobs", probability = 0.5 }}
"path.teacher_id" = {{ dictionary = "teachers", probability = 0.5 }}
"path.dataset_id" = {{ dictionary = "datasets", probability = 0.5 }}
"path.name" = {{ dictionary = "artifacts", probability = 0.5 }}
"body.teacher_id" = {{ dictionary = "teachers", probability = 0.5 }}
"body.dataset" = {{ dictionary = "datasets", probability = 0.5 }}

# What these operations check goes beyond what a JSON schema can say (registries of students and methods,
# class counts, an opaque cursor, the content of an uploaded file): a schema-valid request may be a 422.
[[operations]]
include-name = ["POST /v1/jobs", "GET /v1/jobs"]
checks.positive_data_acceptance.expected-statuses = {accepted}

# Each upload is checked in a child process of its own: fewer examples keep the run short.
[[operations]]
include-name = ["POST /v1/teachers", "POST /v1/datasets"]
checks.positive_data_acceptance.expected-statuses = {accepted}
generation.max-examples = {UPLOAD_EXAMPLES}
"""


def test_openapi_document_matches_the_api(served: tuple[str, Any], tmp_path: Path) -> None:
    base, app = served
    seeded = _seed(base, app)
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(seeded))
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    started = time.monotonic()
    run = subprocess.run(
        [
            cli, "--config-file", str(config), "--no-color", "run", f"{base}/openapi.json",
            "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1",
            "--report", "junit", "--report-dir", str(tmp_path / "report"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    output = run.stdout + run.stderr
    print(output, f"schemathesis ran {time.monotonic() - started:.0f} s", sep="\n")
    [report] = (tmp_path / "report").glob("junit*.xml")
    suite = ElementTree.parse(report).getroot()
    tested = {case.get("name") for case in suite.iter("testcase")}
    documented = {
        f"{method.upper()} {path}"
        for path, item in app.openapi()["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    }
    assert documented <= tested, f"not fuzzed: {sorted(documented - tested)}"
    failed = [case.get("name") for case in suite.iter("testcase") if len(case)]  # a failure or error child
    assert not failed and run.returncode == 0, f"{failed}\n{output[-20000:]}"
