"""Server-sent event streams on real PostgreSQL, through a real uvicorn: open streams hold no pooled
connection, so other requests keep answering, and their number per API key and per process is bounded.

The API runs in-process under uvicorn (a thread; stopped at the end) with a tiny ORM pool (2 + 2), so
a handful of streams is already more than the pool: before streams moved to the async poller, each one
held its request's session (and a place at the request gate) for its whole life, and the fifth stream,
like any other database-backed request, waited forever.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import serve

from api.app import create_app
from service import jobs as job_state
from service.auth import create_api_key, get_or_create_tenant
from service.models import Job
from service.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ANSWER_S = 5.0  # generous: "answers at all while the streams are open", not a speed target


class Stream:
    """One raw HTTP/1.1 server-sent-event request: the status line and headers, then messages."""

    def __init__(self, port: int, key: str, job_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        request = (
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}; got {self.buffer[-300:]!r}")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def read_until(self, text: str) -> str:
        """Everything received until ``text`` has arrived (chunked framing left in: we only search)."""
        while text.encode() not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {text!r}; got {self.buffer[-300:]!r}")
            self.buffer += chunk
        return self.buffer.decode(errors="replace")

    def body(self) -> str:
        """A short (non-streamed) body, e.g. of a 429."""
        length = int(self.headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self.buffer += self.sock.recv(65536)
        return self.buffer[:length].decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def make_app(tmp_path: Path, pg_url: str) -> Callable[..., Any]:
    """The API on PostgreSQL with an ORM pool of 2 + 2 (gate and threads alike); streams poll fast."""

    def make(**limits: int) -> Any:
        settings = Settings(
            var_dir=tmp_path / "var",
            database_url=pg_url,
            broker_url="filesystem://",
            store_url=f"file://{tmp_path / 'objects'}",
            data_root=tmp_path / "data",
            work_dir=tmp_path / "work",
            db_pool_size=2,
            db_max_overflow=2,
            **limits,
        )
        app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
        app.state.sse_poll_seconds = 0.1
        return app

    return make


def _key(app: Any, tenant: str) -> str:
    with app.state.session_factory() as session:
        key = create_api_key(session, tenant)
        session.commit()
    return key


def _job(app: Any, tenant: str) -> str:
    """A queued job of ``tenant`` (never enqueued: it stays queued, so its streams stay open)."""
    with app.state.session_factory() as session:
        owner = get_or_create_tenant(session, tenant)
        job = Job(
            tenant_id=owner.id,
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
        return job.id


def _finish(app: Any, job_id: str) -> None:
    with app.state.session_factory() as session:
        job_state.transition(session, session.get(Job, job_id), "cancelled")
        session.commit()


def _tenant() -> str:
    return f"streams-{uuid.uuid4().hex[:8]}"


def test_open_streams_leave_other_requests_answering(make_app: Callable[..., Any]) -> None:
    app = make_app(max_streams_per_key=100)
    alice, bob = _tenant(), _tenant()
    alice_keys = [_key(app, alice) for _ in range(3)]
    bob_key = _key(app, bob)
    job_id = _job(app, alice)
    streams: list[Stream] = []
    with serve(app) as port:
        try:
            # 12 streams: three times the ORM pool (2 + 2), over three keys.
            for i in range(12):
                streams.append(Stream(port, alice_keys[i % 3], job_id))
                assert streams[-1].status == 200, streams[-1].headers
            for stream in streams:
                assert "event: status" in stream.read_until('"queued"')
            assert app.state.streams.open_total == 12
            # A database-backed request of another tenant (the ORM path, through the request gate).
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=ANSWER_S) as client:
                headers = {"Authorization": f"Bearer {bob_key}"}
                for _ in range(3):
                    r = client.get("/v1/teachers", headers=headers)
                    assert r.status_code == 200, r.text
                assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404
                assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {alice_keys[0]}"}).json()
            # The streams are alive and follow the job to its end.
            _finish(app, job_id)
            for stream in streams:
                text = stream.read_until("event: end")
                assert '"cancelled"' in text
        finally:
            for stream in streams:
                stream.close()
        deadline = time.monotonic() + 10
        while app.state.streams.open_total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.streams.open_total == 0 and app.state.job_watch.watchers == 0


def test_streams_per_key_and_per_process_are_bounded(make_app: Callable[..., Any]) -> None:
    app = make_app(max_streams_per_key=3, max_streams=5)
    alice = _tenant()
    first, second, third = (_key(app, alice) for _ in range(3))
    job_id = _job(app, alice)
    streams: list[Stream] = []
    with serve(app) as port:
        try:
            streams = [Stream(port, first, job_id) for _ in range(3)]
            assert [s.status for s in streams] == [200, 200, 200]
            refused = Stream(port, first, job_id)
            assert refused.status == 429 and refused.headers["retry-after"].isdigit()
            assert "RD_MAX_STREAMS_PER_KEY=3" in refused.body()
            refused.close()
            # Another key of the same tenant has its own count, up to the process's bound of 5.
            streams += [Stream(port, second, job_id) for _ in range(2)]
            assert [s.status for s in streams[3:]] == [200, 200]
            refused = Stream(port, third, job_id)
            assert refused.status == 429 and "RD_MAX_STREAMS=5" in refused.body()
            refused.close()
            # A page of events is no stream: not counted, not refused.
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=ANSWER_S) as client:
                page = client.get(f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {first}"})
                assert page.status_code == 200 and page.json()["items"][0]["type"] == "status"

            # A client that goes away frees its slot.
            streams.pop(0).close()
            deadline = time.monotonic() + ANSWER_S
            while app.state.streams.open_total >= 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            again = Stream(port, first, job_id)
            streams.append(again)
            assert again.status == 200

            # Streams that end with their job free theirs too.
            _finish(app, job_id)
            for stream in streams:
                stream.read_until("event: end")
            deadline = time.monotonic() + ANSWER_S
            while app.state.streams.open_total and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.state.streams.open_total == 0
            later = _job(app, alice)
            fresh = [Stream(port, first, later) for _ in range(3)]
            streams += fresh
            assert [s.status for s in fresh] == [200, 200, 200]
            # Clients that go away mid-stream stop their job's watch as well.
            for stream in fresh:
                stream.close()
            deadline = time.monotonic() + ANSWER_S
            while app.state.job_watch.watchers and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.state.job_watch.watchers == 0 and app.state.streams.open_total == 0
        finally:
            for stream in streams:
                stream.close()


def test_slow_downloads_leave_other_requests_answering(make_app: Callable[..., Any], tmp_path: Path) -> None:
    """Downloads whose clients read nothing yet (the server blocks on a full socket) hold no pooled
    connection: the route's session closes when it returns, not when the last byte is sent."""
    from service.storage import job_key

    app = make_app()
    alice, bob = _tenant(), _tenant()
    alice_key, bob_key = _key(app, alice), _key(app, bob)
    job_id = _job(app, alice)
    blob = tmp_path / "student_best.pt"
    blob.write_bytes(b"\0" * (32 << 20))  # far more than the sockets buffer
    with app.state.session_factory() as session:
        job = session.get(Job, job_id)
        key = job_key(job.tenant_id, job_id, blob.name)
        app.state.store.put_file(key, blob)
        job_state.record_artifact(session, job_id, blob.name, key, blob.stat().st_size, "0" * 64)
        session.commit()
    downloads: list[socket.socket] = []
    with serve(app) as port:
        try:
            for _ in range(8):  # twice the ORM pool (2 + 2)
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(
                    f"GET /v1/jobs/{job_id}/artifacts/{blob.name} HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {alice_key}\r\n\r\n".encode()
                )
                assert sock.recv(12).startswith(b"HTTP/1.1 200")  # then read nothing more
                downloads.append(sock)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=ANSWER_S) as client:
                for _ in range(3):
                    r = client.get("/v1/teachers", headers={"Authorization": f"Bearer {bob_key}"})
                    assert r.status_code == 200, r.text
        finally:
            for sock in downloads:
                sock.close()
