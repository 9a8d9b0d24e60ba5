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
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.schemas import EventOut
from service import jobs as job_state
from service.polling import JobEvents, StatusPoller, UnknownKey

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # a comment line after this long without a message keeps proxies from closing the stream
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


async def event_stream(
    request: Request,
    poller: StatusPoller,
    key: str | None,
    job_id: str,
    after: int,
    first: JobEvents,
    poll_s: float,
) -> AsyncIterator[str]:
    """Server-sent events: every stored event after id ``after`` in order (``first`` is the route's poll), a
    ``progress`` message when the progress changes, a comment line after HEARTBEAT_S of silence, then
    ``end`` once the job is finished and nothing newer is left to send.

    The stream stops quietly when the client has gone, the key was revoked or the job deleted, or the
    database failed (a client resumes with Last-Event-ID)."""
    batch: JobEvents | None = first
    last_progress: Any = object()
    last_sent = time.monotonic()
    while batch is not None:
        sent = False
        for event in batch.events:
            yield sse(event.event_type, event_out(event).model_dump(mode="json"), event.event_id)
            after, sent = event.event_id, True
        if batch.progress is not None and batch.progress != last_progress:
            yield sse("progress", batch.progress)
            sent = True
        last_progress = batch.progress
        if batch.status in job_state.TERMINAL_STATUSES and not batch.events:
            yield sse("end", {"status": batch.status})
            return
        now = time.monotonic()
        if sent:
            last_sent = now
        elif now - last_sent > HEARTBEAT_S:
            yield ": keep-alive\n\n"
            last_sent = now
        if len(batch.events) < STREAM_BATCH:
            await asyncio.sleep(poll_s)
        if await request.is_disconnected():
            return
        try:
            batch = await poller.events(key, job_id, after, STREAM_BATCH)
        except UnknownKey:
            return
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            log.warning("event stream of job %s ends: the poll failed: %s", job_id, type(exc).__name__)
            return
