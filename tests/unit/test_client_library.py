"""The client library (``distill_client``) against a real server: the app on SQLite under uvicorn on a
loopback port, reached through real sockets. Connection drops are real too: a small TCP proxy in front
of the server cuts a connection at a chosen point, so the client sees what it would see on a bad
network (no mocked transport)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from api.app import create_app
from distill_client import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    Conflict,
    EventOut,
    JobCreate,
    NotFound,
    RateLimited,
    RetryPolicy,
    Unauthorized,
    ValidationError,
)
from distill_client.endpoints import artifact_target
from service import jobs as job_state
from service.auth import create_api_key
from service.models import Job
from service.settings import Settings
from service.storage import job_key

try:
    from tests.live_server import serve
except ImportError:  # pytest's default import mode puts tests/ (the conftest's folder) on sys.path
    from live_server import serve  # type: ignore[no-redef]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FAST = RetryPolicy(attempts=4, backoff=0.01, backoff_max=0.05, retry_after_max=0.2)
JOB = {"student": "tiny_cnn", "method": "sat", "dataset": "cifar10-partial", "epochs": 1, "val_size": 8}


@pytest.fixture
def server(tmp_path: Path, shared_dir: Path) -> Iterator[tuple[Any, str, str]]:
    """(app, base URL, API key): no broker, so jobs stay queued until cancelled."""
    settings = Settings(
        var_dir=tmp_path / "var", data_root=shared_dir / "data", max_streams_per_key=1, max_streams=10
    )
    app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
    app.state.sse_poll_seconds = 0.02
    with serve(app) as port:
        with app.state.session_factory() as session:
            key = create_api_key(session, "alice")
            session.commit()
        yield app, f"http://127.0.0.1:{port}", key


def _job_rows(app: Any) -> list[tuple[str, str | None]]:
    with app.state.session_factory() as session:
        return [tuple(r) for r in session.execute(sa.select(Job.id, Job.idempotency_key))]


class CuttingProxy:
    """A loopback TCP proxy to ``upstream`` that cuts its FIRST connection at a chosen point:

    - ``"before_response"``: the request reaches the server, which answers, but the client gets nothing
      (the connection closes as the answer starts): the server did the work, the client saw an error;
    - ``"after_first_event"``: the answer flows until the end of the first server-sent event with an id,
      then the connection closes mid-stream;
    - ``"mid_body"``: the first 64 KiB of the answer flow, then the connection closes.

    Later connections pass through untouched. ``requests`` holds what each connection's client sent."""

    def __init__(self, upstream: int, cut: str) -> None:
        self.upstream, self.cut = upstream, cut
        self.requests: list[bytearray] = []
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [downstream, upstream]
            seen = bytearray()
            self.requests.append(seen)
            first = len(self.requests) == 1
            self._start(self._pump_request, downstream, upstream, seen)
            self._start(self._pump_answer, upstream, downstream, first)

    @staticmethod
    def _pump_request(src: socket.socket, dst: socket.socket, seen: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                seen += data
                dst.sendall(data)

    def _pump_answer(self, src: socket.socket, dst: socket.socket, first: bool) -> None:
        buffer = bytearray()
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if first and self.cut == "before_response":
                    break
                buffer += data
                if first and self.cut == "mid_body" and len(buffer) >= 65536:
                    dst.sendall(data[: len(data) - (len(buffer) - 65536)])
                    break
                end = re.search(rb"\nid: \d+\n.*?\n\n", buffer, re.S) if first else None
                if end:
                    dst.sendall(data[: len(data) - (len(buffer) - end.end())])
                    break
                dst.sendall(data)
        if first:
            self.cuts += 1
        for sock in (dst, src):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def cutting_proxy(base_url: str, cut: str) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(int(base_url.rsplit(":", 1)[1]), cut)
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_job_creation_retried_after_a_dropped_connection_makes_one_job(server: Any) -> None:
    """The server made the job but the answer was lost: the client sends the same POST again (with the
    same Idempotency-Key) and gets the first job back; one job exists."""
    app, url, key = server
    with cutting_proxy(url, "before_response") as proxy, Client(proxy_url(proxy), key, retry=FAST) as client:
        job = client.jobs.create(**JOB)
    assert proxy.cuts == 1 and len(proxy.requests) == 2  # one lost answer, one retry
    keys = [re.search(rb"idempotency-key: (\S+)", bytes(r), re.I) for r in proxy.requests]
    assert keys[0] and keys[1] and keys[0].group(1) == keys[1].group(1)
    assert _job_rows(app) == [(job.id, keys[0].group(1).decode())]
    assert job.status == "queued" and job.student == "tiny_cnn"


def test_without_retries_the_dropped_connection_is_an_error(server: Any) -> None:
    app, url, key = server
    with cutting_proxy(url, "before_response") as proxy:
        with Client(proxy_url(proxy), key, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(httpx.TransportError):
                client.jobs.create(**JOB)
    assert len(_job_rows(app)) == 1  # the server made it; the caller can resend with the same key


def proxy_url(proxy: CuttingProxy) -> str:
    return f"http://127.0.0.1:{proxy.port}"


def test_errors_are_exceptions_with_the_api_message(server: Any) -> None:
    app, url, key = server
    with Client(url, key, retry=FAST) as client:
        with pytest.raises(NotFound) as missing:
            client.jobs.get("nope")
        assert missing.value.status == 404 and "nope" in missing.value.detail
        with pytest.raises(ValidationError) as invalid:
            client.jobs.create(**{**JOB, "epochs": 0})
        assert invalid.value.status == 422 and "epochs" in invalid.value.detail
        assert [e.loc for e in invalid.value.errors] == [["body", "epochs"]]
        job = client.jobs.create(JobCreate(**JOB))
        assert client.jobs.cancel(job.id).status == "cancelled"
        with pytest.raises(Conflict, match="already finished"):
            client.jobs.cancel(job.id)
    with Client(url, "rd_wrong_key", retry=FAST) as stranger, pytest.raises(Unauthorized):
        stranger.jobs.get(job.id)


def test_a_429_is_retried_after_its_retry_after(server: Any) -> None:
    """The key's only event stream is taken: the next one is refused with 429 + Retry-After; the client
    waits (capped by the policy) and opens it once the first is closed."""
    app, url, key = server
    with Client(url, key, retry=FAST) as client:
        job = client.jobs.create(**JOB)
        holder = client.http.stream("GET", f"/v1/jobs/{job.id}/events", params={"stream": "true"})
        response = holder.__enter__()
        assert response.status_code == 200
        with Client(url, key, retry=RetryPolicy(attempts=1)) as impatient, pytest.raises(RateLimited) as err:
            next(iter(impatient.jobs.stream_events(job.id)))
        assert err.value.retry_after == 10 and "RD_MAX_STREAMS_PER_KEY" in err.value.detail

        statuses: list[int] = []
        client.http.event_hooks["response"].append(lambda r: statuses.append(r.status_code))
        patient = RetryPolicy(attempts=50, backoff=0.01, retry_after_max=0.1)
        got: list[Any] = []

        def follow() -> None:
            with Client(url, key, retry=patient) as follower:
                follower.http.event_hooks["response"].append(lambda r: statuses.append(r.status_code))
                for event in follower.jobs.stream_events(job.id):
                    got.append(event)
                    if len(got) == 1:
                        client.jobs.cancel(job.id)

        thread = threading.Thread(target=follow)
        thread.start()
        time.sleep(0.5)
        holder.__exit__(None, None, None)
        thread.join(30)
    assert not thread.is_alive()
    assert 429 in statuses and statuses[-1] == 200
    assert [e.payload["status"] for e in got] == ["queued", "cancelled"]


def test_a_broken_event_stream_resumes_with_last_event_id(server: Any) -> None:
    """The stream is cut right after its first event: the client reopens it with Last-Event-ID and gets
    the rest, nothing lost, nothing twice."""
    app, url, key = server
    with Client(url, key, retry=FAST) as direct:
        job = direct.jobs.create(**JOB)
        with cutting_proxy(url, "after_first_event") as proxy, Client(proxy_url(proxy), key, retry=FAST) as c:
            got = []
            for event in c.jobs.stream_events(job.id, progress=True):
                got.append(event)
                if isinstance(event, EventOut) and event.payload.get("status") == "queued":
                    direct.jobs.cancel(job.id)  # made while the stream is broken: must arrive after resuming
        events = [e for e in got if isinstance(e, EventOut)]
        assert [e.payload["status"] for e in events] == ["queued", "cancelled"]
        assert [e.id for e in events] == [e.id for e in direct.jobs.iter_events(job.id)]
    assert proxy.cuts == 1 and len(proxy.requests) == 2
    assert f"last-event-id: {events[0].id}".encode() in bytes(proxy.requests[1]).lower()


def test_jobs_list_follows_the_cursor_sync_and_async(server: Any, tmp_path: Path) -> None:
    import numpy as np

    app, url, key = server
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x=rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8), y=rng.integers(0, 3, 64))
    with Client(url, key, retry=FAST) as client:
        made = [client.jobs.create(**JOB).id for _ in range(3)]
        assert [j.id for j in client.jobs.list(page_size=2)] == made[::-1]
        assert client.jobs.create(**JOB, idempotency_key="same").id == client.jobs.create(
            **JOB, idempotency_key="same"
        ).id

    async def run() -> tuple[list[str], str, list[str]]:
        async with AsyncClient(url, key, retry=FAST) as aclient:
            listed = [j.id async for j in aclient.jobs.list(page_size=2)]
            job = await aclient.jobs.create(**JOB)
            await aclient.jobs.cancel(job.id)
            streamed = [e.payload["status"] async for e in aclient.jobs.stream_events(job.id)]
            done = await aclient.jobs.wait(job.id, poll_s=0.05, timeout=10)
            dataset = await aclient.datasets.upload(npz, name="tiny")  # multipart through the async client
            assert (await aclient.datasets.get(dataset.id)).num_classes == 3
            await aclient.datasets.delete(dataset.id)
            with pytest.raises(NotFound):
                await aclient.datasets.get(dataset.id)
            return listed, done.status, streamed

    listed, status, streamed = asyncio.run(run())
    assert len(listed) == 4 and listed[1:] == made[::-1]
    assert status == "cancelled" and streamed == ["queued", "cancelled"]
    assert len(_job_rows(app)) == 5


def _artifact(app: Any, job_id: str, name: str, data: bytes, sha256: str | None = None) -> None:
    """Store a file as the job's artifact, as a worker would."""
    with app.state.session_factory() as session:
        tenant = session.get(Job, job_id).tenant_id
        key = job_key(tenant, job_id, name)
        app.state.store.put_stream(key, io.BytesIO(data))
        digest = sha256 or hashlib.sha256(data).hexdigest()
        job_state.record_artifact(session, job_id, name, key, len(data), digest)
        session.commit()


def test_download_checks_the_sha256_and_restarts_a_cut_transfer(server: Any, tmp_path: Path) -> None:
    app, url, key = server
    blob = bytes(range(256)) * 4096  # 1 MiB
    with Client(url, key, retry=FAST) as client:
        job = client.jobs.create(**JOB)
        _artifact(app, job.id, "student_best.pt", blob)
        _artifact(app, job.id, "report.json", b'{"final": {"best": {"epoch": 1, "rows": []}}, "extra": 1}')
        _artifact(app, job.id, "tampered.pt", b"x" * 10, sha256="0" * 64)
        with cutting_proxy(url, "mid_body") as proxy, Client(proxy_url(proxy), key, retry=FAST) as cut:
            path = cut.jobs.download_artifact(job.id, "student_best.pt", tmp_path / "one")
        assert proxy.cuts == 1 and path.read_bytes() == blob and not list(tmp_path.glob("one/*.part"))

        paths = client.jobs.download(job.id, tmp_path / "all", names=["student_best.pt", "report.json"])
        assert [p.name for p in paths] == ["student_best.pt", "report.json"]
        report = client.jobs.report(job.id)
        assert report.final is not None and report.final["best"].epoch == 1
        assert report.model_extra == {"extra": 1}
        (tmp_path / "bad").mkdir()
        with pytest.raises(ChecksumMismatch):
            client.jobs.download_artifact(job.id, "tampered.pt", tmp_path / "bad")
        assert list((tmp_path / "bad").iterdir()) == []  # nothing half-written is left
        with pytest.raises(NotFound, match="no artifact"):
            client.jobs.download_artifact(job.id, "missing.pt", tmp_path / "bad")
    with pytest.raises(ValueError, match="plain file name"):
        artifact_target("../evil", tmp_path)


def test_progress_without_tqdm_prints_a_line_per_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill_client.models import JobOut, Progress
    from distill_client.progress import ProgressView

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    out = io.StringIO()
    view = ProgressView(out)
    running = JobOut.model_construct(id="j" * 32, status="running", latest_metrics={"loss": 1.5},
                                     progress=Progress(epoch=1, epochs=2, fraction=0.5))
    view.update(running)
    view.update(running)  # unchanged: not printed again
    view.line("epoch 1/2: loss=1.500")
    view.update(running.model_copy(update={"status": "succeeded"}))
    view.close()
    assert out.getvalue().splitlines() == [
        "jjjjjjjj running 50% epoch 1/2 loss 1.500",
        "epoch 1/2: loss=1.500",
        "jjjjjjjj succeeded 100% epoch 1/2 loss 1.500",
    ]
