"""The worker's Celery app: ``celery -A worker.celery_app worker -Q distill --concurrency 1``.

Built by ``service.queue.make_celery`` so the API and the worker agree on broker, queue and task name.
This module and everything it imports stay torch-free (see worker/__init__.py).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from service.queue import make_celery
from service.settings import get_settings
from worker.lease import Reaper, WorkerSettings

log = logging.getLogger(__name__)

settings = get_settings()
worker_settings = WorkerSettings()

app = make_celery(settings)
app.conf.update(
    include=["worker.tasks"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    # A fresh child per job: CUDA memory, allocator caches and torch threads go away with it.
    worker_max_tasks_per_child=1,
    # Long jobs must not be killed by a broker hiccup; the lease decides who owns a job.
    worker_cancel_long_running_tasks_on_connection_loss=False,
)
if worker_settings.visibility_timeout and settings.broker_url.startswith(("redis://", "rediss://")):
    app.conf.broker_transport_options = {
        **(app.conf.broker_transport_options or {}),
        "visibility_timeout": worker_settings.visibility_timeout,
        # Sweep for expired messages at the pace of the timeout, not once every 100 s.
        "unacked_restore_interval": max(1, min(10, worker_settings.visibility_timeout // 2)),
        "unacked_restore_throttle": 1,
    }

_reaper: Reaper | None = None


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """The parent process requeues jobs whose worker died (see worker/lease.py)."""
    global _reaper
    if "torch" in sys.modules:
        log.warning("torch was imported in the worker's parent process; forked children may hang")
    _reaper = Reaper(settings, worker_settings)
    _reaper.start()


@signals.worker_process_init.connect
def _forget_parent_connections(**_: Any) -> None:
    """A forked child must not use (or close) database connections it inherited from the parent."""
    if _reaper is not None and _reaper.engine is not None:
        _reaper.engine.dispose(close=False)


@signals.worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
