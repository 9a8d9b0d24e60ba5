"""Event streams on the embedded stack (SQLite): heartbeats during silence, a revoked key ends its
stream, and the slot bookkeeping of ``api.streams.StreamSlots``. Pool exhaustion and the 429s through a
real server are in tests/integration/test_streams.py (PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from api import streams
from api.app import create_app
from service import jobs as job_state
from service.auth import create_api_key, get_or_create_tenant, revoke_api_key
from service.models import Job
from service.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def app(tmp_path: Path) -> Any:
    settings = Settings(var_dir=tmp_path / "var", data_root=tmp_path / "data")
    app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
    app.state.sse_poll_seconds = 0.02
    return app


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def _key_and_job(app: Any) -> tuple[str, str]:
    with app.state.session_factory() as session:
        key = create_api_key(session, "alice")
        job = Job(
            tenant_id=get_or_create_tenant(session, "alice").id,
            student_arch="tiny_cnn",
            method="natural",
            params={},
            status="queued",
            progress={"epoch": 0, "epochs": 1, "fraction": 0.0},
        )
        session.add(job)
        session.flush()
        job_state.add_event(session, job.id, "status", {"status": "queued"})
        session.commit()
        return key, job.id


def _later(seconds: float, action: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_silent_stream_sends_heartbeats_then_ends(
    app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.05)
    key, job_id = _key_and_job(app)

    def finish() -> None:
        with app.state.session_factory() as session:
            job_state.transition(session, session.get(Job, job_id), "cancelled")
            session.commit()

    # The job ends once a heartbeat has been seen (however slow a loaded machine is to start the stream);
    # a fallback ends it after 30 s so that a stream without heartbeats fails the assertions, not hangs.
    finished = threading.Event()

    def finish_once() -> None:
        if not finished.is_set():
            finished.set()
            finish()

    fallback = threading.Thread(target=lambda: finished.wait(30.0) or finish_once())
    fallback.start()
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    text = ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        for chunk in r.iter_text():
            text += chunk
            if ": keep-alive" in text:
                finish_once()
    fallback.join()
    # The job's progress is set (as every job's is) and unchanged: silence is filled with comments.
    assert text.count("event: progress") == 1 and ": keep-alive\n\n" in text
    assert text.index("event: status") < text.index(": keep-alive") < text.index("event: end")
    assert app.state.streams.open_total == 0


def test_revoking_the_key_ends_its_stream(
    app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "KEY_RECHECK_S", 0.1)
    key, job_id = _key_and_job(app)

    def revoke() -> None:
        with app.state.session_factory() as session:
            assert revoke_api_key(session, key.split("_")[1]) == 1
            session.commit()

    thread = _later(0.3, revoke)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        text = "".join(r.iter_text())
    thread.join()
    assert "event: status" in text and "event: end" not in text
    assert app.state.streams.open_total == 0


def test_streams_of_one_job_share_one_poll(app: Any, client: TestClient) -> None:
    """Between a job's events its streams follow one shared poll of the job's state, so many open
    streams do not each cost a query every poll period."""
    key, job_id = _key_and_job(app)
    calls = {"events": 0, "job_states": 0}
    poller = app.state.poller
    for name in calls:
        original = getattr(poller, name)

        async def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return await _original(*args)

        setattr(poller, name, counted)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    texts: list[str] = []

    def stream() -> None:
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
            texts.append("".join(r.iter_text()))

    readers = [threading.Thread(target=stream) for _ in range(5)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while app.state.streams.open_total < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # about 50 poll periods of 0.02 s with five streams open

    def finish() -> None:
        with app.state.session_factory() as session:
            job_state.transition(session, session.get(Job, job_id), "cancelled")
            session.commit()

    finish()
    for reader in readers:
        reader.join(10)
    assert len(texts) == 5 and all("event: end" in text for text in texts)
    # Each stream: its first poll and one for the cancel's event; the rest is the shared state poll.
    assert calls["events"] <= 5 * 3, calls
    assert 0 < calls["job_states"] < 5 * 50, calls


def test_stream_slots_count_per_key_and_in_all() -> None:
    slots = streams.StreamSlots(per_key=2, total=3)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    with pytest.raises(HTTPException) as refused:
        slots.acquire("a")
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "10"}
    assert "RD_MAX_STREAMS_PER_KEY=2" in str(refused.value.detail)
    b1 = slots.acquire("b")
    with pytest.raises(HTTPException) as refused:
        slots.acquire("c")
    assert "RD_MAX_STREAMS=3" in str(refused.value.detail)
    a1.release()
    a1.release()  # idempotent: a second release frees nothing more
    assert (slots.open_for("a"), slots.open_total) == (1, 2)
    slots.acquire("c")
    a2.release()
    b1.release()
    assert (slots.open_for("a"), slots.open_for("b"), slots.open_total) == (0, 0, 1)
