"""Real servers for the integration layer: PostgreSQL, an S3 server (SeaweedFS) and Redis.

Fixtures (session-scoped unless said otherwise):
- ``pg_admin_url``: libpq URL of a database we may CREATE DATABASE from (``RD_TEST_PG``, default
  ``postgresql://postgres@127.0.0.1:5432/test``, trust auth).
- ``pg_url``: a fresh, uniquely named database, migrated to head, dropped at the end (SQLAlchemy URL).
- ``make_database``: a factory for more empty databases (dropped at the end), e.g. for migration tests.
- ``s3``: ``weed mini`` started on free ports, with credentials (``S3``), stopped at the end.
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
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.stack import S3, StackError, redis_server, weed_s3  # the benches start the same servers
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SESSION = uuid.uuid4().hex[:10]


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


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    try:
        with weed_s3(tmp_path_factory.mktemp("seaweed"), bucket=f"rd-test-{SESSION}") as server:
            yield server
    except StackError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def s3_bucket(s3: S3) -> str:
    return s3.bucket


def _bucket_keys(s3: S3, bucket: str) -> list[str]:
    keys: list[str] = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


@pytest.fixture
def bucket_keys(s3: S3, s3_bucket: str) -> Callable[[], list[str]]:
    """Every key in the session's bucket, read straight from S3 (not through the service)."""
    return lambda: _bucket_keys(s3, s3_bucket)


# ---------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    wanted = os.environ.get("RD_TEST_REDIS", "redis://127.0.0.1:6379/0")
    try:
        with redis_server(wanted, tmp_path_factory.mktemp("redis")) as (url, _started):
            yield url
    except StackError as exc:
        pytest.fail(str(exc))


# ---------------------------------------------------------------- the service on all three


@pytest.fixture
def service_settings(tmp_path: Path, pg_url: str, s3: S3, s3_bucket: str, redis_url: str) -> Settings:
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
def clean_state(pg_url: str, s3: S3, s3_bucket: str) -> None:
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
