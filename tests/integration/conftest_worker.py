"""Helpers for the end-to-end worker tests: the API under uvicorn and Celery workers as real processes.

Each stack gets a queue (and tenant) of its own, so runs never see each other's messages, and each
worker a scratch folder of its own, as if it ran on its own machine: a resumed job must come back
through the object store, not through a leftover local file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from distill_client import Client

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# Fast lease for tests: heartbeat every second, a worker silent for 6 s is presumed dead.
LEASE_ENV = {
    "RD_HEARTBEAT_S": "1",
    "RD_STALE_AFTER_S": "6",
    "RD_REAP_EVERY_S": "2",
    "RD_CANCEL_POLL_S": "0.5",
}


@dataclass
class WorkerServices:
    """The shared test servers as RD_* variables, and fresh databases on demand."""

    env: dict[str, str]
    new_database: Callable[[], str]


@pytest.fixture(scope="session")
def worker_services(
    make_database: Callable[[], str], s3: Any, s3_bucket: str, redis_url: str
) -> WorkerServices:
    """Each stack gets a database of its own: a worker's reaper requeues every stale job it can see, so
    it must not see jobs other tests left behind, nor another stack's."""

    def new_database() -> str:
        from service.db import upgrade_to_head

        url = make_database()
        upgrade_to_head(url)
        return url

    env = {
        "RD_BROKER_URL": redis_url,
        "RD_STORE_URL": f"s3://{s3_bucket}",
        "RD_S3_ENDPOINT_URL": s3.endpoint_url,
        "RD_S3_ACCESS_KEY": s3.access_key,
        "RD_S3_SECRET_KEY": s3.secret_key,
        "RD_S3_REGION": s3.region,
        "RD_DATA_ROOT": os.environ.get("RD_TEST_DATA_ROOT", str(REPO.parent / "shared" / "data")),
    }
    return WorkerServices(env, new_database)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """One API process, its workers, and a client holding a fresh tenant's key."""

    env: dict[str, str]
    root: Path
    queue: str
    client: Client
    api: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return self.env["RD_DATABASE_URL"]

    def start_worker(self) -> subprocess.Popen[bytes]:
        """A Celery worker in a process group of its own (so a test can SIGKILL it with its children)."""
        n = len(self.workers)
        env = {**self.env, "RD_WORK_DIR": str(self.root / f"work-{n}")}
        log = open(self.root / f"worker-{n}.log", "wb")
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "celery"),
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                self.queue,
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "-l",
                "info",
                "-n",
                f"e2e{n}-{self.queue}@%h",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.workers.append(proc)
        return proc

    def worker_log(self, tail: int = 6000) -> str:
        parts = []
        for path in sorted(self.root.glob("worker-*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM (Celery's warm shutdown, uvicorn's graceful stop), then SIGKILL the whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _make_key(database_url: str, tenant: str) -> str:
    from service.auth import create_api_key
    from service.db import make_engine, make_session_factory, session_scope

    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return create_api_key(session, tenant)
    finally:
        engine.dispose()


def _forget_queue(broker_url: str, queue: str) -> None:
    """Drop what Redis still holds for this queue: messages a SIGKILLed worker never acknowledged stay
    in the 'unacked' hash for the visibility timeout (days) and would otherwise outlive the test."""
    if not broker_url.startswith("redis"):
        return
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        for tag, raw in client.hgetall("unacked").items():
            with contextlib.suppress(ValueError, TypeError, IndexError):
                if json.loads(raw)[2] == queue:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
        client.delete(queue)
    finally:
        client.close()


@contextlib.contextmanager
def start_stack(services: WorkerServices, root: Path) -> Iterator[Stack]:
    queue = f"e2e-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        **services.env,
        **LEASE_ENV,
        "RD_DATABASE_URL": services.new_database(),
        "RD_QUEUE": queue,
        "RD_VAR_DIR": str(root / "var"),
        "RD_WORK_DIR": str(root / "api-work"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    api_log = open(root / "api.log", "wb")
    api = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=api_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api_log.close()
    client: Client | None = None
    stack: Stack | None = None
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if api.poll() is not None:
                raise RuntimeError(f"the API exited: {(root / 'api.log').read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start: {(root / 'api.log').read_text()[-3000:]}")
            time.sleep(0.3)
        client = Client(url, _make_key(env["RD_DATABASE_URL"], f"tenant-{queue}"))
        stack = Stack(env=env, root=root, queue=queue, client=client, api=api)
        yield stack
    finally:
        for proc in stack.workers if stack else []:
            _stop(proc)
        _stop(api)
        if client is not None:
            client.close()
        _forget_queue(env.get("RD_BROKER_URL", ""), queue)


def db_rows(stack: Stack, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of a raw query, for what the API does not show (dedupe keys)."""
    import sqlalchemy as sa

    from service.db import make_engine

    engine = make_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()
