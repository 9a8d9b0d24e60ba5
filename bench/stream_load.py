"""Open server-sent event streams next to ordinary requests: the ``streams`` phase of
``bench.service_overhead`` (``--streams``, ``--stream-seconds``).

One job of its own (queued and never enqueued, so it stays open; created just before the phase, well
inside the worker's resend period for queued jobs) is streamed by ``--streams`` clients
(``Accept: text/event-stream``, over as many API keys of the job's tenant as ``RD_MAX_STREAMS_PER_KEY``
requires). Two phases run on one fresh API server, each ``--stream-seconds`` long, without the streams
and with them, interleaved ``--rounds`` times. In both, ``--clients`` clients poll the job's status
every ``--poll-interval`` seconds and a few clients of another tenant send a normal database-backed
request (``GET /v1/teachers``: the ORM path through the request gate) every quarter second; the p50/p99
of both are printed side by side. With the streams open, one more stream on a key that already holds
its limit shows the 429.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench import stack

PROBE_PATH = "/v1/teachers"
PROBE_CLIENTS = 4
PROBE_INTERVAL_S = 0.25


# ---------------------------------------------------------------- the load generator side


class OpenStream:
    """One raw event-stream request whose response is drained in the background until closed."""

    def __init__(self) -> None:
        self.status = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.drain: asyncio.Task[None] | None = None

    async def open(self, url: str, path: str, token: str) -> None:
        parsed = httpx.URL(url)
        self.reader, self.writer = await asyncio.open_connection(parsed.host, parsed.port)
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {parsed.host}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.reader is not None
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await self.reader.read(65536):
                pass

    @property
    def open_now(self) -> bool:
        """Answered 200 and not closed by the server since."""
        return self.status == 200 and self.drain is not None and not self.drain.done()

    async def close(self) -> None:
        if self.drain is not None:
            self.drain.cancel()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _open(url: str, path: str, token: str) -> OpenStream:
    stream = OpenStream()
    try:
        await asyncio.wait_for(stream.open(url, path, token), 60.0)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
        stream.status = -1
    return stream


Poll = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def run_phase(spec: dict[str, Any], poll: Poll) -> dict[str, Any]:
    """Open ``spec['streams']`` (each ``[path, token]``), run every load of ``spec['loads']`` at once with
    ``poll`` (bench.service_overhead's paced clients), try ``spec['extra']`` once more, close all."""
    url = spec["url"]
    streams = list(await asyncio.gather(*(_open(url, path, token) for path, token in spec["streams"])))
    try:
        extra = None
        if spec.get("extra"):
            one = await _open(url, *spec["extra"])
            extra = one.status
            await one.close()
        loads = await asyncio.gather(*(poll({**load, "url": url}) for load in spec["loads"]))
        still_open = sum(s.open_now for s in streams)
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    return {
        "stream_statuses": dict(Counter(str(s.status) for s in streams)),
        "streams_open_at_end": still_open,
        "extra_status": extra,
        "loads": list(loads),
    }


# ---------------------------------------------------------------- the orchestrating side


def _prepare(database_url: str, streams: int, per_key: int) -> tuple[str, list[str], str]:
    """A queued job of a fresh tenant, enough keys of that tenant for ``streams`` streams, and a key of
    another tenant (the one sending normal requests)."""
    from service.auth import create_api_key, get_or_create_tenant
    from service.db import make_engine, make_session_factory, session_scope
    from service.jobs import add_event
    from service.models import Job

    tenant = f"bench-streams-{uuid.uuid4().hex[:8]}"
    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            keys = [create_api_key(session, tenant) for _ in range(max(1, math.ceil(streams / per_key)))]
            job = Job(
                tenant_id=get_or_create_tenant(session, tenant).id,
                student_arch="tiny_cnn",
                method="natural",
                params={},
                status="queued",
                progress={"epoch": 0, "epochs": 1, "fraction": 0.0},
            )
            session.add(job)
            session.flush()
            add_event(session, job.id, "status", {"status": "queued"})
            other = create_api_key(session, f"bench-other-{uuid.uuid4().hex[:8]}")
            return job.id, keys, other
    finally:
        engine.dispose()


def measure(
    args: argparse.Namespace,
    running: Any,
    run_loadgen: Callable[[stack.Server, Any, dict[str, Any], Path], dict[str, Any]],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """Both phases on one fresh API server; p50/p99 of the status polls and the normal request."""
    from service.settings import Settings

    per_key = Settings().max_streams_per_key  # the API gets this process's environment
    flags = stack.uvicorn_args(args.workers, not args.no_access_log)
    log = running.root / "api-streams.log"
    with stack.uvicorn_server("api.app:create_app", running.env, log, flags) as api:
        job_id, keys, other = _prepare(running.env["RD_DATABASE_URL"], args.streams, per_key)
        events = f"/v1/jobs/{job_id}/events"
        seconds, interval = args.stream_seconds, args.poll_interval or 1.0
        loads = [
            {
                "path": f"/v1/jobs/{job_id}",
                "token": keys[0],
                "clients": args.clients,
                "interval": interval,
                "requests": math.ceil(seconds / interval) + 1,
                "duration": seconds,
            },
            {
                "path": PROBE_PATH,
                "token": other,
                "clients": PROBE_CLIENTS,
                "interval": PROBE_INTERVAL_S,
                "requests": math.ceil(seconds / PROBE_INTERVAL_S) + 1,
                "duration": seconds,
            },
        ]
        streams = [[events, keys[i // per_key]] for i in range(args.streams)]
        full_key = keys[0] if args.streams >= per_key else None
        phases = {
            "without": {"streams": [], "loads": loads},
            "with": {"streams": streams, "loads": loads, "extra": [events, full_key] if full_key else None},
        }
        runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
        for rnd in range(args.rounds):  # interleaved, so that a busy moment of the machine hits both
            for phase, spec in phases.items():
                result = run_loadgen(api, running, {**spec, "duration": seconds}, running.root / "load")
                runs[phase].append(result)
                polls, probes = (len(load["latencies"]) for load in result["loads"])
                print(
                    f"  round {rnd + 1} {phase} streams: status polls {polls}, {PROBE_PATH} {probes}, "
                    f"streams {result['stream_statuses']}",
                    flush=True,
                )
                time.sleep(1.0)  # the server notices the closed streams and frees their slots
        out: dict[str, Any] = {"streams": args.streams, "keys": len(keys), "per_key": per_key}
        for phase, results in runs.items():
            statuses: Counter[str] = Counter()
            for result in results:
                statuses.update(result["stream_statuses"])
            out[phase] = {
                "status_poll": summarize([_as_run(r, 0) for r in results]),
                "normal_request": summarize([_as_run(r, 1) for r in results]),
                "stream_statuses": dict(statuses),
                "streams_open_at_end": min(r["streams_open_at_end"] for r in results),
                "extra_status": sorted({r["extra_status"] for r in results}, key=str),
                # CPU seconds of the API process per second of the phase: the cost of the streams
                # themselves, which the latencies show only through queueing on a busy machine.
                "api_cpu_per_s": sum(r["server_cpu_s"] for r in results)
                / max(1e-9, sum(r["loads"][0]["wall_s"] for r in results)),
            }
        return out


def _as_run(result: dict[str, Any], index: int) -> dict[str, Any]:
    """One load of a phase in the shape ``summarize`` takes (the servers' CPU is the whole phase's)."""
    load = result["loads"][index]
    return {**load, **{k: result[k] for k in ("server_cpu_s", "db_cpu_s", "worker_cpu_s")}}


def report(args: argparse.Namespace, result: dict[str, Any], ms: Callable[[float], str]) -> None:
    print(
        f"-- {result['streams']} open event streams ({result['keys']} keys of one tenant, "
        f"RD_MAX_STREAMS_PER_KEY={result['per_key']}) next to {args.clients} status pollers every "
        f"{args.poll_interval or 1.0:g} s and {PROBE_CLIENTS} clients of another tenant sending "
        f"GET {PROBE_PATH} every {PROBE_INTERVAL_S:g} s; {args.rounds} x {args.stream_seconds:g} s each, "
        "interleaved"
    )
    for name, label in (("normal_request", f"GET {PROBE_PATH}"), ("status_poll", "GET /v1/jobs/{id}")):
        cells = []
        for phase in ("without", "with"):
            s = result[phase][name]
            cells.append(
                f"{phase} streams: p50 {ms(s['p50_ms'])} p99 {ms(s['p99_ms'])} "
                f"({s['requests']} requests, errors {s['errors']})"
            )
        print(f"{label:22s} " + "  |  ".join(cells))
    with_streams = result["with"]
    print(
        f"API process CPU: without streams {result['without']['api_cpu_per_s']:.2f} s/s  |  "
        f"with streams {with_streams['api_cpu_per_s']:.2f} s/s"
    )
    print(
        f"streams: {with_streams['stream_statuses']} by HTTP status, {with_streams['streams_open_at_end']} "
        f"still open at the end (fewest of a round); one more on a full key: HTTP "
        f"{', '.join(str(x) for x in with_streams['extra_status'])}"
    )
