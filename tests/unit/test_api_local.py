"""The API on its embedded stack (SQLite + a local object folder), no broker and no worker.

Jobs stay queued: the app gets a recording ``enqueue``. Every bad input must give a 4xx JSON ``detail``
and leave nothing behind: no row, no object, no temporary upload file.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app
from service import jobs as job_state
from service.auth import create_api_key
from service.models import ApiKey, Artifact, Dataset, Job, JobEvent, JobMetric, Teacher
from service.settings import Settings
from service.storage import LocalStore, job_key, validate_key

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAX_UPLOAD = 300_000


# ---------------------------------------------------------------- fixtures


class Recorder:
    """Stands in for the Celery queue."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.revoked: list[str] = []
        self.fail: Exception | None = None

    def enqueue(self, job_id: str) -> None:
        if self.fail:
            raise self.fail
        self.enqueued.append(job_id)

    def revoke(self, job_id: str) -> None:
        self.revoked.append(job_id)


def _settings(root: Path) -> Settings:
    data = root / "data"
    # The API only checks that a builtin's folder is there; no job runs here.
    for folder in ("cifar-10-batches-py-partial", "cifar-100-python-partial"):
        (data / folder).mkdir(parents=True)
        (data / folder / "batches.meta").write_bytes(b"x")
    return Settings(var_dir=root / "var", data_root=data, max_upload_bytes=MAX_UPLOAD)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return _settings(tmp_path)


@pytest.fixture
def queue() -> Recorder:
    return Recorder()


@pytest.fixture
def app(settings: Settings, queue: Recorder) -> Any:
    app = create_app(settings, enqueue=queue.enqueue, revoke=queue.revoke)
    app.state.sse_poll_seconds = 0.02
    return app


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def _key(app: Any, tenant: str) -> dict[str, str]:
    with app.state.session_factory() as session:
        key = create_api_key(session, tenant)
        session.commit()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def alice(app: Any, client: TestClient) -> dict[str, str]:
    return _key(app, "alice")


@pytest.fixture
def bob(app: Any, client: TestClient) -> dict[str, str]:
    return _key(app, "bob")


@pytest.fixture(scope="module")
def tiny_state_dict() -> bytes:
    import torch

    from core.models import create_model

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(create_model("tiny_cnn", 10).state_dict(), buf)
    return buf.getvalue()


def _npz(n: int = 60, classes: int = 10, **extra: Any) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8),
        "y": np.arange(n) % classes,
        **extra,
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _rows(app: Any, model: type) -> int:
    with app.state.session_factory() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def _objects(app: Any) -> list[str]:
    return app.state.store.list_keys()


def _nothing_left(app: Any, settings: Settings) -> None:
    assert _rows(app, Teacher) == 0
    assert _rows(app, Dataset) == 0
    assert _objects(app) == []
    assert not settings.upload_dir.exists() or not any(settings.upload_dir.iterdir())


def _upload_teacher(client: TestClient, headers: dict[str, str], content: bytes, **form: Any) -> Any:
    form.setdefault("arch", "tiny_cnn")
    form.setdefault("dataset", "cifar10-partial")
    return client.post("/v1/teachers", headers=headers, files={"file": ("teacher.pt", content)}, data=form)


@pytest.fixture
def teacher(client: TestClient, alice: dict[str, str], tiny_state_dict: bytes) -> dict[str, Any]:
    r = _upload_teacher(client, alice, tiny_state_dict, name="tiny")
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One app for the many cases that must all fail (so they cannot disturb each other): fewer startups."""
    settings = _settings(tmp_path_factory.mktemp("shared"))
    queue = Recorder()
    app = create_app(settings, enqueue=queue.enqueue, revoke=queue.revoke)
    with TestClient(app) as client:
        yield SimpleNamespace(
            app=app, client=client, settings=settings, queue=queue, alice=_key(app, "alice")
        )


@pytest.fixture(scope="module")
def teacher_env(
    tmp_path_factory: pytest.TempPathFactory, tiny_state_dict: bytes
) -> Iterator[SimpleNamespace]:
    settings = _settings(tmp_path_factory.mktemp("teacher_env"))
    queue = Recorder()
    app = create_app(settings, enqueue=queue.enqueue, revoke=queue.revoke)
    with TestClient(app) as client:
        alice = _key(app, "alice")
        teacher = _upload_teacher(client, alice, tiny_state_dict).json()
        yield SimpleNamespace(
            app=app, client=client, settings=settings, queue=queue, alice=alice, teacher=teacher
        )


def _job_body(teacher_id: str | None, **overrides: Any) -> dict[str, Any]:
    body = {"teacher_id": teacher_id, "student": "tiny_cnn", "method": "rslad", "dataset": "cifar10-partial"}
    body.update(epochs=2, batch_size=32, n_eval=16, attacks=["clean", "fgsm"])
    body.update(overrides)
    return body


@pytest.fixture
def job(client: TestClient, alice: dict[str, str], teacher: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs", headers=alice, json=_job_body(teacher["id"]))
    assert r.status_code == 201, r.text
    return r.json()


# ---------------------------------------------------------------- health, docs, auth


def test_health_readiness_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/teachers", "/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}/events", "/readyz"):
        assert path in paths


def test_readiness_names_what_failed(client: TestClient, app: Any) -> None:
    def broken() -> None:
        raise ConnectionError("broker is down")

    app.state.broker_ping = broken
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert "broker is down" in body["checks"]["broker"]
    assert body["checks"]["database"] == "ok"


@pytest.mark.parametrize(
    "header",
    [None, "Bearer rd_00000000_nope", "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer "],
)
def test_missing_or_bad_key_is_401(shared: SimpleNamespace, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    r = shared.client.get("/v1/teachers", headers=headers)
    assert r.status_code == 401
    assert "API key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_dev_key_is_created_once_and_works(client: TestClient, settings: Settings, app: Any) -> None:
    path = settings.var_dir / "dev-api-key"
    key = path.read_text().strip()
    assert key.startswith("rd_")
    assert path.stat().st_mode & 0o777 == 0o600
    assert client.get("/v1/teachers", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with app.state.session_factory() as session:
        stored = session.scalars(sa.select(ApiKey)).all()
    assert len(stored) == 1 and key not in {k.key_hash for k in stored}  # only the hash is kept
    again = create_app(settings)
    with TestClient(again):
        pass
    assert _rows(app, ApiKey) == 1 and path.read_text().strip() == key


def test_revoked_key_is_refused(client: TestClient, app: Any, alice: dict[str, str]) -> None:
    from service.auth import revoke_api_key

    assert client.get("/v1/jobs", headers=alice).status_code == 200
    prefix = alice["Authorization"].split("_")[1]
    with app.state.session_factory() as session:
        assert revoke_api_key(session, prefix) == 1
        session.commit()
    assert client.get("/v1/jobs", headers=alice).status_code == 401


def test_status_poll_checks_the_key_before_the_job(
    client: TestClient, app: Any, alice: dict[str, str], bob: dict[str, str], job: dict[str, Any]
) -> None:
    """The poll is its own query (service.polling): the same 401/404 rules as every other endpoint."""
    from service.auth import revoke_api_key

    path = f"/v1/jobs/{job['id']}"
    for headers in ({}, {"Authorization": "Bearer rd_00000000_nope"}, {"Authorization": "Bearer x" * 300}):
        for url in (path, "/v1/jobs/not-an-id", "/v1/jobs/" + "0" * 32):
            r = client.get(url, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (url, headers)
    for url in ("/v1/jobs/not-an-id", "/v1/jobs/" + "0" * 32, "/v1/jobs/" + "A" * 32):
        r = client.get(url, headers=alice)
        assert r.status_code == 404 and "not found" in r.json()["detail"], url
    assert client.get(path, headers=bob).status_code == 404
    assert client.get(path, headers=alice).status_code == 200
    with app.state.session_factory() as session:
        assert revoke_api_key(session, alice["Authorization"].split("_")[1]) == 1
        session.commit()
    assert client.get(path, headers=alice).status_code == 401


def test_status_poll_shows_what_the_listing_shows(
    client: TestClient, app: Any, alice: dict[str, str], job: dict[str, Any]
) -> None:
    """One row read by Core on the async engine, the other by the ORM: the same JSON, types included."""
    with app.state.session_factory() as session:
        row = session.get(Job, job["id"])
        row.progress = {"epoch": 1, "epochs": 2, "fraction": 0.5, "eta_s": 12.5}
        row.latest_metrics = {"loss": 1.25, "val_robust_acc": None, "nested": {"a": [1, 2]}}
        session.commit()
    polled = client.get(f"/v1/jobs/{job['id']}", headers=alice)
    assert polled.status_code == 200 and polled.headers["content-type"] == "application/json"
    listed = client.get("/v1/jobs", headers=alice).json()["items"]
    assert polled.json() == next(item for item in listed if item["id"] == job["id"])
    assert polled.json()["progress"]["fraction"] == 0.5 and polled.json()["created_at"].endswith("Z")


# ---------------------------------------------------------------- teachers


def test_teacher_upload_roundtrip(
    client: TestClient, app: Any, alice: dict[str, str], tiny_state_dict: bytes
) -> None:
    import hashlib

    r = _upload_teacher(client, alice, tiny_state_dict, normalize="cifar10", name="my teacher")
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["name"] == "my teacher"
    assert t["sha256"] == hashlib.sha256(tiny_state_dict).hexdigest()
    assert t["size_bytes"] == len(tiny_state_dict)
    assert (t["format"], t["arch"], t["num_classes"]) == ("state_dict", "tiny_cnn", 10)
    assert t["num_params"] > 0 and t["probe"]["output_shape"] == [2, 10]
    assert t["normalize"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    [key] = _objects(app)
    assert key.startswith("tenants/") and f"/teachers/{t['id']}/teacher.pt" in key
    assert b"".join(app.state.store.iter_bytes(key)) == tiny_state_dict

    assert client.get(f"/v1/teachers/{t['id']}", headers=alice).json() == t
    assert [x["id"] for x in client.get("/v1/teachers", headers=alice).json()["items"]] == [t["id"]]
    assert client.delete(f"/v1/teachers/{t['id']}", headers=alice).status_code == 204
    assert client.get(f"/v1/teachers/{t['id']}", headers=alice).status_code == 404
    assert _objects(app) == [] and _rows(app, Teacher) == 0


def test_torchscript_and_safetensors_teachers(client: TestClient, alice: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save

    from core.models import create_model

    model = create_model("tiny_cnn", 10).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    r = client.post(
        "/v1/teachers", headers=alice, files={"file": ("m.pt", buf.getvalue())}, data={"num_classes": 10}
    )
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "torchscript" and r.json()["arch"] is None

    blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
    r = client.post(
        "/v1/teachers",
        headers=alice,
        files={"file": ("m.safetensors", blob)},
        data={"arch": "tiny_cnn", "format": "safetensors"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "safetensors" and r.json()["num_classes"] == 10


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _bad_teacher_cases(tmp: Path, state_dict: bytes) -> dict[str, tuple[bytes, dict[str, Any], int, str]]:
    import torch

    marker = tmp / "pwned"
    torch_pickle = io.BytesIO()
    torch.save({"model": _Payload(marker)}, torch_pickle)
    return {
        "not a model": (b"hello, this is not a model" * 50, {}, 422, "not"),
        "plain pickle with code": (pickle.dumps(_Payload(marker), protocol=2), {}, 422, "refused"),
        "torch.save with code": (torch_pickle.getvalue(), {}, 422, "refused"),
        "wrong architecture": (state_dict, {"arch": "resnet18"}, 422, "does not fit"),
        "unknown architecture": (state_dict, {"arch": "no_such_net"}, 422, "no_such_net"),
        "no architecture": (state_dict, {"arch": ""}, 422, "architecture"),
        "class mismatch": (state_dict, {"dataset": "cifar100-partial"}, 422, "100"),
        "num_classes contradicts dataset": (state_dict, {"num_classes": 7}, 422, "contradicts"),
        "bad normalize": (state_dict, {"normalize": "1,2;3"}, 422, "normalisation"),
        "unknown dataset": (state_dict, {"dataset": "imagenet"}, 422, "unknown dataset"),
        "unknown format": (state_dict, {"format": "onnx"}, 422, "format"),
        "empty file": (b"", {}, 422, "empty"),
        "too large": (b"\0" * (MAX_UPLOAD + 1), {}, 413, "RD_MAX_UPLOAD_BYTES"),
    }


BAD_TEACHERS = [
    "not a model",
    "plain pickle with code",
    "torch.save with code",
    "wrong architecture",
    "unknown architecture",
    "no architecture",
    "class mismatch",
    "num_classes contradicts dataset",
    "bad normalize",
    "unknown dataset",
    "unknown format",
    "empty file",
    "too large",
]


@pytest.mark.parametrize("case", BAD_TEACHERS)
def test_bad_teacher_uploads_leave_nothing(
    case: str, shared: SimpleNamespace, tiny_state_dict: bytes, tmp_path: Path
) -> None:
    content, form, status, words = _bad_teacher_cases(tmp_path, tiny_state_dict)[case]
    r = _upload_teacher(shared.client, shared.alice, content, **form)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()
    assert not (tmp_path / "pwned").exists()
    _nothing_left(shared.app, shared.settings)


def test_upload_over_limit_without_content_length_is_cut_off(
    client: TestClient, app: Any, settings: Settings, alice: dict[str, str]
) -> None:
    """A chunked body has no Content-Length: the server stops reading once its bytes pass the limit.

    Driven at the ASGI level, because the test client buffers a whole request before the app sees it."""
    import asyncio

    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.pt"\r\n\r\n'
    chunks = [head] + [b"\0" * 100_000] * 100 + [b"\r\n--b--\r\n"]
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [
        (b"authorization", alice["Authorization"].encode()),
        (b"content-type", b"multipart/form-data; boundary=b"),
        (b"transfer-encoding", b"chunked"),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/teachers",
        "raw_path": b"/v1/teachers",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and "RD_MAX_UPLOAD_BYTES" in json.loads(body)["detail"]
    limit_chunks = (MAX_UPLOAD + (1 << 20)) // 100_000 + 2
    assert pulled <= limit_chunks < len(chunks)  # stopped early, not after all 10 MB
    _nothing_left(app, settings)


def test_upload_over_limit_through_the_client_is_413(
    client: TestClient, app: Any, settings: Settings, alice: dict[str, str]
) -> None:
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.pt"\r\n\r\n'
        yield b"\0" * (MAX_UPLOAD + 10)
        yield b"\r\n--b--\r\n"

    r = client.post(
        "/v1/teachers", headers={**alice, "Content-Type": "multipart/form-data; boundary=b"}, content=body()
    )
    assert r.status_code == 413 and "RD_MAX_UPLOAD_BYTES" in r.json()["detail"]
    _nothing_left(app, settings)


def test_huge_content_length_is_refused_before_reading(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/jobs", headers={**alice, "Content-Length": str(10**12)}, content=b"{}")
    assert r.status_code == 413


def test_teacher_in_use_cannot_be_deleted(
    client: TestClient, app: Any, alice: dict[str, str], teacher: dict[str, Any], job: dict[str, Any]
) -> None:
    r = client.delete(f"/v1/teachers/{teacher['id']}", headers=alice)
    assert r.status_code == 409 and job["id"] in r.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 200
    assert client.delete(f"/v1/teachers/{teacher['id']}", headers=alice).status_code == 204
    # The finished job keeps its record; its teacher reference is cleared.
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["teacher_id"] is None


# ---------------------------------------------------------------- datasets


def test_dataset_listing_and_upload(client: TestClient, app: Any, alice: dict[str, str]) -> None:
    listing = client.get("/v1/datasets", headers=alice).json()
    available = {d["name"]: d["available"] for d in listing["builtin"]}
    assert available == {
        "cifar10": False,
        "cifar100": False,
        "cifar10-partial": True,
        "cifar100-partial": True,
    }
    assert listing["uploaded"] == []

    r = client.post("/v1/datasets", headers=alice, files={"file": ("mine.npz", _npz(50, 5))})
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["name"], d["num_classes"], d["n_train"] + d["n_test"]) == ("mine", 5, 50)
    assert _objects(app) == [f"tenants/{_tenant_id(app, 'alice')}/datasets/{d['id']}.npz"]
    assert client.get("/v1/datasets", headers=alice).json()["uploaded"] == [d]
    assert client.get(f"/v1/datasets/{d['id']}", headers=alice).json() == d
    assert client.delete(f"/v1/datasets/{d['id']}", headers=alice).status_code == 204
    assert _objects(app) == [] and _rows(app, Dataset) == 0


def _tenant_id(app: Any, name: str) -> str:
    from service.models import Tenant

    with app.state.session_factory() as session:
        return session.scalar(sa.select(Tenant.id).where(Tenant.name == name))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not an npz at all", "npz"),
        (b"", "empty"),
        ("missing y", "'y'"),
        ("object array", "unpickling"),
        ("float out of range", "[0, 1]"),
    ],
    ids=["junk", "empty", "missing-y", "object-array", "float-range"],
)
def test_bad_dataset_uploads_leave_nothing(content: Any, words: str, shared: SimpleNamespace) -> None:
    if content == "missing y":
        buf = io.BytesIO()
        np.savez(buf, x=np.zeros((10, 8, 8, 3), np.uint8))
        content = buf.getvalue()
    elif content == "object array":
        buf = io.BytesIO()
        np.savez(buf, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
        content = buf.getvalue()
    elif content == "float out of range":
        buf = io.BytesIO()
        np.savez(buf, x=np.full((10, 3, 8, 8), 2.0, np.float32), y=np.arange(10) % 2)
        content = buf.getvalue()
    r = shared.client.post("/v1/datasets", headers=shared.alice, files={"file": ("d.npz", content)})
    assert r.status_code == 422, r.text
    assert words.lower() in r.json()["detail"].lower()
    _nothing_left(shared.app, shared.settings)


# ---------------------------------------------------------------- jobs: creation and validation


def test_create_job_resolves_and_enqueues(
    client: TestClient, queue: Recorder, job: dict[str, Any], teacher: dict[str, Any]
) -> None:
    assert queue.enqueued == [job["id"]]
    assert job["status"] == "queued" and job["attempts"] == 0
    assert (job["teacher_id"], job["student"], job["method"], job["dataset"]) == (
        teacher["id"],
        "tiny_cnn",
        "rslad",
        "cifar10-partial",
    )
    p = job["params"]
    assert p["teacher_arch"] == "tiny_cnn" and p["teacher_format"] == "state_dict"
    assert p["teacher_path"] is None and p["data_root"] is None  # filled in by the worker
    assert (p["epochs"], p["batch_size"], p["n_eval"], p["attacks"]) == (2, 32, 16, ["clean", "fgsm"])
    assert job["progress"]["epochs"] == 2
    from core.pipeline import DistillConfig

    DistillConfig.from_dict({**p, "teacher_path": "t.pt", "data_root": "/data"}).validate()


def test_several_students_in_one_job(
    client: TestClient, alice: dict[str, str], teacher: dict[str, Any]
) -> None:
    students = [
        {"student": "tiny_cnn", "method": "rslad", "method_params": {"steps": 1}},
        {"student": "tiny_cnn", "method": "sat", "name": "sat-baseline"},
    ]
    body = {**_job_body(teacher["id"]), "students": students}
    del body["epochs"]
    r = client.post("/v1/jobs", headers=alice, json=body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert (job["student"], job["method"]) == ("tiny_cnn", "rslad")
    assert job["progress"]["epochs"] == 300  # the longest of the students' schedules (RSLAD 300, SAT 100)
    from core.pipeline import DistillConfig

    cfg = DistillConfig.from_dict({**job["params"], "teacher_path": "t.pt", "data_root": "/data"})
    cfg.validate()
    assert list(cfg.student_configs()) == ["tiny_cnn-rslad", "sat-baseline"]


def test_later_methods_are_accepted_and_bounded(
    client: TestClient, alice: dict[str, str], teacher: dict[str, Any]
) -> None:
    """AdaAD, ABSLD and RSLAD with the IGDM add-on validate like the others, their new bounds included."""
    for method, params in (("adaad", {"igdm_weight": 20.0}), ("absld", {"temp_rate": 0.05}),
                           ("rslad", {"igdm_weight": 1.0, "igdm_ramp_epochs": 2})):
        r = client.post("/v1/jobs", headers=alice,
                        json=_job_body(teacher["id"], method=method, method_params=params))
        assert r.status_code == 201, r.text
        assert (r.json()["method"], r.json()["params"]["method_params"]) == (method, params)
    for method, params, words in (("adaad", {"igdm_weight": -1}, "igdm_weight"),
                                  ("absld", {"temp_min": 2.0}, "temp_min")):
        r = client.post("/v1/jobs", headers=alice,
                        json=_job_body(teacher["id"], method=method, method_params=params))
        assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_teacher_free_method_needs_no_teacher(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat"))
    assert r.status_code == 201, r.text
    assert r.json()["teacher_id"] is None and r.json()["progress"]["epochs"] == 2


def test_method_default_epochs_are_reported(client: TestClient, alice: dict[str, str]) -> None:
    body = _job_body(None, method="sat")
    del body["epochs"]
    r = client.post("/v1/jobs", headers=alice, json=body)
    assert r.status_code == 201
    assert r.json()["params"]["epochs"] is None and r.json()["progress"]["epochs"] > 2


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1001}, "epochs"),
        ({"eps": 0}, "eps"),
        ({"eps": 0.6}, "eps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5000}, "batch_size"),
        ({"n_eval": 0}, "n_eval"),
        ({"val_size": -1}, "val_size"),
        ({"seed": -1}, "seed"),
        ({"attacks": []}, "attacks"),
        ({"epochz": 3}, "epochz"),
        ({"method": "no_such_method"}, "known: natural"),
        ({"student": "no_such_net"}, "known:"),
        ({"attacks": ["clean", "laser"]}, "laser"),
        ({"method_params": {"no_such_param": 1}}, "no_such_param"),
        ({"method_params": {"temperature": -1}}, "temperature"),
        ({"teacher_id": None}, "distils from a teacher"),
        ({"dataset": "cifar100-partial"}, "classes"),
        ({"dataset": "imagenet"}, "unknown dataset"),
        ({"dataset": "cifar10"}, "not available"),
        ({"device": "tpu"}, "device"),
        ({"students": []}, "students"),
        ({"students": [{"student": "tiny_cnn"}]}, "method"),
        ({"students": [{"student": "tiny_cnn", "method": "rslad", "name": "../x"}]}, "name"),
        ({"students": [{"student": "tiny_cnn", "method": "nope"}]}, "unknown method 'nope'"),
        ({"students": [{"student": "nope", "method": "sat"}]}, "unknown student 'nope'"),
        ({"students": [{"student": "tiny_cnn", "method": "sat"}] * 2}, "named"),
        ({"teacher_id": None, "students": [{"student": "tiny_cnn", "method": "ard"}]}, "distils from"),
    ],
)
def test_bad_job_requests_are_422(
    overrides: dict[str, Any], words: str, teacher_env: SimpleNamespace
) -> None:
    body = _job_body(teacher_env.teacher["id"])
    body.update(overrides)
    r = teacher_env.client.post("/v1/jobs", headers=teacher_env.alice, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail
    assert _rows(teacher_env.app, Job) == 0 and teacher_env.queue.enqueued == []


def test_unknown_method_lists_known_names(client: TestClient, alice: dict[str, str], teacher: dict) -> None:
    detail = client.post("/v1/jobs", headers=alice, json=_job_body(teacher["id"], method="x")).json()[
        "detail"
    ]
    for name in ("rslad", "sat", "trades", "ard"):
        assert name in detail


def test_malformed_json_is_422(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/jobs", headers={**alice, "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)


def test_odd_inputs_are_4xx_not_500(
    client: TestClient, alice: dict[str, str], tiny_state_dict: bytes
) -> None:
    for url in (
        "/v1/jobs/nope",
        "/v1/teachers/%00",
        "/v1/datasets/" + "f" * 31 + "%00",
        "/v1/jobs/" + "a" * 32,
    ):
        r = client.get(url, headers=alice)
        assert r.status_code in (404, 422), url
    r = _upload_teacher(client, alice, tiny_state_dict, name="bad\x00name")
    assert r.status_code == 422 and "control characters" in r.json()["detail"]
    nan = b'{"method": "sat", "dataset": "cifar10-partial", "method_params": {"beta": NaN}}'
    r = client.post("/v1/jobs", headers={**alice, "Content-Type": "application/json"}, content=nan)
    assert r.status_code == 422 and "finite" in r.json()["detail"]
    r = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat", method_params={"x\x00": 1}))
    assert r.status_code == 422
    jid = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat")).json()["id"]
    assert client.get(f"/v1/jobs/{jid}/events", headers=alice, params={"after": 2**70}).status_code == 422
    assert client.post("/v1/jobs", headers=alice, data={"x": "1"}).status_code == 422
    assert client.post("/v1/teachers", headers=alice, json={"file": "x"}).status_code == 422
    assert _rows(client.app, Teacher) == 0


def test_job_on_uploaded_dataset(client: TestClient, alice: dict[str, str], teacher: dict[str, Any]) -> None:
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", _npz(100, 10))}).json()
    r = client.post("/v1/jobs", headers=alice, json=_job_body(teacher["id"], dataset=d["id"], val_size=10))
    assert r.status_code == 201, r.text
    assert r.json()["dataset_id"] == d["id"] and r.json()["params"]["dataset"] == "npz"
    too_big = client.post(
        "/v1/jobs", headers=alice, json=_job_body(teacher["id"], dataset=d["id"], val_size=500)
    )
    assert too_big.status_code == 422 and "val_size" in too_big.json()["detail"]
    assert client.delete(f"/v1/datasets/{d['id']}", headers=alice).status_code == 409


def test_idempotency_key(
    client: TestClient, queue: Recorder, alice: dict[str, str], bob: dict[str, str], teacher: dict[str, Any]
) -> None:
    body = _job_body(None, method="sat")
    first = client.post("/v1/jobs", headers={**alice, "Idempotency-Key": "k1"}, json=body)
    again = client.post("/v1/jobs", headers={**alice, "Idempotency-Key": "k1"}, json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and queue.enqueued == [first.json()["id"]]
    other = client.post("/v1/jobs", headers={**bob, "Idempotency-Key": "k1"}, json=body)
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_idempotency_race_is_settled_by_the_unique_constraint(
    client: TestClient, app: Any, queue: Recorder, alice: dict[str, str]
) -> None:
    """Another request inserted the same key after our check missed it: we answer with its job."""
    import api.routes.jobs as routes

    headers = {**alice, "Idempotency-Key": "race"}
    first = client.post("/v1/jobs", headers=headers, json=_job_body(None, method="sat"))
    assert first.status_code == 201
    original = routes._find_idempotent
    calls = {"n": 0}

    def late(session: Any, tenant: Any, key: str) -> Any:
        calls["n"] += 1
        return None if calls["n"] == 1 else original(session, tenant, key)  # the check misses it

    routes._find_idempotent = late
    try:
        r = client.post("/v1/jobs", headers=headers, json=_job_body(None, method="sat"))
    finally:
        routes._find_idempotent = original
    assert calls["n"] == 2  # the unique constraint caught the second insert
    assert r.status_code == 200 and r.json()["id"] == first.json()["id"]
    assert queue.enqueued == [first.json()["id"]]
    assert _rows(app, Job) == 1


def test_enqueue_failure_marks_job_failed(
    client: TestClient, app: Any, queue: Recorder, alice: dict[str, str]
) -> None:
    queue.fail = ConnectionError("broker unreachable")
    r = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat"))
    assert r.status_code == 503 and "enqueue" in r.json()["detail"]
    [j] = client.get("/v1/jobs", headers=alice).json()["items"]
    assert j["status"] == "failed" and j["error"].startswith("could not enqueue: ")
    assert j["finished_at"] is not None


# ---------------------------------------------------------------- jobs: reading


def test_job_list_pagination_and_filter(client: TestClient, alice: dict[str, str]) -> None:
    ids = [
        client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat")).json()["id"]
        for _ in range(5)
    ]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice)
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/jobs", headers=alice, params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200
        seen += [j["id"] for j in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    cancelled = client.get("/v1/jobs", headers=alice, params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", headers=alice, params={"status": "bogus"}).status_code == 422
    assert client.get("/v1/jobs", headers=alice, params={"cursor": "garbage"}).status_code == 422
    assert client.get("/v1/jobs", headers=alice, params={"limit": 0}).status_code == 422


def _as_worker(app: Any, job_id: str, steps: list[Any]) -> None:
    """Write what a worker would, through service.jobs."""
    with app.state.session_factory() as session:
        job = session.get(Job, job_id)
        for step in steps:
            step(session, job)
            session.commit()


def test_progress_events_metrics_report_and_artifacts(
    client: TestClient, app: Any, alice: dict[str, str], job: dict[str, Any]
) -> None:
    jid = job["id"]
    assert client.get(f"/v1/jobs/{jid}/report", headers=alice).status_code == 404
    report = {"final": {"best": {"clean": 0.5}}}
    key = job_key(_tenant_id(app, "alice"), jid, "report.json")
    app.state.store.put_stream(key, io.BytesIO(json.dumps(report).encode()))
    blob = b"weights" * 1000
    app.state.store.put_stream(job_key(_tenant_id(app, "alice"), jid, "student_best.pt"), io.BytesIO(blob))

    _as_worker(
        app,
        jid,
        [
            lambda s, j: job_state.start_attempt(s, j),
            lambda s, j: job_state.set_progress(
                s,
                j.id,
                {
                    "type": "progress",
                    "epoch": 1,
                    "epochs": 2,
                    "step": 3,
                    "steps": 10,
                    "fraction": 0.3,
                    "eta_s": 12.5,
                },
            ),
            lambda s, j: job_state.upsert_metrics(s, j.id, 0, {"val_pgd": 0.1}),
            lambda s, j: job_state.upsert_metrics(s, j.id, 0, {"val_pgd": 0.2}),  # a replayed epoch
            lambda s, j: job_state.add_event(s, j.id, "epoch", {"epoch": 0}, dedupe_key="epoch:0"),
            lambda s, j: job_state.add_event(s, j.id, "epoch", {"epoch": 0}, dedupe_key="epoch:0"),
            lambda s, j: job_state.transition(s, j, "evaluating"),
            lambda s, j: job_state.record_artifact(s, j.id, "report.json", key, 10, "0" * 64),
            lambda s, j: job_state.record_artifact(
                s, j.id, "student_best.pt", job_key(j.tenant_id, j.id, "student_best.pt"), len(blob), "1" * 64
            ),
            lambda s, j: job_state.transition(s, j, "succeeded"),
        ],
    )
    got = client.get(f"/v1/jobs/{jid}", headers=alice).json()
    assert got["status"] == "succeeded" and got["attempts"] == 1
    assert got["progress"] == {
        "epoch": 1,
        "epochs": 2,
        "step": 3,
        "steps": 10,
        "fraction": 0.3,
        "eta_s": 12.5,
    }
    assert got["latest_metrics"] == {"epoch": 0, "val_pgd": 0.2}
    assert got["started_at"] and got["finished_at"]

    events = client.get(f"/v1/jobs/{jid}/events", headers=alice).json()
    kinds = [(e["type"], e["payload"].get("status")) for e in events["items"]]
    assert kinds == [
        ("status", "queued"),
        ("status", "running"),
        ("epoch", None),
        ("status", "evaluating"),
        ("status", "succeeded"),
    ]
    ids = [e["id"] for e in events["items"]]
    assert ids == sorted(ids) and events["next_after"] == ids[-1]
    newer = client.get(f"/v1/jobs/{jid}/events", headers=alice, params={"after": ids[1], "limit": 2}).json()
    assert [e["id"] for e in newer["items"]] == ids[2:4]

    assert client.get(f"/v1/jobs/{jid}/metrics", headers=alice).json() == {
        "items": [{"epoch": 0, "metrics": {"val_pgd": 0.2}}]
    }
    assert client.get(f"/v1/jobs/{jid}/report", headers=alice).json() == report
    names = [a["name"] for a in client.get(f"/v1/jobs/{jid}/artifacts", headers=alice).json()["items"]]
    assert names == ["report.json", "student_best.pt"]
    r = client.get(f"/v1/jobs/{jid}/artifacts/student_best.pt", headers=alice)
    assert r.status_code == 200 and r.content == blob
    assert 'filename="student_best.pt"' in r.headers["content-disposition"]
    # A local folder cannot presign: the URL is the API's own download URL.
    url = client.get(
        f"/v1/jobs/{jid}/artifacts/student_best.pt", headers=alice, params={"presign": True}
    ).json()
    assert url["expires_in"] is None and url["url"].endswith(f"/v1/jobs/{jid}/artifacts/student_best.pt")
    assert client.get(f"/v1/jobs/{jid}/artifacts/nothing.pt", headers=alice).status_code == 404
    assert client.get(f"/v1/jobs/{jid}/artifacts/..%2Fx", headers=alice).status_code in (404, 422)
    assert client.post(f"/v1/jobs/{jid}/cancel", headers=alice).status_code == 409


def test_event_stream_follows_a_running_job(
    client: TestClient, app: Any, alice: dict[str, str], job: dict[str, Any]
) -> None:
    jid = job["id"]

    def worker() -> None:
        time.sleep(0.2)
        _as_worker(
            app,
            jid,
            [
                lambda s, j: job_state.start_attempt(s, j),
                lambda s, j: job_state.set_progress(s, j.id, epoch=1, epochs=2, fraction=0.5),
                lambda s, j: job_state.transition(s, j, "evaluating"),
                lambda s, j: job_state.transition(s, j, "failed", error="boom"),
            ],
        )

    thread = threading.Thread(target=worker)
    thread.start()
    with client.stream(
        "GET", f"/v1/jobs/{jid}/events", headers={**alice, "Accept": "text/event-stream"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    thread.join()
    messages = [m for m in text.split("\n\n") if m.strip()]
    kinds = [
        line.split(": ", 1)[1] for m in messages for line in m.splitlines() if line.startswith("event: ")
    ]
    assert kinds[0] == "status" and kinds[-1] == "end"
    statuses = [
        json.loads(m.split("data: ", 1)[1])["payload"]["status"] for m in messages if "event: status" in m
    ]
    assert statuses == ["queued", "running", "evaluating", "failed"]
    assert '"status": "failed"' in messages[-1]
    # Resuming with Last-Event-ID sends only what came after.
    with client.stream(
        "GET", f"/v1/jobs/{jid}/events?stream=true", headers={**alice, "Last-Event-ID": "3"}
    ) as r:
        later = "".join(r.iter_text())
    assert "id: 1\n" not in later and "id: 4\n" in later and "event: end" in later


def test_cancel_queued_and_running_jobs(
    client: TestClient, app: Any, queue: Recorder, alice: dict[str, str], teacher: dict[str, Any]
) -> None:
    queued = client.post("/v1/jobs", headers=alice, json=_job_body(teacher["id"])).json()
    r = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=alice)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["cancel_requested"]
    assert queue.revoked == [queued["id"]]

    running = client.post("/v1/jobs", headers=alice, json=_job_body(teacher["id"])).json()
    _as_worker(app, running["id"], [lambda s, j: job_state.start_attempt(s, j)])
    r = client.post(f"/v1/jobs/{running['id']}/cancel", headers=alice)
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"]
    types = [e["type"] for e in client.get(f"/v1/jobs/{running['id']}/events", headers=alice).json()["items"]]
    assert types[-1] == "cancel_requested"
    with app.state.session_factory() as session:
        assert job_state.is_cancel_requested(session, running["id"])


# ---------------------------------------------------------------- tenant isolation


def test_other_tenants_see_nothing(
    client: TestClient,
    app: Any,
    alice: dict[str, str],
    bob: dict[str, str],
    teacher: dict[str, Any],
    job: dict[str, Any],
) -> None:
    d = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", _npz())}).json()
    jid, tid = job["id"], teacher["id"]
    key = job_key(_tenant_id(app, "alice"), jid, "report.json")
    app.state.store.put_stream(key, io.BytesIO(b"{}"))
    _as_worker(app, jid, [lambda s, j: job_state.record_artifact(s, j.id, "report.json", key, 2, "0" * 64)])

    calls = [
        ("GET", f"/v1/teachers/{tid}"),
        ("DELETE", f"/v1/teachers/{tid}"),
        ("GET", f"/v1/datasets/{d['id']}"),
        ("DELETE", f"/v1/datasets/{d['id']}"),
        ("GET", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/events"),
        ("GET", f"/v1/jobs/{jid}/events?stream=true"),
        ("GET", f"/v1/jobs/{jid}/metrics"),
        ("GET", f"/v1/jobs/{jid}/report"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
        ("GET", f"/v1/jobs/{jid}/artifacts"),
        ("GET", f"/v1/jobs/{jid}/artifacts/report.json"),
    ]
    for method, url in calls:
        assert client.request(method, url, headers=bob).status_code == 404, url
        assert client.request(method, url).status_code == 401, url
    # Referring to alice's teacher or dataset in bob's job body is just as unknown.
    assert client.post("/v1/jobs", headers=bob, json=_job_body(tid)).status_code == 404
    assert (
        client.post("/v1/jobs", headers=bob, json=_job_body(None, method="sat", dataset=d["id"])).status_code
        == 404
    )
    for url in ("/v1/teachers", "/v1/jobs"):
        assert client.get(url, headers=bob).json()["items"] == []
    assert client.get("/v1/datasets", headers=bob).json()["uploaded"] == []
    # ... and alice still has everything.
    assert client.get(f"/v1/jobs/{jid}", headers=alice).json()["status"] == "queued"
    assert client.get(f"/v1/teachers/{tid}", headers=alice).status_code == 200


# ---------------------------------------------------------------- service layer


def test_status_machine(app: Any, client: TestClient, alice: dict[str, str]) -> None:
    jid = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat")).json()["id"]
    with app.state.session_factory() as session:
        job = session.get(Job, jid)
        with pytest.raises(job_state.IllegalTransition):
            job_state.transition(session, job, "succeeded")
        job_state.transition(session, job, "running")
        # A redelivered task: running -> queued -> running, attempts counted.
        assert job_state.start_attempt(session, job) and job.status == "running" and job.attempts == 2
        job_state.transition(session, job, "cancelled")
        for status in ("queued", "running", "failed"):
            with pytest.raises(job_state.IllegalTransition):
                job_state.transition(session, job, status)
        assert not job_state.start_attempt(session, job)
        session.commit()
    # A stale copy loses the race (a cancel against a starting worker) instead of overwriting it.
    other = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat")).json()["id"]
    with app.state.session_factory() as worker, app.state.session_factory() as api:
        seen_by_api = api.get(Job, other)
        job_state.transition(worker, worker.get(Job, other), "running")
        worker.commit()
        with pytest.raises(job_state.IllegalTransition, match="running now"):
            job_state.transition(api, seen_by_api, "cancelled")
        assert seen_by_api.status == "running"
    with app.state.session_factory() as session:
        statuses = session.scalars(
            sa.select(JobEvent.payload).where(JobEvent.job_id == jid, JobEvent.type == "status")
        ).all()
    assert [p["status"] for p in statuses] == ["queued", "running", "queued", "running", "cancelled"]


def test_add_event_and_upserts_are_idempotent(app: Any, client: TestClient, alice: dict[str, str]) -> None:
    jid = client.post("/v1/jobs", headers=alice, json=_job_body(None, method="sat")).json()["id"]
    with app.state.session_factory() as session:
        first = job_state.add_event(session, jid, "epoch", {"epoch": 1}, dedupe_key="epoch:1")
        assert first is not None
        assert job_state.add_event(session, jid, "epoch", {"epoch": 1}, dedupe_key="epoch:1") is None
        assert job_state.add_event(session, jid, "warning", {"message": "a"}) != job_state.add_event(
            session, jid, "warning", {"message": "a"}
        )
        for size in (1, 2):
            job_state.record_artifact(session, jid, "checkpoint.pt", "k", size, "0" * 64)
            job_state.upsert_metrics(session, jid, 1, {"loss": size})
        session.commit()
        assert session.scalar(sa.select(Artifact.size_bytes)) == 2
        assert session.scalars(sa.select(JobMetric.metrics)).all() == [{"loss": 2}]
    assert _rows(app, JobEvent) == 4


def test_run_config_fills_local_paths(app: Any, job: dict[str, Any]) -> None:
    with app.state.session_factory() as session:
        cfg = job_state.run_config(session.get(Job, job["id"]), teacher_path="/w/t.pt", data_root="/data")
    from core.pipeline import DistillConfig

    DistillConfig.from_dict(cfg).validate()
    assert cfg["teacher_path"] == "/w/t.pt" and cfg["data_root"] == "/data"


def test_local_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    for bad in ("../x", "a/../../x", "/abs", "a//b", "a/./b", "", "a/b\\c", "a/.hidden", "x" * 600):
        with pytest.raises(ValueError):
            validate_key(bad)
        with pytest.raises(ValueError):
            store.put_stream(bad, io.BytesIO(b"x"))
    store.put_stream("tenants/t/a.bin", io.BytesIO(b"abc"))
    src = tmp_path / "src.bin"
    src.write_bytes(b"0123456789" * 300_000)
    store.put_file("tenants/t/jobs/j/big.bin", src)
    assert store.exists("tenants/t/a.bin") and not store.exists("tenants/t/b.bin")
    store.get_file("tenants/t/jobs/j/big.bin", tmp_path / "out" / "big.bin")
    assert (tmp_path / "out" / "big.bin").read_bytes() == src.read_bytes()
    assert b"".join(store.iter_bytes("tenants/t/jobs/j/big.bin", chunk=1000)) == src.read_bytes()
    assert store.list_keys("tenants/t/jobs/") == ["tenants/t/jobs/j/big.bin"]
    assert store.presigned_url("tenants/t/a.bin", 60) is None
    store.delete("tenants/t/jobs/j/big.bin")
    store.delete("tenants/t/jobs/j/big.bin")  # deleting twice is fine
    assert not (tmp_path / "objects" / "tenants" / "t" / "jobs").exists()  # empty folders go too
    assert store.list_keys() == ["tenants/t/a.bin"]
    from service.storage import ObjectNotFound

    with pytest.raises(ObjectNotFound):
        store.iter_bytes("tenants/t/missing")
    store.ping()


def test_admin_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from api import admin
    from service.settings import get_settings

    monkeypatch.setenv("RD_VAR_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert admin.main(["upgrade"]) == 0
        assert admin.main(["create-key", "--tenant", "acme"]) == 0
        key = capsys.readouterr().out.strip().splitlines()[-1]
        assert key.startswith("rd_")
        assert admin.main(["list-keys"]) == 0
        listing = capsys.readouterr().out
        assert "acme" in listing and key.split("_")[1] in listing and key not in listing
        app = create_app(get_settings(), enqueue=lambda _: None)
        with TestClient(app) as c:
            assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert admin.main(["revoke-key", key.split("_")[1]]) == 0
            assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        assert admin.main(["revoke-key", "00000000"]) == 1
        assert admin.main(["create-key"]) == 2  # no tenant
    finally:
        get_settings.cache_clear()
