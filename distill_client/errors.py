"""Exceptions: an answer of the API that is not a success becomes an ``ApiError`` carrying its message.

Every error answer of the API has one shape (``ErrorOut``: ``detail``, a sentence naming what to fix, and
on request-validation 422s ``errors``, the bad fields); the exception keeps both, and the status. The
subclass says the kind, so callers can catch what they can handle (``except NotFound``)."""

from __future__ import annotations

from typing import Any

import httpx

from distill_client.models import ErrorItem


class DistillError(Exception):
    """Anything this library raises on purpose."""


class ApiError(DistillError):
    """The server answered with an error status; ``detail`` is its one-line reason."""

    def __init__(self, status: int, detail: str, errors: list[ErrorItem] | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors: list[ErrorItem] = list(errors or [])


class Unauthorized(ApiError):
    """401: the API key is missing, unknown or revoked."""


class NotFound(ApiError):
    """404: no such resource for this key (another tenant's id is a 404 too)."""


class Conflict(ApiError):
    """409: the resource's state forbids it (cancelling a finished job, deleting a teacher in use)."""


class PayloadTooLarge(ApiError):
    """413: the upload is larger than the server accepts."""


class ValidationError(ApiError):
    """422: the request is invalid; ``detail`` names what to fix, ``errors`` the bad fields."""


class RateLimited(ApiError):
    """429: too many requests of this kind; ``retry_after`` is the server's suggested wait in seconds."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: list[ErrorItem] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, detail, errors)
        self.retry_after = retry_after


class ServiceUnavailable(ApiError):
    """503: a backing service (database, broker, object store) is unavailable."""


class ChecksumMismatch(DistillError):
    """A downloaded file's sha256 differs from the one the server recorded (nothing is left at the path)."""


class JobTimeout(DistillError, TimeoutError):
    """``wait`` gave up; the job keeps running on the server."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` as seconds (the delta-seconds form; an HTTP date is read too), None without one."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import datetime, timezone

    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def error_from_response(response: httpx.Response) -> ApiError:
    """The exception for an error answer (its body must have been read)."""
    detail: Any = None
    items: list[ErrorItem] = []
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = body.get("detail")
        for raw in body.get("errors") or []:
            try:
                items.append(ErrorItem.model_validate(raw))
            except ValueError:
                continue
    if not isinstance(detail, str) or not detail:
        detail = (response.text or response.reason_phrase or "error").strip()[:500]
    cls = _BY_STATUS.get(response.status_code, ApiError)
    if cls is RateLimited:
        return RateLimited(response.status_code, detail, items, retry_after_seconds(response))
    return cls(response.status_code, detail, items)
