"""``AsyncClient``: ``Client``'s methods over ``httpx.AsyncClient``, for asyncio programs.

    async with AsyncClient(url, api_key=key) as client:
        job = await client.jobs.create(teacher_id=tid, student="tiny_cnn", dataset="cifar10")
        async for event in client.jobs.stream_events(job.id):
            ...

Same requests (``distill_client.endpoints``), retry policy and exceptions as the sync client; the
iterators (``jobs.list``, ``iter_events``, ``stream_events``) are async iterators.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from distill_client import endpoints as ep
from distill_client.errors import ChecksumMismatch, DistillError, JobTimeout, error_from_response
from distill_client.models import (
    TERMINAL_STATUSES,
    ArtifactList,
    ArtifactOut,
    DatasetList,
    DatasetOut,
    EventOut,
    EventPage,
    JobCreate,
    JobOut,
    JobPage,
    JobStatus,
    MetricList,
    MetricOut,
    ModelFormat,
    Progress,
    Report,
    TeacherList,
    TeacherOut,
)
from distill_client.transport import (
    DEFAULT_TIMEOUT,
    DEFAULT_TRANSFER_TIMEOUT,
    DEFAULT_URL,
    END,
    Call,
    RetryPolicy,
    SseDecoder,
    as_timeout,
    auth_headers,
    stream_item,
)
from distill_client.verify import student_artifact


class AsyncClient:
    """One API key against one server, for asyncio; close it (or use ``async with``)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        transfer_timeout: float | httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.timeout = as_timeout(timeout, DEFAULT_TIMEOUT)
        self.transfer_timeout = as_timeout(transfer_timeout, DEFAULT_TRANSFER_TIMEOUT)
        self.retry = retry or RetryPolicy()
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key, headers),
            timeout=self.timeout,
            transport=transport,
            follow_redirects=False,
        )
        self.teachers = AsyncTeachers(self)
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """As ``Client.send``: retried as the policy says; a success, else ``ApiError`` / transport error."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with call.files() as files:
                    request = call.build(self.http, files, self.timeout)
                    response = await self.http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.retry.attempts or not self.retry.retries_error(exc, call.may_resend):
                    raise
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            if attempt < self.retry.attempts and self.retry.retries_status(response.status_code):
                await asyncio.sleep(self.retry.delay(attempt, response))
                continue
            raise error_from_response(response)

    async def json(self, call: Call) -> Any:
        return (await self.send(call)).json()


class AsyncTeachers:
    """Teacher models (see ``Client.teachers``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(
        self,
        path: ep.PathLike,
        *,
        arch: str | None = None,
        normalize: str | None = None,
        dataset: str | None = None,
        format: ModelFormat = "auto",
        num_classes: int | None = None,
        name: str | None = None,
        claimed_accuracy: float | None = None,
    ) -> TeacherOut:
        fields = dict(arch=arch, normalize=normalize, dataset=dataset, format=format,
                      num_classes=num_classes, name=name, claimed_accuracy=claimed_accuracy)
        call = ep.upload_teacher(path, fields, self._c.transfer_timeout)
        return TeacherOut.model_validate(await self._c.json(call))

    async def list(self) -> list[TeacherOut]:
        return TeacherList.model_validate(await self._c.json(Call("GET", "/v1/teachers"))).items

    async def get(self, teacher_id: str) -> TeacherOut:
        return TeacherOut.model_validate(await self._c.json(Call("GET", f"/v1/teachers/{teacher_id}")))

    async def delete(self, teacher_id: str) -> None:
        await self._c.send(Call("DELETE", f"/v1/teachers/{teacher_id}"))


class AsyncDatasets:
    """Datasets (see ``Client.datasets``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(self, path: ep.PathLike, *, name: str | None = None) -> DatasetOut:
        call = ep.upload_dataset(path, name, self._c.transfer_timeout)
        return DatasetOut.model_validate(await self._c.json(call))

    async def list(self) -> DatasetList:
        return DatasetList.model_validate(await self._c.json(Call("GET", "/v1/datasets")))

    async def get(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate(await self._c.json(Call("GET", f"/v1/datasets/{dataset_id}")))

    async def delete(self, dataset_id: str) -> None:
        await self._c.send(Call("DELETE", f"/v1/datasets/{dataset_id}"))


class AsyncJobs:
    """Jobs (see ``Client.jobs`` for what each method does)."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        spec: JobCreate | dict[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobOut:
        call = ep.create_job(ep.job_body(spec, fields), idempotency_key)
        return JobOut.model_validate(await self._c.json(call))

    async def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate(await self._c.json(ep.job(job_id)))

    async def list(self, *, status: JobStatus | None = None, page_size: int = 50) -> AsyncIterator[JobOut]:
        cursor: str | None = None
        while True:
            page = JobPage.model_validate(await self._c.json(ep.list_jobs(status, page_size, cursor)))
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(await self._c.json(ep.job(job_id, "/cancel", "POST")))

    async def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> EventPage:
        return EventPage.model_validate(await self._c.json(ep.events_page(job_id, after, limit)))

    async def iter_events(self, job_id: str, *, after: int = 0) -> AsyncIterator[EventOut]:
        while True:
            page = await self.events(job_id, after=after, limit=ep.EVENT_PAGE)
            for item in page.items:
                yield item
            if len(page.items) < ep.EVENT_PAGE:
                return
            after = page.next_after

    async def stream_events(
        self, job_id: str, *, after: int = 0, progress: bool = False
    ) -> AsyncIterator[EventOut | Progress]:
        failures, resumed = 0, False
        while True:
            error: Exception | None = None
            try:
                response = await self._c.send(ep.event_stream(job_id, after, resumed), stream=True)
                try:
                    decoder = SseDecoder()
                    async for line in response.aiter_lines():
                        item = stream_item(message) if (message := decoder.feed(line)) else None
                        if item is END:
                            return
                        if isinstance(item, EventOut):
                            after, failures = item.id, 0
                            yield item
                        elif isinstance(item, Progress) and progress:
                            yield item
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                error = exc
            failures += 1
            if failures >= self._c.retry.attempts:
                raise error or DistillError(f"the event stream of job {job_id} keeps ending early")
            resumed = True
            await asyncio.sleep(self._c.retry.delay(failures))

    async def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[JobOut], None] | None = None,
    ) -> JobOut:
        started = time.monotonic()
        while True:
            job = await self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.status in TERMINAL_STATUSES:
                return job
            if timeout is not None and time.monotonic() - started > timeout:
                raise JobTimeout(f"job {job_id} still {job.status} after {timeout:g} s")
            await asyncio.sleep(poll_s)

    async def metrics(self, job_id: str) -> list[MetricOut]:
        return MetricList.model_validate(await self._c.json(ep.job(job_id, "/metrics"))).items

    async def report(self, job_id: str) -> Report:
        return Report.model_validate(await self._c.json(ep.job(job_id, "/report")))

    async def artifacts(self, job_id: str) -> list[ArtifactOut]:
        return ArtifactList.model_validate(await self._c.json(ep.job(job_id, "/artifacts"))).items

    async def download(
        self, job_id: str, dest: ep.PathLike, *, names: list[str] | None = None
    ) -> list[Path]:
        Path(dest).mkdir(parents=True, exist_ok=True)
        listed = await self.artifacts(job_id)
        wanted = names if names is not None else [a.name for a in listed]
        recorded = {a.name: a.sha256 for a in listed}
        return [await self.download_artifact(job_id, n, dest, sha256=recorded.get(n)) for n in wanted]

    async def download_student(
        self, job_id: str, dest: ep.PathLike, *, format: str = "export", which: str = "best",
        student: str | None = None,
    ) -> Path:
        """One student file (see ``Client.jobs.download_student``)."""
        return await self.download_artifact(job_id, student_artifact(format, which, student), dest)

    async def download_artifact(
        self, job_id: str, name: str, dest: ep.PathLike, *, sha256: str | None = None
    ) -> Path:
        path = ep.artifact_target(name, dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if sha256 is None:
            sha256 = next((a.sha256 for a in await self.artifacts(job_id) if a.name == name), None)
        tmp = path.with_name(path.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            digest = hashlib.sha256()
            try:
                call = ep.artifact(job_id, name, self._c.transfer_timeout)
                response = await self._c.send(call, stream=True)
                try:
                    with open(tmp, "wb") as f:
                        async for chunk in response.aiter_bytes(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
                finally:
                    await response.aclose()
                break
            except httpx.TransportError as exc:
                tmp.unlink(missing_ok=True)
                if attempt >= self._c.retry.attempts or not self._c.retry.retries_error(exc, True):
                    raise
                await asyncio.sleep(self._c.retry.delay(attempt))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        if sha256 and digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{name}: downloaded sha256 {digest.hexdigest()} != recorded {sha256}")
        os.replace(tmp, path)
        return path
