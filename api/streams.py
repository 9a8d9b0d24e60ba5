"""Server-sent event streams of a job's events: bounded in number, and holding nothing between polls.

A stream lives as long as its job (hours). It must not keep anything other requests need: it holds no
ORM session (so no pooled connection and no place at ``app.state.db_gate``) and no thread; every poll is
one query on the status poller's async engine (``service.polling.StatusPoller.events``), which returns
its connection at once. What a stream does hold (a socket, a task, a query a second) is bounded by
``StreamSlots``: ``RD_MAX_STREAMS_PER_KEY`` streams per API key and ``RD_MAX_STREAMS`` in all, counted in
this process (with several API processes each counts its own), answered 429 with Retry-After beyond.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import sqlalchemy as sa
from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.schemas import EventOut
from service import jobs as job_state
from service.polling import JobEvents, JobState, StatusPoller, UnknownKey

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # a comment line after this long without a message keeps proxies from closing the stream
KEY_RECHECK_S = 30.0  # a stream checks its key (revoked?) at least this often
STREAM_BATCH = 500  # events per poll; a fuller batch is followed by the next poll at once
RETRY_AFTER_S = 10  # what a 429 suggests: streams end with their jobs, so slots free up over time


class StreamSlot:
    """One open stream's place in its key's count; ``release`` is idempotent."""

    def __init__(self, slots: StreamSlots, key_id: str) -> None:
        self._slots = slots
        self.key_id = key_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self.key_id)


class StreamSlots:
    """Counts the open streams of each API key and in all, and refuses one beyond either bound.

    Used from the event loop only (acquire in the route, release when the response ends), so it needs no
    lock. The bound is per process: nothing is shared between API processes."""

    def __init__(self, *, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self._open: Counter[str] = Counter()
        self._open_total = 0

    @property
    def open_total(self) -> int:
        return self._open_total

    def open_for(self, key_id: str) -> int:
        return self._open[key_id]

    def acquire(self, key_id: str) -> StreamSlot:
        """A slot for one more stream of this key; HTTPException 429 (with Retry-After) beyond a bound."""
        if self._open[key_id] >= self.per_key:
            raise _too_many(
                f"this API key already has {self.per_key} open event streams, the limit per key "
                f"(RD_MAX_STREAMS_PER_KEY={self.per_key}); close one, or page with ?after= instead"
            )
        if self._open_total >= self.total:
            raise _too_many(
                f"the server has {self.total} open event streams, its limit (RD_MAX_STREAMS={self.total}); "
                "retry later, or page with ?after= instead"
            )
        self._open[key_id] += 1
        self._open_total += 1
        return StreamSlot(self, key_id)

    def _release(self, key_id: str) -> None:
        self._open[key_id] -= 1
        if self._open[key_id] <= 0:
            del self._open[key_id]
        self._open_total -= 1


def _too_many(detail: str) -> HTTPException:
    return HTTPException(429, detail=detail, headers={"Retry-After": str(RETRY_AFTER_S)})


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that gives its slot back however it ends: the job finished, the
    client went away (the stream task is cancelled), or sending failed."""

    def __init__(self, content: AsyncIterator[str], slot: StreamSlot) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            # A stream cancelled while waiting to send is closed here, not whenever it is collected,
            # so it stops watching its job now.
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


def event_out(row: sa.Row[Any]) -> EventOut:
    """An event row of ``StatusPoller.events`` as the API shows it."""
    return EventOut(id=row.event_id, type=row.event_type, payload=row.payload, created_at=row.created_at)


def sse(kind: str | None, data: Any, event_id: int | None = None) -> str:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if kind:
        lines.append(f"event: {kind}")
    lines.append(f"data: {json.dumps(data, default=str)}")
    return "\n".join(lines) + "\n\n"


class WatchFailed(Exception):
    """The shared poll of the streamed jobs failed (the database is down or refused)."""


class JobWatch:
    """Polls the state of every job that has open streams in one query a tick, and wakes their streams.

    Streams of a job compare the shared state (status, progress, newest event id) with what they sent,
    and query their own events (with their key) only when there are new ones, or every KEY_RECHECK_S to
    check their key. So 200 streams of one job cost about one query a second, not 200. The polling task
    runs while some stream watches and is cancelled when the last one leaves. Event loop only."""

    def __init__(self, poller: StatusPoller, poll_seconds: Callable[[], float]) -> None:
        self.poller = poller
        self._poll_seconds = poll_seconds
        self._watchers: Counter[str] = Counter()
        self._states: dict[str, JobState] = {}
        self._failed = False
        self._tick = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticked: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def watchers(self) -> int:
        """Streams watching some job now."""
        return sum(self._watchers.values())

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[int]:
        """Register a stream of ``job_id`` for as long as the block runs; yields the current tick."""
        self._watchers[job_id] += 1
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (a test client per request)
            self._loop, self._ticked, self._task = loop, asyncio.Condition(), None
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="job-watch")
        try:
            yield self._tick
        finally:
            self._watchers[job_id] -= 1
            if self._watchers[job_id] <= 0:
                del self._watchers[job_id]
                self._states.pop(job_id, None)
            if not self._watchers and self._task is not None:
                self._task.cancel()
                self._task = None

    async def next_state(self, job_id: str, seen: int) -> tuple[int, JobState | None]:
        """The state after the first tick newer than ``seen``: (tick, state; None if the job is gone)."""
        assert self._ticked is not None, "next_state outside watching()"
        async with self._ticked:
            await self._ticked.wait_for(lambda: self._tick > seen)
        if self._failed:
            raise WatchFailed
        return self._tick, self._states.get(job_id)

    async def _run(self) -> None:
        assert self._ticked is not None
        while self._watchers:
            await asyncio.sleep(self._poll_seconds())
            try:
                self._states = await self.poller.job_states(sorted(self._watchers))
                self._failed = False
            except Exception as exc:  # every stream ends (and says why in the log) rather than hang
                log.warning("the poll of the streamed jobs failed: %s", type(exc).__name__, exc_info=True)
                self._states, self._failed = {}, True
            async with self._ticked:
                self._tick += 1
                self._ticked.notify_all()


async def event_stream(
    request: Request, watch: JobWatch, key: str | None, job_id: str, after: int, first: JobEvents
) -> AsyncIterator[str]:
    """Server-sent events: every stored event after id ``after`` in order (``first`` is the route's
    poll), a ``progress`` message when the progress changes, a comment line after HEARTBEAT_S of
    silence, then ``end`` once the job is finished and nothing newer is left to send.

    Between its own polls a stream follows the shared state of ``watch``. It stops quietly when the
    client has gone, the key was revoked (noticed within KEY_RECHECK_S) or the job deleted, or the
    database failed (a client resumes with Last-Event-ID)."""
    with watch.watching(job_id) as tick:
        batch: JobEvents | None = first
        checked = last_sent = time.monotonic()
        last_progress: Any = object()
        state: JobState | None = None
        while True:
            sent = more = False
            if batch is not None:  # our own poll: the events after ``after``, key checked
                for event in batch.events:
                    yield sse(event.event_type, event_out(event).model_dump(mode="json"), event.event_id)
                    after, sent = event.event_id, True
                status, progress, more = batch.status, batch.progress, len(batch.events) >= STREAM_BATCH
                if status in job_state.TERMINAL_STATUSES and not batch.events:
                    yield sse("end", {"status": status})
                    return
            if progress is not None and progress != last_progress:
                yield sse("progress", progress)
                sent = True
            last_progress = progress
            now = time.monotonic()
            if sent:
                last_sent = now
            elif now - last_sent > HEARTBEAT_S:
                yield ": keep-alive\n\n"
                last_sent = now
            batch = None
            try:
                if not more:
                    tick, state = await watch.next_state(job_id, tick)
                    if await request.is_disconnected():
                        return
                if more or state is None or (state.last_event_id or 0) > after or (
                    time.monotonic() - checked >= KEY_RECHECK_S
                ):
                    batch = await watch.poller.events(key, job_id, after, STREAM_BATCH)
                    if batch is None:
                        return  # the job is gone
                    checked = time.monotonic()
                elif state.status in job_state.TERMINAL_STATUSES:
                    yield sse("end", {"status": state.status})
                    return
                else:
                    progress = state.progress
            except UnknownKey:
                return
            except (WatchFailed, sa.exc.SQLAlchemyError, OSError) as exc:
                log.warning("event stream of job %s ends: the poll failed: %s", job_id, type(exc).__name__)
                return
