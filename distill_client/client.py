"""``Client``: the service's API over ``httpx.Client``, with typed results, retries and exceptions.

    from distill_client import Client

    with Client("http://127.0.0.1:8000", api_key="rd_...") as client:
        teacher = client.teachers.upload("teacher.pt", arch="resnet18", dataset="cifar10")
        job = client.jobs.create(teacher_id=teacher.id, student="tiny_cnn", dataset="cifar10", epochs=5)
        for event in client.jobs.stream_events(job.id):
            print(event.type, event.payload)
        job = client.jobs.wait(job.id)
        client.jobs.download(job.id, "results/")

Errors are exceptions (``distill_client.errors``); transport failures that outlast the retries are
httpx's own (``httpx.TransportError``). ``AsyncClient`` (``distill_client.aio``) has the same methods.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
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


class Client:
    """One API key against one server. Thread-safe as httpx.Client is; close it (or use ``with``)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        transfer_timeout: float | httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.timeout = as_timeout(timeout, DEFAULT_TIMEOUT)
        self.transfer_timeout = as_timeout(transfer_timeout, DEFAULT_TRANSFER_TIMEOUT)
        self.retry = retry or RetryPolicy()
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=auth_headers(api_key, headers),
            timeout=self.timeout,
            transport=transport,
            follow_redirects=False,
        )
        self.teachers = Teachers(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        """Send ``call`` as the retry policy says; a success (a streamed one still open when ``stream``),
        else the ``ApiError`` of the last answer, or the last transport error."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with call.files() as files:
                    response = self.http.send(call.build(self.http, files, self.timeout), stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.retry.attempts or not self.retry.retries_error(exc, call.may_resend):
                    raise
                time.sleep(self.retry.delay(attempt))
                continue
            if response.is_success:
                return response
            response.read()
            response.close()
            if attempt < self.retry.attempts and self.retry.retries_status(response.status_code):
                time.sleep(self.retry.delay(attempt, response))
                continue
            raise error_from_response(response)

    def json(self, call: Call) -> Any:
        return self.send(call).json()


class Teachers:
    """Teacher models: uploaded files the server has loaded and probed."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(
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
        """Upload a model file (TorchScript, .pt2, state_dict or safetensors); kept only if it loads."""
        fields = dict(arch=arch, normalize=normalize, dataset=dataset, format=format,
                      num_classes=num_classes, name=name, claimed_accuracy=claimed_accuracy)
        call = ep.upload_teacher(path, fields, self._c.transfer_timeout)
        return TeacherOut.model_validate(self._c.json(call))

    def list(self) -> list[TeacherOut]:
        return TeacherList.model_validate(self._c.json(Call("GET", "/v1/teachers"))).items

    def get(self, teacher_id: str) -> TeacherOut:
        return TeacherOut.model_validate(self._c.json(Call("GET", f"/v1/teachers/{teacher_id}")))

    def delete(self, teacher_id: str) -> None:
        self._c.send(Call("DELETE", f"/v1/teachers/{teacher_id}"))


class Datasets:
    """Builtin datasets and the key's own .npz uploads."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(self, path: ep.PathLike, *, name: str | None = None) -> DatasetOut:
        """Upload an .npz with x, y (and optionally x_test, y_test)."""
        call = ep.upload_dataset(path, name, self._c.transfer_timeout)
        return DatasetOut.model_validate(self._c.json(call))

    def list(self) -> DatasetList:
        return DatasetList.model_validate(self._c.json(Call("GET", "/v1/datasets")))

    def get(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate(self._c.json(Call("GET", f"/v1/datasets/{dataset_id}")))

    def delete(self, dataset_id: str) -> None:
        self._c.send(Call("DELETE", f"/v1/datasets/{dataset_id}"))


class Jobs:
    """Distillation jobs: create, follow, cancel, and fetch their results."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        spec: JobCreate | dict[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobOut:
        """Queue a job from a ``JobCreate``, a dict, or keyword fields (None: the server's default).

        An Idempotency-Key is always sent (a fresh uuid4 unless given), so the request is retried after a
        lost connection and never makes two jobs; pass your own key to make a re-run of your program
        return the job it made before."""
        call = ep.create_job(ep.job_body(spec, fields), idempotency_key)
        return JobOut.model_validate(self._c.json(call))

    def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._c.json(ep.job(job_id)))

    def list(self, *, status: JobStatus | None = None, page_size: int = 50) -> Iterator[JobOut]:
        """Every job of the key, newest first, following the pages' cursors lazily."""
        cursor: str | None = None
        while True:
            page = JobPage.model_validate(self._c.json(ep.list_jobs(status, page_size, cursor)))
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> JobOut:
        """Ask the job to stop (a queued job stops at once); ``Conflict`` if it already finished."""
        return JobOut.model_validate(self._c.json(ep.job(job_id, "/cancel", "POST")))

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> EventPage:
        """One page of stored events with an id above ``after``, oldest first."""
        return EventPage.model_validate(self._c.json(ep.events_page(job_id, after, limit)))

    def iter_events(self, job_id: str, *, after: int = 0) -> Iterator[EventOut]:
        """Every stored event after ``after`` (what there is now; ``stream_events`` follows live)."""
        while True:
            page = self.events(job_id, after=after, limit=ep.EVENT_PAGE)
            yield from page.items
            if len(page.items) < ep.EVENT_PAGE:
                return
            after = page.next_after

    def stream_events(
        self, job_id: str, *, after: int = 0, progress: bool = False
    ) -> Iterator[EventOut | Progress]:
        """The job's events live (server-sent events) until it has finished and all were sent; with
        ``progress`` also each change of its ``Progress``.

        A stream that breaks (a dropped connection, a server restart, the server ending it early) is
        reopened with ``Last-Event-ID``, so no event is lost or repeated; after ``retry.attempts``
        reopenings in a row without a new event the last error is raised (``DistillError`` when the
        server kept closing the stream cleanly)."""
        failures, resumed = 0, False
        while True:
            error: Exception | None = None
            try:
                response = self._c.send(ep.event_stream(job_id, after, resumed), stream=True)
                try:
                    decoder = SseDecoder()
                    for line in response.iter_lines():
                        item = stream_item(message) if (message := decoder.feed(line)) else None
                        if item is END:
                            return
                        if isinstance(item, EventOut):
                            after, failures = item.id, 0
                            yield item
                        elif isinstance(item, Progress) and progress:
                            yield item
                finally:
                    response.close()
            except httpx.TransportError as exc:
                error = exc
            failures += 1
            if failures >= self._c.retry.attempts:
                raise error or DistillError(f"the event stream of job {job_id} keeps ending early")
            resumed = True
            time.sleep(self._c.retry.delay(failures))

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[JobOut], None] | None = None,
    ) -> JobOut:
        """Poll until the job has finished (succeeded, failed or cancelled) and return it; ``on_update``
        sees every poll. ``JobTimeout`` after ``timeout`` seconds (the job keeps running)."""
        started = time.monotonic()
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.status in TERMINAL_STATUSES:
                return job
            if timeout is not None and time.monotonic() - started > timeout:
                raise JobTimeout(f"job {job_id} still {job.status} after {timeout:g} s")
            time.sleep(poll_s)

    def metrics(self, job_id: str) -> list[MetricOut]:
        """Per-epoch metrics, oldest first."""
        return MetricList.model_validate(self._c.json(ep.job(job_id, "/metrics"))).items

    def report(self, job_id: str) -> Report:
        """The robustness report (report.json); ``NotFound`` until the job wrote it."""
        return Report.model_validate(self._c.json(ep.job(job_id, "/report")))

    def artifacts(self, job_id: str) -> list[ArtifactOut]:
        return ArtifactList.model_validate(self._c.json(ep.job(job_id, "/artifacts"))).items

    def download(
        self, job_id: str, dest: ep.PathLike, *, names: list[str] | None = None
    ) -> list[Path]:
        """Download the job's files (``names``, default all) into the folder ``dest``; their paths."""
        Path(dest).mkdir(parents=True, exist_ok=True)
        listed = self.artifacts(job_id)
        wanted = names if names is not None else [a.name for a in listed]
        recorded = {a.name: a.sha256 for a in listed}
        return [self.download_artifact(job_id, n, dest, sha256=recorded.get(n)) for n in wanted]

    def download_student(
        self, job_id: str, dest: ep.PathLike, *, format: str = "export", which: str = "best",
        student: str | None = None,
    ) -> Path:
        """One student file: ``format`` onnx, torchscript, export (.pt2), safetensors or state_dict (.pt);
        ``which`` best or last; ``student`` the name in a several-student job."""
        return self.download_artifact(job_id, student_artifact(format, which, student), dest)

    def download_artifact(
        self, job_id: str, name: str, dest: ep.PathLike, *, sha256: str | None = None
    ) -> Path:
        """Stream one file to ``dest`` (a folder or a file path) through a ``.part`` file, checking its
        sha256 against the recorded one; a broken transfer is restarted as the retry policy allows."""
        path = ep.artifact_target(name, dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if sha256 is None:
            sha256 = next((a.sha256 for a in self.artifacts(job_id) if a.name == name), None)
        tmp = path.with_name(path.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            digest = hashlib.sha256()
            try:
                response = self._c.send(ep.artifact(job_id, name, self._c.transfer_timeout), stream=True)
                try:
                    with open(tmp, "wb") as f:
                        for chunk in response.iter_bytes(1 << 20):
                            digest.update(chunk)
                            f.write(chunk)
                finally:
                    response.close()
                break
            except httpx.TransportError as exc:
                tmp.unlink(missing_ok=True)
                if attempt >= self._c.retry.attempts or not self._c.retry.retries_error(exc, True):
                    raise
                time.sleep(self._c.retry.delay(attempt))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        if sha256 and digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{name}: downloaded sha256 {digest.hexdigest()} != recorded {sha256}")
        os.replace(tmp, path)
        return path
