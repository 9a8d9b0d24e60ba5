"""What the sync and async clients share: a request described once (``Call``), the retry policy, and the
decoding of server-sent events. The two clients differ only in how they wait and send."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from distill_client.errors import retry_after_seconds
from distill_client.models import EventOut, Progress

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Uploads (the server loads and probes a model before answering) and downloads of large weights: each
# read or write may take this long; the whole transfer has no limit.
DEFAULT_TRANSFER_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
# An event stream sends a keep-alive comment after 15 s of silence, so a read that waits four times as
# long is a dead connection: the stream is reopened where it stopped.
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# The methods that may be resent after the request reached the server (the job creation POST is made so
# by its Idempotency-Key, see ``Call.idempotent``).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass
class Call:
    """One API request, enough to send it again: the file to upload is reopened on every attempt."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    file: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: httpx.Timeout | None = None
    idempotent: bool | None = None  # None: by the method

    @property
    def may_resend(self) -> bool:
        return self.idempotent if self.idempotent is not None else self.method in IDEMPOTENT_METHODS

    @contextlib.contextmanager
    def files(self) -> Iterator[dict[str, tuple[str, BinaryIO, str]] | None]:
        if self.file is None:
            yield None
            return
        with open(self.file, "rb") as handle:
            yield {"file": (self.file.name, handle, "application/octet-stream")}

    def build(
        self, http: httpx.Client | httpx.AsyncClient, files: Any, default: httpx.Timeout
    ) -> httpx.Request:
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            json=self.json,
            data=self.data,
            files=files,
            headers=self.headers or None,
            timeout=self.timeout or default,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    - 429 and 503 answers are retried for every request: the server did nothing lasting (it refused, or
      a backing service was down), and ``Retry-After`` is honoured (capped at ``retry_after_max``).
    - A connection that could not be made (connect error or timeout, no free pooled connection) is
      retried for every request: nothing reached the server.
    - Any other transport error (the connection dropped after the request was sent, a read timed out)
      is retried only for idempotent requests: GET/DELETE, and job creation, whose Idempotency-Key
      makes a resent POST return the first job. An upload that lost its connection is not resent (the
      server may have kept it); the error is raised.

    Waits grow exponentially from ``backoff`` up to ``backoff_max``, with "equal jitter" (half fixed,
    half random) so that many clients refused at once do not come back at once. ``attempts`` counts
    the first try."""

    attempts: int = 5
    backoff: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    statuses: frozenset[int] = frozenset({429, 503})

    def retries_status(self, status: int) -> bool:
        return status in self.statuses

    def retries_error(self, exc: Exception, may_resend: bool) -> bool:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            return True
        return may_resend and isinstance(exc, httpx.TransportError)

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        hinted = retry_after_seconds(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self.retry_after_max)
        ceiling = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


NO_RETRIES = RetryPolicy(attempts=1)


# ---------------------------------------------------------------- server-sent events


@dataclass
class SseMessage:
    event: str
    data: str
    id: str | None


class SseDecoder:
    """Lines of a text/event-stream in, messages out (the WHATWG rules this API uses: event, data, id,
    comment lines, a blank line ends a message)."""

    def __init__(self) -> None:
        self._event, self._data, self._id = "", [], None  # type: tuple[str, list[str], str | None]

    def feed(self, line: str) -> SseMessage | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data and not self._event:
                return None
            message = SseMessage(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return message
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        return None


END = object()  # the stream's last message: the job finished and every event was sent


def stream_item(message: SseMessage) -> EventOut | Progress | object | None:
    """A message of the job event stream as what the client yields: a stored event (it has an id), the
    job's progress, ``END``, or None for anything else."""
    if message.event == "end":
        return END
    try:
        payload = json.loads(message.data) if message.data else None
    except ValueError:
        return None
    if message.event == "progress" and isinstance(payload, dict):
        return Progress.model_validate(payload)
    if message.id is not None and isinstance(payload, dict):
        return EventOut.model_validate(payload)
    return None


def auth_headers(api_key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": "distill-client"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {**headers, **(extra or {})}


def as_timeout(value: float | httpx.Timeout | None, default: httpx.Timeout) -> httpx.Timeout:
    if value is None:
        return default
    return value if isinstance(value, httpx.Timeout) else httpx.Timeout(float(value))
