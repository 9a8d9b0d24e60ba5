"""The API on its production stack: PostgreSQL, an S3 server and Redis (no worker: jobs stay queued).

Uploads must land in the bucket byte for byte; every bad input must answer 4xx and leave no row and no
object behind; another tenant's ids are 404 on every endpoint and no key is 401.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app
from service import jobs as job_state
from service.auth import create_api_key
from service.models import Dataset, Job, Teacher, Tenant
from service.settings import Settings
from service.storage import job_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("clean_state"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

LIMIT = 400_000


class Recorder:
    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.revoked: list[str] = []

    def enqueue(self, job_id: str) -> None:
        self.enqueued.append(job_id)

    def revoke(self, job_id: str) -> None:
        self.revoked.append(job_id)


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings.model_copy(update={"max_upload_bytes": LIMIT})


@pytest.fixture
def queue() -> Recorder:
    return Recorder()


@pytest.fixture
def app(settings: Settings, queue: Recorder) -> Any:
    app = create_app(settings, enqueue=queue.enqueue, revoke=queue.revoke)
    app.state.sse_poll_seconds = 0.05
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
def alice(app: Any) -> dict[str, str]:
    return _key(app, "alice")


@pytest.fixture
def bob(app: Any) -> dict[str, str]:
    return _key(app, "bob")


@pytest.fixture(scope="module")
def state_dict() -> bytes:
    import torch

    from core.models import create_model

    buf = io.BytesIO()
    torch.save(create_model("tiny_cnn", 10).state_dict(), buf)
    return buf.getvalue()


def _npz(n: int = 80, classes: int = 10) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), y=np.arange(n) % classes)
    return buf.getvalue()


def _count(app: Any, model: type) -> int:
    with app.state.session_factory() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def _tenant_id(app: Any, name: str) -> str:
    with app.state.session_factory() as session:
        return session.scalar(sa.select(Tenant.id).where(Tenant.name == name))


def _upload(client: TestClient, headers: dict[str, str], content: bytes, **form: Any) -> httpx.Response:
    form.setdefault("arch", "tiny_cnn")
    form.setdefault("dataset", "cifar10-partial")
    return client.post("/v1/teachers", headers=headers, files={"file": ("teacher.pt", content)}, data=form)


def _job(teacher_id: str | None, **overrides: Any) -> dict[str, Any]:
    body = {"teacher_id": teacher_id, "student": "tiny_cnn", "method": "rslad", "dataset": "cifar10-partial"}
    body.update(epochs=1, batch_size=16, n_eval=8, attacks=["clean"])
    body.update(overrides)
    return body


def test_readiness_on_the_real_stack(client: TestClient, settings: Settings) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    broken = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:9/0", "store_url": "s3://no-such-bucket"}
    )
    with TestClient(create_app(broken)) as other:
        r = other.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert (
        checks["database"] == "ok"
        and checks["broker"].startswith("error")
        and checks["store"].startswith("error")
    )


def test_teacher_upload_lands_in_s3(
    client: TestClient,
    app: Any,
    s3: Any,
    s3_bucket: str,
    bucket_keys: Any,
    alice: dict[str, str],
    state_dict: bytes,
) -> None:
    r = _upload(client, alice, state_dict, name="t1", normalize="0.5,0.5,0.5;0.25,0.25,0.25")
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["sha256"] == hashlib.sha256(state_dict).hexdigest() and t["normalize"]["std"] == [0.25] * 3
    key = f"tenants/{_tenant_id(app, 'alice')}/teachers/{t['id']}/teacher.pt"
    assert bucket_keys() == [key]
    assert s3.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read() == state_dict
    assert client.get("/v1/teachers", headers=alice).json()["items"] == [t]
    assert client.delete(f"/v1/teachers/{t['id']}", headers=alice).status_code == 204
    assert bucket_keys() == [] and _count(app, Teacher) == 0


def test_dataset_upload_lands_in_s3(
    client: TestClient, app: Any, s3: Any, s3_bucket: str, bucket_keys: Any, alice: dict[str, str]
) -> None:
    blob = _npz()
    r = client.post(
        "/v1/datasets", headers=alice, files={"file": ("cifar-ish.npz", blob)}, data={"name": "mine"}
    )
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["name"], d["num_classes"], d["n_train"] + d["n_test"], d["size_bytes"]) == (
        "mine",
        10,
        80,
        len(blob),
    )
    key = f"tenants/{_tenant_id(app, 'alice')}/datasets/{d['id']}.npz"
    assert bucket_keys() == [key]
    assert s3.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read() == blob
    job = client.post("/v1/jobs", headers=alice, json=_job(None, method="sat", dataset=d["id"], val_size=8))
    assert job.status_code == 201, job.text
    assert job.json()["params"]["dataset"] == "npz" and job.json()["dataset_id"] == d["id"]


def test_store_multipart_roundtrip(app: Any, bucket_keys: Any) -> None:
    """Objects bigger than boto3's multipart threshold (8 MiB) go up in parts and come back whole."""
    blob = np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    store = app.state.store
    store.put_stream("tenants/x/big.bin", io.BytesIO(blob))
    assert store.exists("tenants/x/big.bin") and bucket_keys() == ["tenants/x/big.bin"]
    assert (
        hashlib.sha256(b"".join(store.iter_bytes("tenants/x/big.bin"))).digest()
        == hashlib.sha256(blob).digest()
    )
    store.delete("tenants/x/big.bin")
    assert not store.exists("tenants/x/big.bin") and bucket_keys() == []


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "case",
    ["not a model", "code pickle", "torch.save code pickle", "wrong arch", "class mismatch", "too large"],
)
def test_bad_teacher_uploads_leave_nothing(
    case: str,
    client: TestClient,
    app: Any,
    s3: Any,
    bucket_keys: Any,
    alice: dict[str, str],
    state_dict: bytes,
    tmp_path: Path,
) -> None:
    import torch

    marker = tmp_path / "pwned"
    torch_pickle = io.BytesIO()
    torch.save({"state_dict": _Payload(marker)}, torch_pickle)
    content, form, status = {
        "not a model": (b"GIF89a not a model" * 100, {}, 422),
        "code pickle": (pickle.dumps(_Payload(marker), protocol=2), {}, 422),
        "torch.save code pickle": (torch_pickle.getvalue(), {}, 422),
        "wrong arch": (state_dict, {"arch": "resnet18"}, 422),
        "class mismatch": (state_dict, {"dataset": "cifar100-partial"}, 422),
        "too large": (b"\0" * (LIMIT + 1), {}, 413),
    }[case]
    r = _upload(client, alice, content, **form)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert not marker.exists()
    assert _count(app, Teacher) == 0
    assert bucket_keys() == []


def test_bad_dataset_upload_leaves_nothing(
    client: TestClient, app: Any, s3: Any, bucket_keys: Any, alice: dict[str, str]
) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2]))
    r = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", buf.getvalue())})
    assert r.status_code == 422 and "labels" in r.json()["detail"]
    assert _count(app, Dataset) == 0 and bucket_keys() == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"epochs": 0},
        {"epochs": 100000},
        {"eps": -0.1},
        {"eps": 1.0},
        {"batch_size": 0},
        {"n_eval": 0},
        {"method": "no_such_method"},
        {"student": "no_such_arch"},
        {"attacks": ["nope"]},
        {"dataset": "cifar100-partial"},
        {"teacher_id": None},
    ],
)
def test_bad_jobs_are_422_and_store_nothing(
    overrides: dict[str, Any],
    client: TestClient,
    app: Any,
    queue: Recorder,
    alice: dict[str, str],
    state_dict: bytes,
) -> None:
    teacher = _upload(client, alice, state_dict).json()
    r = client.post("/v1/jobs", headers=alice, json={**_job(teacher["id"]), **overrides})
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], str)
    assert _count(app, Job) == 0 and queue.enqueued == []


def test_odd_inputs_do_not_reach_postgres_as_errors(
    client: TestClient, app: Any, alice: dict[str, str], state_dict: bytes, bucket_keys: Any
) -> None:
    """NUL characters, NaN and out-of-range integers break PostgreSQL statements: they must be 4xx."""
    import base64

    for url in ("/v1/jobs/a%00b", "/v1/teachers/%00", "/v1/datasets/" + "0" * 40):
        assert client.get(url, headers=alice).status_code == 404, url
    r = _upload(client, alice, state_dict, name="x\x00y")
    assert r.status_code == 422 and _count(app, Teacher) == 0 and bucket_keys() == []
    nan = b'{"method": "sat", "dataset": "cifar10-partial", "method_params": {"beta": NaN}}'
    json_headers = {**alice, "Content-Type": "application/json"}
    assert client.post("/v1/jobs", headers=json_headers, content=nan).status_code == 422
    too_big_seed = _job(None, method="sat", seed=2**40)
    assert client.post("/v1/jobs", headers=alice, json=too_big_seed).status_code == 422
    jid = client.post("/v1/jobs", headers=alice, json=_job(None, method="sat")).json()["id"]
    assert client.get(f"/v1/jobs/{jid}/events", headers=alice, params={"after": 2**63}).status_code == 422
    cursor = base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00+00:00", "a\x00"]).encode()).decode()
    assert client.get("/v1/jobs", headers=alice, params={"cursor": cursor}).status_code == 422
    assert _count(app, Job) == 1


def test_idempotent_create_on_postgres(client: TestClient, queue: Recorder, alice: dict[str, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    headers = {**alice, "Idempotency-Key": "same"}

    def post(_: int) -> httpx.Response:
        return client.post("/v1/jobs", headers=headers, json=_job(None, method="sat"))

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1 and len(queue.enqueued) == 1


def test_default_enqueue_puts_the_task_on_redis(
    settings: Settings, alice: dict[str, str], redis_url: str
) -> None:
    """Without an enqueue override the API sends worker.tasks.run_job to RD_QUEUE on the broker."""
    import base64

    import redis

    r = redis.Redis.from_url(redis_url)
    r.delete(settings.queue)
    app = create_app(settings)
    with TestClient(app) as c:
        created = c.post("/v1/jobs", headers=alice, json=_job(None, method="sat"))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert c.post(f"/v1/jobs/{job_id}/cancel", headers=alice).json()["status"] == "cancelled"
    raw = r.rpop(settings.queue)
    r.delete(settings.queue)
    assert raw is not None, f"nothing on the {settings.queue} list"
    message = json.loads(raw)
    assert message["headers"]["task"] == "worker.tasks.run_job" and message["headers"]["id"] == job_id
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [job_id]


def test_artifacts_presign_and_redirect(
    client: TestClient, app: Any, s3: Any, bucket_keys: Any, alice: dict[str, str]
) -> None:
    jid = client.post("/v1/jobs", headers=alice, json=_job(None, method="sat")).json()["id"]
    tenant = _tenant_id(app, "alice")
    blob = bytes(range(256)) * 4096
    report = {"final": {"best": {"pgd_sat": 0.42}}}
    with app.state.session_factory() as session:
        for name, data in (("student_best.pt", blob), ("report.json", json.dumps(report).encode())):
            key = job_key(tenant, jid, name)
            app.state.store.put_stream(key, io.BytesIO(data))
            job_state.record_artifact(session, jid, name, key, len(data), hashlib.sha256(data).hexdigest())
        session.commit()
    assert client.get(f"/v1/jobs/{jid}/report", headers=alice).json() == report
    assert client.get(f"/v1/jobs/{jid}/artifacts/student_best.pt", headers=alice).content == blob

    r = client.get(
        f"/v1/jobs/{jid}/artifacts/student_best.pt",
        headers=alice,
        params={"redirect": True},
        follow_redirects=False,
    )
    assert r.status_code == 307
    location = r.headers["location"]
    assert location.startswith(s3.endpoint_url) and "Signature" in location
    assert httpx.get(location).content == blob  # no API key needed: the URL is signed
    url = client.get(
        f"/v1/jobs/{jid}/artifacts/student_best.pt", headers=alice, params={"presign": True}
    ).json()
    assert url["expires_in"] == app.state.settings.presign_seconds
    assert httpx.get(url["url"]).content == blob
    # The signature covers the key: editing the URL to another object fails.
    assert httpx.get(url["url"].replace("student_best.pt", "report.json")).status_code == 403


def test_isolation_on_every_endpoint(
    client: TestClient, app: Any, alice: dict[str, str], bob: dict[str, str], state_dict: bytes
) -> None:
    teacher = _upload(client, alice, state_dict).json()
    dataset = client.post("/v1/datasets", headers=alice, files={"file": ("d.npz", _npz())}).json()
    jid = client.post("/v1/jobs", headers=alice, json=_job(teacher["id"])).json()["id"]
    with app.state.session_factory() as session:
        key = job_key(_tenant_id(app, "alice"), jid, "report.json")
        app.state.store.put_stream(key, io.BytesIO(b"{}"))
        job_state.record_artifact(session, jid, "report.json", key, 2, "0" * 64)
        session.commit()
    urls = [
        ("GET", f"/v1/teachers/{teacher['id']}"),
        ("DELETE", f"/v1/teachers/{teacher['id']}"),
        ("GET", f"/v1/datasets/{dataset['id']}"),
        ("DELETE", f"/v1/datasets/{dataset['id']}"),
        ("GET", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/events"),
        ("GET", f"/v1/jobs/{jid}/events?stream=1"),
        ("GET", f"/v1/jobs/{jid}/metrics"),
        ("GET", f"/v1/jobs/{jid}/report"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
        ("GET", f"/v1/jobs/{jid}/artifacts"),
        ("GET", f"/v1/jobs/{jid}/artifacts/report.json"),
        ("GET", f"/v1/jobs/{jid}/artifacts/report.json?presign=true"),
    ]
    for method, url in urls:
        assert client.request(method, url, headers=bob).status_code == 404, (method, url)
        assert client.request(method, url).status_code == 401, (method, url)
        assert client.request(method, url, headers={"Authorization": "Bearer rd_x_y"}).status_code == 401
    for method, url in [
        ("GET", "/v1/teachers"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/datasets"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/teachers"),
        ("POST", "/v1/datasets"),
    ]:
        assert client.request(method, url).status_code == 401, (method, url)
    assert client.post("/v1/jobs", headers=bob, json=_job(teacher["id"])).status_code == 404
    assert client.get("/v1/teachers", headers=bob).json() == {"items": []}
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    assert client.get("/v1/datasets", headers=bob).json()["uploaded"] == []
    # alice still has all of it
    assert client.get(f"/v1/jobs/{jid}", headers=alice).json()["status"] == "queued"
    assert client.get(f"/v1/jobs/{jid}/report", headers=alice).json() == {}


def test_concurrent_requests_never_exhaust_small_pools(settings: Settings, queue: Recorder) -> None:
    """More concurrent requests than pooled connections, on both engines (status polls on the async one,
    listings through the ORM): every one is answered (they queue for a connection) instead of
    deadlocking the thread pool into 500s after the pool's 30 s timeout."""
    from concurrent.futures import ThreadPoolExecutor

    small = create_app(
        settings.model_copy(update={"db_pool_size": 2, "db_max_overflow": 0, "db_poll_pool_size": 1}),
        enqueue=queue.enqueue,
        revoke=queue.revoke,
    )
    headers = _key(small, "carol")
    with TestClient(small) as c:
        job = c.post("/v1/jobs", headers=headers, json=_job(None, method="sat"))
        assert job.status_code == 201, job.text
        paths = [f"/v1/jobs/{job.json()['id']}", "/v1/jobs"] * 48
        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda path: c.get(path, headers=headers).status_code, paths))
    assert codes == [200] * 96


def test_status_poll_survives_dropped_connections(
    client: TestClient, app: Any, settings: Settings, alice: dict[str, str]
) -> None:
    """The poll engine pings nothing before use: a connection the server dropped (restart, idle timeout)
    fails once, is discarded, and the poll is retried on a fresh one."""
    job = client.post("/v1/jobs", headers=alice, json=_job(None, method="sat"))
    assert job.status_code == 201, job.text
    path = f"/v1/jobs/{job.json()['id']}"
    assert client.get(path, headers=alice).status_code == 200  # the poll pool now holds a connection
    database = sa.engine.make_url(settings.database_url).database
    admin = sa.create_engine(settings.database_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            killed = conn.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            )
    finally:
        admin.dispose()
    assert killed >= 1
    for _ in range(3):
        r = client.get(path, headers=alice)
        assert r.status_code == 200 and r.json()["id"] == job.json()["id"], r.text
