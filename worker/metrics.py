"""A worker's Prometheus metrics, served by its Celery parent process on ``RD_WORKER_METRICS_PORT``.

Off unless that setting is given. Jobs run in forked pool children, a fresh one per job
(``worker_max_tasks_per_child=1``), so a child's own registry would vanish with it. The children therefore
record into prometheus_client's multiprocess files, in a folder private to this worker (the parent makes
it and sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client), and the parent serves
their sum: counters and histograms keep what exited children recorded (folded into one archive file per
type, so the folder does not grow with every job); the live gauges (busy, training rate, device memory)
count only children that are alive.

The HTTP server is a daemon thread of the parent, started at ``worker_ready`` like the reaper: a forked
child has only its forking thread, and the server ends with the parent. Nothing here imports torch: the
device's memory is read from torch only in a child that has loaded it already. What the job metrics
derived from the database say (durations, attempts) is served by the API (service/metrics.py); these
are the numbers only the running process knows. No label names a tenant, a job or a teacher.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import signals

from service.settings import get_settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds per attack on one checkpoint: clean takes well under a second, AutoAttack on a big set hours.
EVAL_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
OUTCOMES = frozenset({"succeeded", "failed", "cancelled", "retrying", "lost lease"})
_LIVE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")
ARCHIVE = "exited"  # counter_exited.db, histogram_exited.db: what the pool children that exited counted


@dataclass
class Instruments:
    busy: Any
    attempts: Any
    train_images: Any
    train_rate: Any
    eval_seconds: Any
    device: Any
    device_memory: Any


def make_instruments(registry: Any = None) -> Instruments:
    """The worker's instruments (on ``registry``; None: recorded only in the multiprocess files)."""
    from prometheus_client import Counter, Gauge, Histogram

    def gauge(name: str, doc: str, labels: tuple[str, ...] = (), mode: str = "livesum") -> Any:
        return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

    return Instruments(
        busy=gauge("rd_worker_busy", "Pool processes of this worker running a job now"),
        attempts=Counter(
            "rd_worker_attempts", "Job attempts this worker ran, by outcome (not_run: duplicate or finished)",
            ["outcome"], registry=registry,
        ),
        train_images=Counter("rd_worker_train_images", "Training images processed", registry=registry),
        train_rate=gauge("rd_worker_train_images_per_second", "Training images a second, running job"),
        eval_seconds=Histogram(
            "rd_worker_eval_seconds", "Seconds to evaluate one checkpoint under one attack", ["attack"],
            buckets=EVAL_BUCKETS, registry=registry,
        ),
        device=gauge("rd_worker_device", "The running job's device type (1 while it runs)", ("type",)),
        device_memory=gauge(
            "rd_worker_device_memory_bytes", "GPU memory of the running job: allocated, reserved, total",
            ("kind",), mode="livemax",
        ),
    )


class _Registry:
    """This process's share: the multiprocess folder, the instruments, and (parent only) the server."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.owns_folder = False
        self.instruments: Instruments | None = None
        self.server: Any = None

    def prepare(self, port: int | None) -> None:
        """In the parent, before prometheus_client is imported: a private folder for the children."""
        if port is None:
            return
        if "prometheus_client" in sys.modules:
            log.warning("prometheus_client was imported before the worker's metrics folder was set")
        self.folder = Path(tempfile.mkdtemp(prefix="rd-worker-metrics-"))
        self.owns_folder = True
        os.environ[MULTIPROC_ENV] = str(self.folder)

    def get(self) -> Instruments | None:
        if self.folder is None:
            return None
        if self.instruments is None:
            from prometheus_client import values

            if values.ValueClass is values.MutexValue:  # imported before the folder was set
                values.ValueClass = values.get_value_class()
            self.instruments = make_instruments(None)
        return self.instruments


_registry = _Registry()
_registry.prepare(get_settings().worker_metrics_port)


class _LiveCollector:
    """The children's files summed, after two kinds of housekeeping of the children that have exited:

    - their live gauges are dropped (those of a child that died without saying so, by SIGKILL or out of
      memory, too), so a dead child is not counted as busy forever;
    - their counters and histograms are added into one archive file per type and their own files deleted,
      so the folder holds a few files whatever the number of jobs run, not two per job.
    """

    def __init__(self, folder: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.folder = folder
        self.inner = MultiProcessCollector(None, path=str(folder))
        self.lock = threading.Lock()  # the server answers scrapes in threads

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        with self.lock:
            self.forget_dead_children()
            return list(self.inner.collect())

    def forget_dead_children(self) -> None:
        from prometheus_client import multiprocess
        from prometheus_client.mmap_dict import MmapedDict

        for path in self.folder.glob("gauge_live*_*.db"):
            match = _LIVE_FILE.match(path.name)
            if match and not _alive(int(match.group(1))):
                multiprocess.mark_process_dead(int(match.group(1)), str(self.folder))
        for kind in ("counter", "histogram"):
            dead = [p for p in self.folder.glob(f"{kind}_*.db") if _dead_child_file(p, kind)]
            if not dead:
                continue
            archive = MmapedDict(str(self.folder / f"{kind}_{ARCHIVE}.db"))
            try:
                for path in dead:
                    for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(path)):
                        archive.write_value(key, archive.read_value(key)[0] + value, timestamp)
                    path.unlink()
            finally:
                archive.close()


def _dead_child_file(path: Path, kind: str) -> bool:
    pid = path.name[len(kind) + 1:-3]
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@signals.worker_ready.connect
def _serve(**_: Any) -> None:
    """In the parent: serve the sum of the children's files on RD_WORKER_METRICS_PORT."""
    if _registry.folder is None or _registry.server is not None:
        return
    from prometheus_client import CollectorRegistry, start_http_server

    settings = get_settings()
    _registry.get()  # the parent's own (zero) values: every family shows from the first scrape
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LiveCollector(_registry.folder))
    assert settings.worker_metrics_port is not None
    try:
        _registry.server, _ = start_http_server(
            settings.worker_metrics_port, addr=settings.metrics_host, registry=registry
        )
    except OSError as exc:
        log.error("worker metrics: cannot listen on port %d (RD_WORKER_METRICS_PORT): %s",
                  settings.worker_metrics_port, exc)
        return
    log.info("worker metrics: serving on port %d", settings.worker_metrics_port)


@signals.worker_process_shutdown.connect
def _child_exits(**_: Any) -> None:
    """A pool child about to exit: its live gauges stop counting (its counters stay)."""
    if _registry.folder is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(_registry.folder))


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _registry.server is not None:
        _registry.server.shutdown()
        _registry.server.server_close()
        _registry.server = None
    if _registry.owns_folder and _registry.folder is not None:
        shutil.rmtree(_registry.folder, ignore_errors=True)


class JobMeter:
    """What one attempt tells the worker's metrics, from the pipeline's events; never fails the job.

    Training rate: images between two training progress events over the time between them (the
    pipeline reports at most once a second). Evaluation: an attack's time on a checkpoint runs from the
    previous attack's end (or the start of the evaluation phase) to its last batch."""

    def __init__(self, instruments: Callable[[], Instruments | None] = _registry.get) -> None:
        self._instruments = instruments
        self.batch_size = 0
        self._train_mark: tuple[int, float] | None = None  # (global step, time)
        self._eval_mark: float | None = None
        self._device: str | None = None
        self._attacks: frozenset[str] | None = None

    def ran(self, attempt: Callable[[], str]) -> str:
        """Run the claimed attempt as busy; count its outcome."""
        metrics = self._safe(lambda m: m.busy.inc())
        try:
            outcome = attempt()
        finally:
            self._safe(self._idle)
        if metrics is not None:
            label = outcome.replace(" ", "_") if outcome in OUTCOMES else "other"
            self._safe(lambda m: m.attempts.labels(label).inc())
        return outcome

    def not_run(self) -> None:
        self._safe(lambda m: m.attempts.labels("not_run").inc())

    def on_event(self, event: dict[str, Any]) -> None:
        self._safe(lambda m: self._record(m, event))

    # ----- inside ----------------------------------------------------------------------------------

    def _safe(self, action: Callable[[Instruments], Any]) -> Instruments | None:
        try:
            metrics = self._instruments()
            if metrics is not None:
                action(metrics)
            return metrics
        except Exception:
            log.debug("worker metrics: not recorded", exc_info=True)
            return None

    def _idle(self, m: Instruments) -> None:
        m.busy.dec()
        m.train_rate.set(0)
        if self._device is not None:
            m.device.labels(self._device).set(0)

    def _record(self, m: Instruments, event: dict[str, Any]) -> None:
        kind, now = event.get("type"), time.monotonic()
        if kind == "status" and event.get("status") == "evaluating":
            self._eval_mark = now
            m.train_rate.set(0)
        elif kind == "progress" and event.get("phase") == "evaluating":
            if self._eval_mark is not None and int(event.get("done", 0)) >= int(event.get("total", 1)):
                m.eval_seconds.labels(self._attack_label(str(event.get("attack", "")))).observe(
                    now - self._eval_mark
                )
                self._eval_mark = now
            self._device_state(m)
        elif kind == "progress" and event.get("step") is not None and event.get("steps"):
            steps, step = int(event["steps"]), int(event["step"])
            at = (int(event.get("epoch", 1)) - 1) * steps + step
            if self._train_mark is None:  # this attempt's first report: the steps of this epoch so far
                self._train_mark = (at - step, now)
            done = at - self._train_mark[0]
            if done > 0 and self.batch_size > 0:
                m.train_images.inc(done * self.batch_size)
                elapsed = now - self._train_mark[1]
                if elapsed > 0:
                    m.train_rate.set(done * self.batch_size / elapsed)
                self._train_mark = (at, now)
            self._device_state(m)

    def _attack_label(self, attack: str) -> str:
        if self._attacks is None:
            from core.config import DISTILL_ATTACKS

            self._attacks = frozenset(DISTILL_ATTACKS)
        return attack if attack in self._attacks else "other"

    def _device_state(self, m: Instruments) -> None:
        torch = sys.modules.get("torch")  # the job loaded it; never imported from here
        cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        device = "cuda" if cuda else "cpu"
        if device != self._device:
            if self._device is not None:
                m.device.labels(self._device).set(0)
            m.device.labels(device).set(1)
            self._device = device
        if cuda:
            index = torch.cuda.current_device()
            m.device_memory.labels("allocated").set(torch.cuda.memory_allocated(index))
            m.device_memory.labels("reserved").set(torch.cuda.memory_reserved(index))
            m.device_memory.labels("total").set(torch.cuda.get_device_properties(index).total_memory)
