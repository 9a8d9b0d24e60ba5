"""The Celery app, built from settings, shared by the API (which sends) and the worker (which runs).

The API sends the task by name, so it never imports the worker's code (nor torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from service.settings import Settings

RUN_JOB_TASK = "worker.tasks.run_job"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``RD_BROKER_URL``; ``filesystem://`` uses folders under ``<var>/broker``."""
    from celery import Celery

    app = Celery("robust_distill", broker=settings.broker_url, set_as_current=False)
    conf: dict[str, Any] = {
        "task_default_queue": settings.queue,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue}},
        # A job is acknowledged only when it finished; a worker that dies mid-job gets it redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # State lives in the database, not in a result backend.
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_dir / "queue"
        processed = settings.broker_dir / "processed"
        control = settings.broker_dir / "control"
        for path in (folder, processed, control):
            path.mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        # Longer than any job: otherwise Redis redelivers a long-running unacknowledged task.
        conf["broker_transport_options"] = {"visibility_timeout": 7 * 24 * 3600}
    app.conf.update(conf)
    return app


class CeleryQueue:
    """Sends, revokes and pings through one Celery app; the API keeps one of these."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_celery(self.settings)
        return self._app

    def enqueue(self, job_id: str) -> None:
        # The task id is the job id, so a cancel can revoke it without a lookup. A broker that is down
        # fails the call within a few seconds (the API then marks the job failed) instead of hanging.
        self.app.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=self.settings.queue,
            task_id=job_id,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        )

    def waiting_ids(self) -> set[str] | None:
        """Ids of the jobs with a message waiting on the broker's queue (not yet delivered), or None when
        this broker cannot be listed. Messages a worker holds unacknowledged are not counted: a job still
        queued in the database while its message is held was never claimed, so its worker is dead.

        The reaper resends a long-queued job only when its message is missing here (worker/lease.py).
        """
        url = self.settings.broker_url
        if url.startswith(("redis://", "rediss://")):
            return _redis_waiting(url, self.settings.queue)
        if url.startswith("filesystem://"):
            return _folder_waiting(self.settings.broker_dir / "queue", self.settings.queue)
        return None

    def revoke(self, job_id: str) -> None:
        self.app.control.revoke(job_id)

    def ping(self, timeout: float = 2.0) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)


def _message_id(raw: bytes | str) -> str | None:
    import json

    try:
        message = json.loads(raw)
        return str(message["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _redis_waiting(url: str, queue: str, chunk: int = 1000) -> set[str]:
    """The task ids in the Redis list kombu keeps for ``queue`` (no priorities are used here)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        ids: set[str] = set()
        start = 0
        while batch := client.lrange(queue, start, start + chunk - 1):
            ids.update(i for i in map(_message_id, batch) if i)
            start += chunk
        return ids
    finally:
        client.close()


def _folder_waiting(folder: Path, queue: str) -> set[str]:
    """The task ids of the folder broker's message files for ``queue`` (a file is removed on delivery)."""
    ids: set[str] = set()
    for path in folder.glob(f"*.{queue}.msg"):
        try:
            raw = path.read_bytes()
        except OSError:  # delivered meanwhile
            continue
        if job_id := _message_id(raw):
            ids.add(job_id)
    return ids
