"""What the service costs on top of a bare FastAPI app, measured on the real stack on 127.0.0.1.

The stack: a fresh PostgreSQL database (dropped at the end), Redis, ``weed mini`` as S3, the API under
uvicorn (``uvicorn --factory api.app:create_app``, uvicorn's defaults: one worker, access log) and one
Celery worker (``celery -A worker.celery_app worker``) on a queue of the run's own.

1. Status polling. One job is created through the API and cancelled at once (the worker receives its
   message and leaves it alone, so no training steals the CPU), then ``--clients`` concurrent clients
   (asyncio on uvloop, one lean keep-alive HTTP/1.1 connection each, in a separate load-generator process)
   poll ``GET /v1/jobs/{id}`` with the bearer key, and the same path on bench/bare_app.py, which returns
   the same JSON as a constant. Same uvicorn flags for both. Two modes, interleaved with the targets:
   ``paced`` (each client polls every ``--poll-interval`` seconds, first polls spread over one interval:
   latency at a realistic load, what the p99 target is about) and ``saturate`` (each client sends its
   next request as soon as the last is answered: the throughput ceiling; latency there is mostly
   queueing, about clients / throughput). Each client's first request opens its connection, untimed.
2. Upload memory. The RSS of a fresh one-worker API process (/proc VmRSS every ``--sample-ms``) while
   it receives ``--upload-mb`` MB streamed from disk (multipart, httpx streams the file): a junk file
   posted as a dataset (received, copied and hashed, then rejected at its first bytes: the streaming
   path alone) and a real teacher (the state_dict of a registered architecture, ``--teacher-arch``,
   with enough output classes to reach the size), which is also loaded and probed with torch and stored.
   A small teacher and dataset go first, so torch and numpy are already imported. Growth is over the RSS
   just before each upload, split by phase: receive+copy (until the copy in RD_WORK_DIR/uploads is
   complete), check (loading/probing, until the object store's files start growing) and store.
3. Event streams (bench/stream_load.py). ``--streams`` clients hold ``Accept: text/event-stream``
   requests open on a job while ``--clients`` status pollers and a few clients of another tenant
   (``GET /v1/teachers``, the ORM path) run; the p50/p99 of both with and without the streams, side
   by side, on one fresh API server, ``--stream-seconds`` each.

MB means 10^6 bytes throughout. The load generator, the servers and the API share this machine's CPUs.

    python -m bench.service_overhead                       # real stack, default sizes (a few minutes)
    python -m bench.service_overhead --api-workers 2 --rounds 1
    python -m bench.service_overhead --embedded --clients 5 --requests-per-client 5 --upload-mb 2
    python -m bench.service_overhead --upload-mb 0 --rounds 1 --streams 200   # polling and streams only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import stack, stream_load

MB = 1_000_000
DATA_FOLDER = "cifar-10-batches-py-partial"  # what the 'cifar10-partial' builtin needs to exist
DEFAULT_PG = os.environ.get("RD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
DEFAULT_REDIS = os.environ.get("RD_TEST_REDIS", "redis://127.0.0.1:6379/0")
P99_TARGET_MS = 25.0
RSS_TARGET_MB = 64.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200, help="concurrent polling clients")
    p.add_argument("--requests-per-client", type=int, default=20, help="timed requests per client (saturate)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls (paced; 0: skip)")
    p.add_argument("--paced-requests", type=int, default=10, help="timed requests per client (paced)")
    p.add_argument("--duration", type=float, default=30.0, help="cap in seconds on each load phase")
    p.add_argument("--rounds", type=int, default=2, help="times each (mode, target) phase runs, interleaved")
    p.add_argument(
        "--api-workers",
        "--workers",
        dest="workers",
        type=int,
        default=1,
        help="uvicorn --workers for both polled servers (the upload check always uses 1)",
    )
    p.add_argument("--no-access-log", action="store_true", help="uvicorn --no-access-log (default: logged)")
    p.add_argument("--no-worker", action="store_true", help="start no Celery worker")
    p.add_argument("--upload-mb", type=float, default=200.0, help="upload size in MB (0: skip uploads)")
    p.add_argument(
        "--teacher-arch",
        default="wrn_34_10",
        help="architecture of the uploaded teacher (tiny_cnn when this one is larger than the size)",
    )
    p.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling period")
    p.add_argument("--streams", type=int, default=200, help="open event streams in phase 3 (0: skip)")
    p.add_argument(
        "--stream-seconds", type=float, default=10.0, help="length of each streams phase (without, with)"
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="SQLite, folder broker and folder store instead of PostgreSQL, Redis and S3",
    )
    p.add_argument("--pg", default=DEFAULT_PG, help="libpq URL of a database to CREATE DATABASE from")
    p.add_argument("--redis", default=DEFAULT_REDIS, help="Redis to use (started on a free port if down)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=stack.REPO.parent / "shared" / "data",
        help=f"RD_DATA_ROOT (a placeholder is used when it has no {DATA_FOLDER})",
    )
    p.add_argument(
        "--log-dir", type=Path, default=None, help="keep the server logs here (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument("--loadgen", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.clients, args.requests_per_client, args.paced_requests, args.rounds, args.workers) < 1:
        p.error("--clients, --requests-per-client, --paced-requests, --rounds and --workers must be >= 1")
    if args.poll_interval < 0 or args.upload_mb < 0 or args.duration <= 0 or args.sample_ms <= 0:
        p.error("--poll-interval and --upload-mb must be >= 0, --duration and --sample-ms > 0")
    if args.streams < 0 or not 0 < args.stream_seconds <= 90:
        # The streamed job is queued without a message: the worker sends it again after 120 s.
        p.error("--streams must be >= 0 and --stream-seconds in (0, 90]")
    return args


# ---------------------------------------------------------------- the load generator (its own process)


def _cpu_self() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


class Connection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads whole responses: a lean client
    (as wrk or hey are), so that the load generator's own CPU time (~0.1 ms a request instead of httpx's
    ~1 ms) disturbs the servers it shares the CPUs with as little as possible. The servers' responses
    always carry a Content-Length; anything else is counted as an error."""

    def __init__(self, url: str, token: str | None) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = f"Host: {self.host}:{self.port}\r\n{auth}Accept: application/json\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        sizes = [int(line[15:]) for line in lines[1:] if line[:15].lower() == b"content-length:"]
        length = sizes[0] if sizes else None
        if length is None:
            raise ConnectionError(f"HTTP {status} without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _poll(spec: dict[str, Any]) -> dict[str, Any]:
    """Every client: one untimed request (opens the connection), then ``requests`` timed ones, paced
    every ``interval`` seconds when it is above 0, all stopping at the ``duration`` cap."""
    interval, path = float(spec["interval"]), spec["path"]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    rng = random.Random(0)

    async def request(client: Connection) -> float | None:
        start = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(client.get(path), 60.0)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            errors[type(exc).__name__] += 1
            await client.close()
            client.reader = client.writer = None  # reconnect on the next request
            return None
        if status != 200:
            errors[f"HTTP {status}"] += 1
            return None
        return time.perf_counter() - start

    async def run(client: Connection, t0: float, deadline: float) -> None:
        due = t0 + rng.random() * interval
        for _ in range(spec["requests"]):
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due += interval
            if time.perf_counter() >= deadline:
                return
            took = await request(client)
            if took is not None:
                latencies.append(took)

    clients = [Connection(spec["url"], spec.get("token")) for _ in range(spec["clients"])]
    try:
        await asyncio.gather(*(request(c) for c in clients))
        warmup_errors = dict(errors)
        errors.clear()
        cpu0, t0 = _cpu_self(), time.perf_counter()
        await asyncio.gather(*(run(c, t0, t0 + spec["duration"]) for c in clients))
        wall, cpu = time.perf_counter() - t0, _cpu_self() - cpu0
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {
        "latencies": latencies,
        "errors": dict(errors),
        "warmup_errors": warmup_errors,
        "wall_s": wall,
        "client_cpu_s": cpu,
    }


def loadgen_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    work = stream_load.run_phase(spec, _poll) if "loads" in spec else _poll(spec)
    try:
        import uvloop  # the event loop uvicorn itself runs on when installed (uvicorn[standard])

        result = uvloop.run(work)
    except ImportError:
        result = asyncio.run(work)
    Path(spec["out"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (nan for none)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled latencies (ms) and summed counts over the rounds of one (mode, target)."""
    lat = sorted(x * 1000 for r in runs for x in r["latencies"])
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])
        errors.update({f"warmup {k}": v for k, v in r["warmup_errors"].items()})
    wall = sum(r["wall_s"] for r in runs)
    return {
        "requests": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else math.nan,
        "mean_ms": sum(lat) / len(lat) if lat else math.nan,
        "rps": len(lat) / wall if wall else math.nan,
        "wall_s": wall,
        "p99_ms_per_round": [percentile(sorted(x * 1000 for x in r["latencies"]), 99) for r in runs],
        "server_cpu_ms_per_req": 1000 * sum(r["server_cpu_s"] for r in runs) / len(lat) if lat else math.nan,
        "db_cpu_ms_per_req": 1000 * sum(r["db_cpu_s"] for r in runs) / len(lat) if lat else math.nan,
        "client_cpu_s": sum(r["client_cpu_s"] for r in runs),
        "worker_cpu_s": sum(r["worker_cpu_s"] for r in runs),
    }


# ---------------------------------------------------------------- the stack


@dataclass
class Running:
    """Everything a run started: URLs, the environment the service processes get, the key, the job."""

    root: Path
    env: dict[str, str]
    token: str
    describe: str
    admin_url: str | None = None
    database: str | None = None
    store_dir: Path | None = None
    worker: stack.Worker | None = None
    notes: list[str] = field(default_factory=list)

    def db_cpu(self) -> dict[int, float]:
        """CPU seconds of each PostgreSQL backend serving this run's database ({} when not readable)."""
        if not self.admin_url or not self.database:
            return {}
        try:
            return {p: stack.cpu_seconds(p) for p in stack.backend_pids(self.admin_url, self.database)}
        except Exception:
            return {}


def _make_key(database_url: str) -> str:
    from service.auth import create_api_key
    from service.db import make_engine, make_session_factory, session_scope

    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return create_api_key(session, f"bench-{uuid.uuid4().hex[:8]}")
    finally:
        engine.dispose()


def _data_root(args: argparse.Namespace, root: Path) -> tuple[Path, str | None]:
    folder = args.data_root / DATA_FOLDER
    if folder.is_dir() and any(folder.iterdir()):
        return args.data_root, None
    placeholder = root / "data"
    (placeholder / DATA_FOLDER).mkdir(parents=True, exist_ok=True)
    (placeholder / DATA_FOLDER / "placeholder").write_text("the polled job is cancelled before it runs\n")
    return placeholder, f"no {DATA_FOLDER} under {args.data_root}: a placeholder data root was used"


@contextlib.contextmanager
def start_stack(args: argparse.Namespace, root: Path) -> Iterator[Running]:
    from service.db import upgrade_to_head

    queue = f"bench-{uuid.uuid4().hex[:10]}"
    data_root, note = _data_root(args, root)
    env = {
        "RD_VAR_DIR": str(root / "var"),
        "RD_WORK_DIR": str(root / "api-work"),
        "RD_DATA_ROOT": str(data_root),
        "RD_QUEUE": queue,
        "RD_MAX_UPLOAD_BYTES": str(max(512 * 1024 * 1024, int(2 * args.upload_mb * MB))),
        "PYTHONUNBUFFERED": "1",
    }
    with ExitStack() as exits:
        if args.embedded:
            env["RD_DATABASE_URL"] = f"sqlite:///{root / 'var' / 'rd.sqlite3'}"
            env["RD_BROKER_URL"] = "filesystem://"
            env["RD_STORE_URL"] = f"file://{root / 'var' / 'objects'}"
            running = Running(root, env, "", "embedded: SQLite, folder broker, folder store")
            running.store_dir = root / "var" / "objects"
        else:
            name, url = exits.enter_context(stack.postgres_database(args.pg))
            redis_url, started = exits.enter_context(stack.redis_server(args.redis, root / "redis"))
            s3 = exits.enter_context(stack.weed_s3(root / "weed"))
            exits.callback(_forget, redis_url, queue)
            env.update(
                {
                    "RD_DATABASE_URL": url,
                    "RD_BROKER_URL": redis_url,
                    "RD_STORE_URL": f"s3://{s3.bucket}",
                    "RD_S3_ENDPOINT_URL": s3.endpoint_url,
                    "RD_S3_ACCESS_KEY": s3.access_key,
                    "RD_S3_SECRET_KEY": s3.secret_key,
                    "RD_S3_REGION": s3.region,
                }
            )
            describe = (
                f"real stack: PostgreSQL (fresh database {name}), Redis {redis_url}"
                f"{' (started here)' if started else ''}, weed mini S3"
            )
            running = Running(root, env, "", describe, admin_url=args.pg, database=name)
            running.store_dir = root / "weed" / "data"
        (root / "var").mkdir(parents=True, exist_ok=True)
        upgrade_to_head(env["RD_DATABASE_URL"])
        running.token = _make_key(env["RD_DATABASE_URL"])
        if note:
            running.notes.append(note)
        if not args.no_worker:
            worker_env = {**env, "RD_WORK_DIR": str(root / "worker-work")}
            # Idle at the end (the one job was cancelled): a short grace before SIGKILL loses nothing.
            worker = stack.celery_worker(worker_env, queue, root / "worker.log", grace=3.0)
            running.worker = exits.enter_context(worker)
            running.describe += ", 1 Celery worker"
        yield running


def _forget(redis_url: str, queue: str) -> None:
    with contextlib.suppress(Exception):
        stack.forget_queue(redis_url, queue)


def _make_polled_job(api: stack.Server, running: Running) -> tuple[str, dict[str, Any]]:
    """A job created and cancelled through the API; its id and the JSON the status poll returns."""
    headers = {"Authorization": f"Bearer {running.token}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=120) as client:
        r = client.post(
            "/v1/jobs",
            json={"student": "tiny_cnn", "method": "natural", "dataset": "cifar10-partial", "epochs": 1},
        )
        if r.status_code != 201:
            raise stack.StackError(f"POST /v1/jobs answered {r.status_code}: {r.text[:500]}")
        job_id = r.json()["id"]
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        if r.status_code != 200:
            raise stack.StackError(f"cancelling job {job_id} answered {r.status_code}: {r.text[:500]}")
        if running.worker is not None:
            deadline = time.monotonic() + 60
            while not running.worker.saw(job_id) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not running.worker.saw(job_id):
                running.notes.append(f"the Celery worker did not log job {job_id} within 60 s")
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code != 200:
            raise stack.StackError(f"GET /v1/jobs/{job_id} answered {r.status_code}: {r.text[:500]}")
        return job_id, r.json()


# ---------------------------------------------------------------- status polling


def run_loadgen(server: stack.Server, running: Running, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One load phase in a fresh load-generator process, with the servers' CPU time over it."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    spec_path, out = folder / f"load-{tag}.json", folder / f"load-{tag}.out.json"
    spec_path.write_text(json.dumps({**spec, "url": server.url, "out": str(out)}))
    cpu0, db0 = server.cpu(), running.db_cpu()
    w0 = running.worker.cpu() if running.worker else 0.0
    cmd = [sys.executable, "-m", "bench.service_overhead", "--loadgen", str(spec_path)]
    path = os.pathsep.join(p for p in (str(stack.REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        cmd,
        cwd=stack.REPO,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=spec["duration"] + 120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["server_cpu_s"] = server.cpu() - cpu0
    # Backends that closed meanwhile are not counted; new ones count from their start.
    result["db_cpu_s"] = sum(max(0.0, c - db0.get(p, 0.0)) for p, c in running.db_cpu().items())
    result["worker_cpu_s"] = (running.worker.cpu() if running.worker else 0.0) - w0
    return result


def measure_polling(args: argparse.Namespace, running: Running) -> dict[str, Any]:
    flags = stack.uvicorn_args(args.workers, not args.no_access_log)
    with ExitStack() as exits:
        api = exits.enter_context(
            stack.uvicorn_server("api.app:create_app", running.env, running.root / "api.log", flags)
        )
        job_id, body = _make_polled_job(api, running)
        bare_env = {"BENCH_BARE_BODY": json.dumps(body)}
        bare = exits.enter_context(
            stack.uvicorn_server("bench.bare_app:create_app", bare_env, running.root / "bare.log", flags)
        )
        path = f"/v1/jobs/{job_id}"
        base = {"path": path, "token": running.token, "clients": args.clients, "duration": args.duration}
        modes: dict[str, dict[str, Any]] = {}
        if args.poll_interval > 0:
            modes["paced"] = {"interval": args.poll_interval, "requests": args.paced_requests}
        modes["saturate"] = {"interval": 0.0, "requests": args.requests_per_client}
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for mode, extra in modes.items():
                for target, server in (("ours", api), ("bare", bare)):
                    result = run_loadgen(server, running, {**base, **extra}, running.root / "load")
                    runs.setdefault((mode, target), []).append(result)
                    print(
                        f"  round {rnd + 1} {mode:8s} {target}: {len(result['latencies'])} requests in "
                        f"{result['wall_s']:.1f} s, errors {sum(result['errors'].values())}",
                        flush=True,
                    )
        out: dict[str, Any] = {
            "job_id": job_id,
            "status": body.get("status"),
            "body_bytes": len(json.dumps(body)),
        }
        for (mode, target), rs in runs.items():
            out.setdefault(mode, {})[target] = summarize(rs)
        return out


# ---------------------------------------------------------------- upload memory


def make_teacher(path: Path, size_bytes: int, arch: str) -> dict[str, Any]:
    """A state_dict of ``arch`` (tiny_cnn when ``arch`` alone is larger) with enough classes for the size."""
    import torch

    from core.models import create_model

    def nbytes(name: str, classes: int) -> int:
        with torch.device("meta"):
            model = create_model(name, classes)
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    base = nbytes(arch, 10)
    if base > size_bytes:
        arch, base = "tiny_cnn", nbytes("tiny_cnn", 10)
    per_class = nbytes(arch, 11) - base
    classes = max(10, 10 + math.ceil((size_bytes - base) / per_class))
    torch.manual_seed(0)
    model = create_model(arch, classes)
    torch.save(model.state_dict(), path)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    return {"arch": arch, "num_classes": classes, "num_params": num_params, "file_bytes": path.stat().st_size}


def make_junk(path: Path, size_bytes: int) -> None:
    block = random.Random(1).randbytes(MB)
    with open(path, "wb") as f:
        left = size_bytes
        while left > 0:
            f.write(block[: min(left, MB)])
            left -= MB


class RssSampler:
    """Samples the API process's VmRSS, the bytes copied into its upload folder and the object store's
    size every ``period`` seconds, in a thread."""

    def __init__(self, pid: int, upload_dir: Path, store_dir: Path | None, period: float) -> None:
        self.pid, self.upload_dir, self.store_dir, self.period = pid, upload_dir, store_dir, period
        # (t, VmRSS kB, upload bytes, store bytes, RssAnon kB)
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, int, int, int, int]:
        mem = stack.memory_kb(self.pid)
        store = stack.dir_bytes(self.store_dir) if self.store_dir else 0
        return (
            time.perf_counter(),
            mem.get("VmRSS", 0),
            stack.dir_bytes(self.upload_dir),
            store,
            mem.get("RssAnon", 0),
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _upload(
    client: httpx.Client,
    route: str,
    path: Path,
    form: dict[str, str],
    sampler_args: tuple[Any, ...],
    expect: int,
) -> dict[str, Any]:
    """POST ``path`` as multipart while sampling; RSS growth (MB) over the RSS just before, by phase."""
    size = path.stat().st_size
    pid, upload_dir, store_dir, period = sampler_args
    time.sleep(0.5)  # let the previous request's garbage settle
    base_mem = stack.memory_kb(pid)
    base_rss, base_anon = base_mem.get("VmRSS", 0), base_mem.get("RssAnon", 0)
    base_store = stack.dir_bytes(store_dir) if store_dir else 0
    with RssSampler(pid, upload_dir, store_dir, period) as sampler:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            r = client.post(route, files={"file": (path.name, f, "application/octet-stream")}, data=form)
        t1 = time.perf_counter()
        time.sleep(0.3)
    after_rss = stack.memory_kb(pid).get("VmRSS", 0)
    if r.status_code != expect:
        raise RuntimeError(f"POST {route} with {path.name} answered {r.status_code}: {r.text[:500]}")
    samples = [s for s in sampler.samples if t0 <= s[0] <= t1] or sampler.samples
    copy_done = next((s[0] for s in samples if s[2] >= size), None)
    store_start = next((s[0] for s in samples if s[3] - base_store > min(MB, size // 4)), None)

    def peak(start: float | None, end: float | None) -> float | None:
        if start is None or end is None:
            return None
        window = [s[1] for s in samples if start <= s[0] <= end]
        return (max(window) - base_rss) * 1000 / MB if window else None

    last = t1
    phases = {"receive+copy": peak(t0, copy_done)}
    if store_start is not None and copy_done is not None:
        phases["check"] = peak(copy_done, store_start)
        phases["store"] = peak(store_start, last)
    else:
        phases["check"] = peak(copy_done, last)
    return {
        "status": r.status_code,
        "seconds": t1 - t0,
        "mb_per_s": size / MB / (t1 - t0),
        "file_mb": size / MB,
        "base_rss_mb": base_rss * 1000 / MB,
        "peak_growth_mb": (max(s[1] for s in samples) - base_rss) * 1000 / MB,
        "peak_anon_growth_mb": (max(s[4] for s in samples) - base_anon) * 1000 / MB,
        "phase_peak_growth_mb": phases,
        "after_growth_mb": (after_rss - base_rss) * 1000 / MB,
        "samples": len(samples),
        "copy_seen": copy_done is not None,
    }


def measure_uploads(args: argparse.Namespace, running: Running) -> dict[str, Any]:
    size = int(args.upload_mb * MB)
    files = running.root / "files"
    files.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    teacher = make_teacher(files / "teacher.pt", size, args.teacher_arch)
    make_junk(files / "junk.npz", size)
    make_teacher(files / "small-teacher.pt", 100_000, "tiny_cnn")
    make_junk(files / "small-junk.npz", 100_000)
    print(
        f"  made a {teacher['file_bytes'] / MB:.1f} MB {teacher['arch']} teacher "
        f"({teacher['num_classes']} classes) and junk in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    with stack.uvicorn_server(
        "api.app:create_app",
        running.env,
        running.root / "api-upload.log",
        stack.uvicorn_args(1, not args.no_access_log),
    ) as api:
        pid = api.proc.pid
        sampler_args = (
            pid,
            Path(running.env["RD_WORK_DIR"]) / "uploads",
            running.store_dir,
            args.sample_ms / 1000,
        )
        headers = {"Authorization": f"Bearer {running.token}"}
        with httpx.Client(base_url=api.url, headers=headers, timeout=httpx.Timeout(600.0)) as client:
            fresh_rss = stack.memory_kb(pid).get("VmRSS", 0) * 1000 / MB
            # Warm-up: torch, numpy and core imported, the database pool and the store client in use.
            _upload(
                client, "/v1/teachers", files / "small-teacher.pt", {"arch": "tiny_cnn"}, sampler_args, 201
            )
            _upload(client, "/v1/datasets", files / "small-junk.npz", {}, sampler_args, 422)
            warm_rss = stack.memory_kb(pid).get("VmRSS", 0) * 1000 / MB
            dataset = _upload(client, "/v1/datasets", files / "junk.npz", {}, sampler_args, 422)
            print(
                f"  dataset upload (junk, streaming path): {dataset['seconds']:.1f} s, "
                f"peak RSS +{dataset['peak_growth_mb']:.1f} MB",
                flush=True,
            )
            teach = _upload(
                client, "/v1/teachers", files / "teacher.pt", {"arch": teacher["arch"]}, sampler_args, 201
            )
            print(
                f"  teacher upload: {teach['seconds']:.1f} s, peak RSS +{teach['peak_growth_mb']:.1f} MB",
                flush=True,
            )
    for p in files.iterdir():
        p.unlink()
    return {
        "fresh_rss_mb": fresh_rss,
        "warm_rss_mb": warm_rss,
        "teacher_file": teacher,
        "dataset": dataset,
        "teacher": teach,
    }


# ---------------------------------------------------------------- report


def _ms(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.1f} ms"


def _ratio(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f} MB"


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    poll = result.get("polling", {})
    flags = stack.uvicorn_args(args.workers, not args.no_access_log)
    print()
    print(f"== service overhead: {result['stack']}")
    print(
        f"   uvicorn {' '.join(flags) or '(defaults: 1 worker, access log)'}; {args.clients} clients; "
        f"{args.rounds} round(s); load generator in its own process on the same {os.cpu_count()} CPUs"
    )
    for note in result.get("notes", []):
        print(f"   note: {note}")
    print(
        f"-- status poll GET /v1/jobs/{{id}} (bearer key; job {poll.get('status')}, "
        f"{poll.get('body_bytes')} bytes of JSON)"
    )
    for mode in ("paced", "saturate"):
        if mode not in poll:
            continue
        label = f"paced every {args.poll_interval:g} s" if mode == "paced" else "saturate (closed loop)"
        ours, bare = poll[mode]["ours"], poll[mode]["bare"]
        for name, s in (("ours", ours), ("bare", bare)):
            print(
                f"{label:24s} {name}: p50 {_ms(s['p50_ms'])}  p99 {_ms(s['p99_ms'])}  "
                f"throughput {s['rps']:.0f} req/s  errors {s['errors']}  ({s['requests']} requests; "
                f"server CPU {s['server_cpu_ms_per_req']:.2f} ms/req, "
                f"db CPU {s['db_cpu_ms_per_req']:.2f} ms/req, "
                f"client CPU {s['client_cpu_s']:.1f} s)"
                + (f"  errors by kind: {s['error_kinds']}" if s["errors"] else "")
            )
        print(
            f"{label:24s} ratio ours/bare: p50 {_ratio(ours['p50_ms'], bare['p50_ms'])}  "
            f"p99 {_ratio(ours['p99_ms'], bare['p99_ms'])}  throughput {_ratio(ours['rps'], bare['rps'])}"
        )
    if "streams" in result:
        stream_load.report(args, result["streams"], _ms)
    up = result.get("uploads")
    if up:
        tf = up["teacher_file"]
        print(
            f"-- upload {args.upload_mb:g} MB, streamed multipart, to a fresh 1-worker API "
            f"(RSS {up['fresh_rss_mb']:.0f} MB fresh, {up['warm_rss_mb']:.0f} MB after warm-up uploads)"
        )
        d = up["dataset"]
        print(
            f"dataset (junk, rejected after receive+copy): HTTP {d['status']} in {d['seconds']:.1f} s; "
            f"peak RSS growth {_mb(d['peak_growth_mb'])} (anonymous {_mb(d['peak_anon_growth_mb'])}; "
            f"receive+copy {_mb(d['phase_peak_growth_mb'].get('receive+copy'))})"
        )
        t = up["teacher"]
        ph = t["phase_peak_growth_mb"]
        print(
            f"teacher {tf['arch']} ({tf['num_classes']} classes, {tf['file_bytes'] / MB:.1f} MB state_dict): "
            f"HTTP {t['status']} in {t['seconds']:.1f} s; peak RSS growth {_mb(t['peak_growth_mb'])} "
            f"(anonymous {_mb(t['peak_anon_growth_mb'])}; receive+copy {_mb(ph.get('receive+copy'))}, "
            f"load+probe {_mb(ph.get('check'))}, "
            f"store {_mb(ph.get('store'))}; {_mb(t['after_growth_mb'])} after)"
        )
    print("-- targets")
    if "paced" in poll:
        s = poll["paced"]["ours"]
        ok = s["p99_ms"] < P99_TARGET_MS and s["errors"] == 0
        print(
            f"poll p99 < {P99_TARGET_MS:g} ms with no errors at {args.clients} clients polling every "
            f"{args.poll_interval:g} s: {'MET' if ok else 'MISSED'} "
            f"({_ms(s['p99_ms'])}, {s['errors']} errors)"
        )
    if "saturate" in poll:
        s = poll["saturate"]["ours"]
        ok = s["p99_ms"] < P99_TARGET_MS and s["errors"] == 0
        floor = 1000 * args.clients / s["rps"] if s["rps"] else math.nan
        bare = poll["saturate"]["bare"]
        print(
            f"poll p99 < {P99_TARGET_MS:g} ms with no errors at {args.clients} clients in a closed loop: "
            f"{'MET' if ok else 'MISSED'} ({_ms(s['p99_ms'])}, {s['errors']} errors; a closed loop's mean "
            f"latency is clients / throughput = {_ms(floor)} by Little's law, so it measures capacity: "
            f"the bare endpoint's p99 is {_ms(bare['p99_ms'])})"
        )
    if up:
        recv = up["dataset"]["peak_growth_mb"]
        print(
            f"upload receive (streaming path) peak RSS growth < {RSS_TARGET_MB:g} MB: "
            f"{'MET' if recv < RSS_TARGET_MB else 'MISSED'} ({_mb(recv)})"
        )
        whole = up["teacher"]["peak_growth_mb"]
        print(
            f"teacher upload incl. load+probe peak RSS growth < {RSS_TARGET_MB:g} MB: "
            f"{'MET' if whole < RSS_TARGET_MB else 'MISSED'} ({_mb(whole)})"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.loadgen is not None:
        loadgen_main(args.loadgen)
        return {}
    with ExitStack() as exits:
        if args.log_dir is not None:
            root = args.log_dir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="rd-bench-svc-")))
        t0 = time.perf_counter()
        print(f"starting the {'embedded' if args.embedded else 'real'} stack (logs in {root})", flush=True)
        running = exits.enter_context(start_stack(args, root))
        print(f"  up in {time.perf_counter() - t0:.1f} s: {running.describe}", flush=True)
        result: dict[str, Any] = {
            "stack": running.describe,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        print("status polling", flush=True)
        result["polling"] = measure_polling(args, running)
        if args.streams > 0:
            print("event streams", flush=True)
            result["streams"] = stream_load.measure(args, running, run_loadgen, summarize)
        if args.upload_mb > 0:
            print("upload memory", flush=True)
            result["uploads"] = measure_uploads(args, running)
        if running.worker is not None and running.worker.proc.poll() is not None:
            running.notes.append(f"the Celery worker exited early ({running.worker.proc.returncode})")
        result["notes"] = running.notes
        result["total_s"] = time.perf_counter() - t0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    report(args, result)
    return result


if __name__ == "__main__":
    main()
