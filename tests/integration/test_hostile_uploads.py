"""Hostile uploads on the production stack (PostgreSQL + S3): bombs, unusable datasets, stalls, orphans.

Every refusal is a 422 naming the limit or the field, leaves no row and no object, and names no server
path; a spinning check of one tenant does not stall another's upload; SIGKILL of the API under uvicorn
leaves no checking process behind.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from hostile_files import scripted, zero_bomb

from api.app import create_app
from bench.stack import children, uvicorn_server
from service.auth import create_api_key
from service.models import Dataset, Teacher
from service.settings import Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("clean_state"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

LIMIT = 400_000
REPO = Path(__file__).resolve().parents[2]


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good_npz(n: int = 20) -> bytes:
    x = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return _npz(x=x, y=np.arange(n) % 2)








@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings.model_copy(
        update={"max_upload_bytes": LIMIT, "check_timeout_s": 4.0, "check_concurrency": 2}
    )


@pytest.fixture
def app(settings: Settings) -> Any:
    return create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def _key(database_url: str, tenant: str) -> dict[str, str]:
    from service.db import make_engine, make_session_factory

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            key = create_api_key(session, tenant)
            session.commit()
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {key}"}


def _count(app: Any, model: type) -> int:
    with app.state.session_factory() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def test_bombs_and_unusable_datasets_are_422_and_leave_nothing(
    client: TestClient, app: Any, settings: Settings, bucket_keys: Any
) -> None:
    alice = _key(settings.database_url, "alice")
    images = np.zeros((10, 8, 8, 3), np.uint8)
    cases = {
        "bomb.npz": (zero_bomb(), "RD_MAX_EXPANSION_RATIO=4"),
        # 2**40 answered 500 (num_classes overflowed PostgreSQL's integer); uint64 max was "10 classes"
        "huge.npz": (_npz(x=images, y=np.full(10, 2**40)), "labels out of range"),
        "uint64.npz": (_npz(x=images, y=np.full(10, 2**64 - 1, np.uint64)), "labels out of range"),
        "flat.npz": (_npz(x=np.zeros((10, 0, 0, 3), np.uint8), y=np.arange(10) % 2), "0x0 pixels"),
        "noy.npz": (_npz(x=images), "noy.npz has no array 'y'"),
    }
    for filename, (content, words) in cases.items():
        r = client.post("/v1/datasets", headers=alice, files={"file": (filename, content)})
        assert r.status_code == 422, (filename, r.text)
        detail = r.json()["detail"]
        assert words in detail, detail
        assert "upload-" not in detail and str(settings.work_dir) not in detail, detail
    assert _count(app, Dataset) == 0 and _count(app, Teacher) == 0
    assert bucket_keys() == []


def test_a_spinning_check_does_not_stall_another_tenant(
    client: TestClient, app: Any, settings: Settings, bucket_keys: Any
) -> None:
    alice, bob = _key(settings.database_url, "alice"), _key(settings.database_url, "bob")
    # Warm two checking processes (torch imported), so neither upload below waits for one to start.
    warm: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: warm.append(
                client.post("/v1/datasets", headers=alice, files={"file": ("w.npz", _good_npz())})
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in warm] == [201, 201]

    spin: dict[str, Any] = {}

    def slow() -> None:
        spin["r"] = client.post(
            "/v1/teachers",
            headers=alice,
            files={"file": ("spin.pt", scripted("spin"))},
            data={"num_classes": 10},
        )

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    r = client.post("/v1/datasets", headers=bob, files={"file": ("b.npz", _good_npz())})
    assert r.status_code == 201, r.text
    assert thread.is_alive(), "bob was answered only after alice's spinning check ended"
    thread.join(timeout=60)
    assert spin["r"].status_code == 422
    assert "took longer than RD_CHECK_TIMEOUT_S=4 s" in spin["r"].json()["detail"]
    assert _count(app, Teacher) == 0 and len(bucket_keys()) == 3  # the three datasets only


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_sigkill_of_the_api_leaves_no_checking_process(settings: Settings, tmp_path: Path) -> None:
    env = {
        "RD_DATABASE_URL": settings.database_url,
        "RD_BROKER_URL": settings.broker_url,
        "RD_STORE_URL": settings.store_url,
        "RD_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "RD_S3_ACCESS_KEY": settings.s3_access_key or "",
        "RD_S3_SECRET_KEY": settings.s3_secret_key or "",
        "RD_S3_REGION": settings.s3_region or "",
        "RD_VAR_DIR": str(tmp_path / "var"),
        "RD_WORK_DIR": str(tmp_path / "work"),
        "RD_CHECK_TIMEOUT_S": "300",
        "OMP_NUM_THREADS": "1",
    }
    headers = _key(settings.database_url, "alice")
    with uvicorn_server("api.app:create_app", env, tmp_path / "api.log", ["--no-access-log"]) as server:

        def upload() -> None:
            try:
                httpx.post(
                    server.url + "/v1/teachers",
                    headers=headers,
                    files={"file": ("spin.pt", scripted("spin"))},
                    data={"num_classes": "10"},
                    timeout=60,
                )
            except httpx.HTTPError:
                pass  # the server is killed under it

        threading.Thread(target=upload, daemon=True).start()
        deadline = time.monotonic() + 30
        while not (checkers := children(server.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert checkers, "no checking process started"
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        deadline = time.monotonic() + 5
        while not all(_gone(pid) for pid in checkers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in checkers), f"checking processes {checkers} outlived the API"
