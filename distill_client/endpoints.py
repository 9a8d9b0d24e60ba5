"""Every API operation as a ``Call`` (what to send) — one place for paths, fields and headers, used by
both ``Client`` and ``AsyncClient``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import httpx

from distill_client.models import JobCreate, JobStatus
from distill_client.transport import Call

PathLike = str | os.PathLike[str]
EVENT_PAGE = 1000  # the API's largest page of events


def _form(fields: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in fields.items() if v is not None}


def upload_teacher(path: PathLike, fields: dict[str, Any], timeout: httpx.Timeout) -> Call:
    return Call("POST", "/v1/teachers", data=_form(fields), file=Path(path), timeout=timeout)


def upload_dataset(path: PathLike, name: str | None, timeout: httpx.Timeout) -> Call:
    return Call("POST", "/v1/datasets", data=_form({"name": name}), file=Path(path), timeout=timeout)


def job_body(spec: JobCreate | dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a job: a ``JobCreate`` (only the fields that were set) or keyword fields; None
    values are left out, so the server applies its defaults. The server validates it (its 422 names the
    bad field); nothing is checked twice here."""
    if isinstance(spec, JobCreate):
        body: dict[str, Any] = spec.model_dump(mode="json", exclude_unset=True)
    else:
        body = dict(spec or {})
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def create_job(body: dict[str, Any], idempotency_key: str | None) -> Call:
    """Always with an Idempotency-Key (a fresh one unless given): the server answers a repeat with the
    first job, so the POST may be resent after a lost connection like a GET."""
    key = idempotency_key or uuid.uuid4().hex
    return Call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, idempotent=True)


def list_jobs(status: JobStatus | None, limit: int, cursor: str | None) -> Call:
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/v1/jobs", params=params)


def job(job_id: str, suffix: str = "", method: str = "GET", **kwargs: Any) -> Call:
    return Call(method, f"/v1/jobs/{job_id}{suffix}", **kwargs)


def events_page(job_id: str, after: int, limit: int) -> Call:
    return job(job_id, "/events", params={"after": after, "limit": limit})


def event_stream(job_id: str, after: int, resumed: bool) -> Call:
    """The live stream from event ``after`` on; a resumed stream says where it stopped the standard way
    (``Last-Event-ID``), which the server prefers to ``after``."""
    from distill_client.transport import STREAM_TIMEOUT

    headers = {"Accept": "text/event-stream"}
    if resumed:
        headers["Last-Event-ID"] = str(after)
    return job(job_id, "/events", params={"after": after}, headers=headers, timeout=STREAM_TIMEOUT)


def artifact(job_id: str, name: str, timeout: httpx.Timeout) -> Call:
    return job(job_id, f"/artifacts/{name}", timeout=timeout)


def artifact_target(name: str, dest: PathLike) -> Path:
    """Where artifact ``name`` goes: into ``dest`` when it is a folder (or ends with a separator), else
    ``dest`` itself. A name that is not a plain file name is refused, whatever the server sent."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"artifact name {name!r} is not a plain file name")
    dest = Path(dest)
    return dest / name if dest.is_dir() or str(dest).endswith(os.sep) else dest
