"""The one task: run a job through ``core.pipeline.run_distillation`` and keep the database in step.

torch and ``core`` are imported inside the task body only (see worker/__init__.py). Every write goes
through ``service.jobs`` in its own short transaction, so the API sees progress as it happens, and
every write that a redelivered task could repeat (epoch metrics, checkpoints, warnings) carries a
dedupe key. A redelivered job starts again from the checkpoint the last attempt left in the store.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery.utils.log import get_task_logger

from service.db import make_engine, make_session_factory, session_scope
from service.jobs import (
    IllegalTransition,
    add_event,
    record_artifact,
    set_progress,
    start_attempt,
    transition,
    upsert_metrics,
)
from service.models import Dataset, Job, JobEvent, Teacher
from service.paths import scrub_paths, server_roots
from service.queue import RUN_JOB_TASK, CeleryQueue
from service.settings import Settings, get_settings
from service.storage import ObjectNotFound, job_key, open_store
from worker.celery_app import app
from worker.lease import (
    ACTIVE_STATUSES,
    WorkerSettings,
    is_stale,
    lose_worker,
    retry_or_fail,
    touch,
)
from worker.metrics import JobMeter

log = get_task_logger(__name__)

RESULT_FILES = ("student_best.pt", "student_last.pt", "report.json")
PROGRESS_EVERY_S = 1.0
MAX_JOB_WARNINGS = 100  # what jobs.warnings keeps; every warning stays in the job's events


def _handed_out(out: Path, report: dict[str, Any]) -> list[tuple[str, Path]]:
    """The exported students (artifact name = file name, e.g. ``student_best.onnx``) and the model card.

    Only the exports that succeeded are files; a failed format is named in the card instead.
    """
    from core.model_card import CARD_JSON, CARD_MD
    from core.student_outputs import EXPORTS_DIR

    files = [(r["file"], out / EXPORTS_DIR / r["file"]) for which in ("best", "last")
             for r in (report.get("exports") or {}).get(which, []) if r.get("ok") and r.get("file")]
    return files + [(name, out / name) for name in (CARD_MD, CARD_JSON)]


def _with_warnings(current: list[str] | None, new: list[str]) -> list[str]:
    """The job's warnings with ``new`` appended once each, at most ``MAX_JOB_WARNINGS`` (a new list: JSON
    columns notice assignment, not mutation)."""
    return list(dict.fromkeys([*(current or []), *new]))[:MAX_JOB_WARNINGS]


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run one job; returns a word for the worker's log (the job's state lives in the database)."""
    return JobRun(job_id, get_settings(), WorkerSettings()).execute()


def finite(obj: Any) -> Any:
    """JSON columns reject NaN and infinities (PostgreSQL does): store them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LostLease(Exception):
    """Another attempt owns the job now (this worker was presumed dead): stop without writing."""


class JobRun:
    """One attempt at one job, from claiming it to its terminal status."""

    def __init__(self, job_id: str, settings: Settings, worker_settings: WorkerSettings) -> None:
        self.job_id, self.settings, self.ws = job_id, settings, worker_settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_session_factory(self.engine)
        self.store = open_store(settings)
        assert settings.work_dir is not None
        self.work = Path(settings.work_dir) / job_id
        self.out = self.work / "out"
        self._roots = server_roots(settings)
        self.attempt = 0
        self.tenant_id = ""
        self.cancelled = threading.Event()  # set by the monitor: cancel asked for
        self.lost = threading.Event()  # set by the monitor: another attempt owns the job
        self.stop_monitor = threading.Event()
        self._last_progress = 0.0
        # Per student ("" for a single-student job): a new best file waiting for the next checkpoint upload.
        self._best_pending: dict[str, bool] = {}
        # Several-student jobs: the students' names (their files live in out/NAME/), and each epoch's
        # metrics gathered from the students so far ({epoch: {name: metrics}}).
        self.students: list[str] = []
        self._epoch_metrics: dict[int, dict[str, Any]] = {}
        self.meter = JobMeter()  # RD_WORKER_METRICS_PORT (worker/metrics.py)

    # ----- the attempt ---------------------------------------------------------------------------------

    def execute(self) -> str:
        try:
            outcome = self._claim()
            if outcome is not None:
                log.info("job %s: not run (%s)", self.job_id, outcome)
                self.meter.not_run()
                return outcome
            monitor = threading.Thread(
                target=self._monitor, name=f"rd-monitor-{self.job_id[:8]}", daemon=True
            )
            monitor.start()
            try:
                return self.meter.ran(self._run)
            finally:
                self.stop_monitor.set()
                monitor.join(timeout=10)
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self.engine.dispose()

    def _claim(self) -> str | None:
        """Move the job to running for this attempt; a reason string when it must not run.

        The decision is made on the row locked FOR UPDATE, so two deliveries of one job (a redelivery, or
        a resend by the reaper while the first message was still there) never both claim it. A delivery
        that finds the job running under a fresh lease is a duplicate and returns at once instead of
        holding this worker for a lease period: if that owner is in fact dead, the reaper requeues the
        job when its lease runs out (worker/lease.py), with a message of its own. A stale lease is a lost
        worker: it is counted (``lost_workers``, bounded by RD_MAX_LOST_WORKERS) and this delivery takes
        the job over, resuming from its checkpoint.
        """
        with session_scope(self.sessions) as session:
            job = session.get(Job, self.job_id, with_for_update=True)
            if job is None:
                return "no such job"
            if job.is_terminal:
                return f"already {job.status}"
            if job.status in ACTIVE_STATUSES and not job.cancel_requested:
                if not is_stale(job.updated_at, self.ws.stale_after_s):
                    return "running on a live worker (duplicate delivery)"
                message = f"redelivered after attempt {job.attempts}: its worker was lost"
                if lose_worker(session, job, self.ws.max_lost_workers, message) != "queued":
                    return job.status
            try:
                if not start_attempt(session, job):
                    return job.status
            except IllegalTransition:
                session.rollback()
                return "claimed by another delivery"
            self.attempt, self.tenant_id = job.attempts, job.tenant_id
            log.info("job %s: attempt %d started", self.job_id, self.attempt)
            return None

    def _run(self) -> str:
        from core.errors import Cancelled, UserError

        try:
            cfg = self._prepare()
            from core.pipeline import run_distillation

            report = run_distillation(cfg, self.out, on_event=self._on_event, should_stop=self._should_stop)
            self._finish_success(report)
            return "succeeded"
        except LostLease:
            log.warning(
                "job %s: attempt %d lost its lease; another attempt owns the job", self.job_id, self.attempt
            )
            return "lost lease"
        except Cancelled as exc:
            if self.lost.is_set():
                log.warning("job %s: attempt %d stopped: lease lost", self.job_id, self.attempt)
                return "lost lease"
            self._finish("cancelled", error=None, note=self._public(str(exc)))
            return "cancelled"
        except UserError as exc:
            self._finish("failed", error=self._public(str(exc)))
            return "failed"
        except Exception as exc:
            log.exception("job %s: attempt %d crashed", self.job_id, self.attempt)
            return self._retry_or_fail(self._public(f"internal error: {type(exc).__name__}: {exc}"))

    # ----- inputs ----------------------------------------------------------------------------------------

    def _prepare(self) -> Any:
        """Fetch the teacher, the dataset and the last checkpoint; build the DistillConfig."""
        from core.pipeline import DistillConfig

        with session_scope(self.sessions) as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            params = dict(job.params or {})
            params["job_id"] = self.job_id  # named in the exports' metadata and the model card
            teacher = session.get(Teacher, job.teacher_id) if job.teacher_id else None
            dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
            teacher_row = (
                None
                if teacher is None
                else (teacher.object_key, teacher.arch, teacher.format, teacher.normalize_spec)
            )
            if teacher is not None:  # the report names the teacher by these, never by a local path
                params["teacher_id"], params["teacher_sha256"] = teacher.id, teacher.sha256
            dataset_key = None if dataset is None else dataset.object_key
            if job.teacher_id and teacher is None:
                from core.errors import ModelLoadError

                raise ModelLoadError(f"teacher {job.teacher_id} was deleted before the job ran")

        shutil.rmtree(self.work, ignore_errors=True)
        self.out.mkdir(parents=True)
        if teacher_row is not None:
            key, arch, fmt, normalize = teacher_row
            local = self.work / f"teacher{Path(key).suffix or '.pt'}"
            self.store.get_file(key, local)
            params["teacher_path"] = str(local)
            if not params.get("teacher_arch") and arch:
                params["teacher_arch"] = arch
            if params.get("teacher_format", "auto") == "auto" and fmt:
                params["teacher_format"] = fmt
            if not params.get("teacher_normalize"):
                params["teacher_normalize"] = normalize
        if dataset_key is not None:
            local = self.work / "dataset.npz"
            self.store.get_file(dataset_key, local)
            params["dataset"], params["data_root"] = "npz", str(local)
        else:
            params["data_root"] = str(self.settings.data_root)

        cfg = DistillConfig.from_dict(params)
        self.meter.batch_size = cfg.batch_size
        self.students = list(cfg.student_configs()) if cfg.students else []
        resumed_from = self._fetch_checkpoint()
        if self.attempt > 1:
            with session_scope(self.sessions) as session:
                add_event(
                    session,
                    self.job_id,
                    "resume",
                    {
                        "attempt": self.attempt,
                        "checkpoint": resumed_from is not None,
                        "checkpoint_epoch": resumed_from,
                    },
                    dedupe_key=f"resume:{self.attempt}",
                )
        return cfg

    def _fetch_checkpoint(self) -> int | None:
        """Download the job's checkpoint(s) (and best weights) if an earlier attempt left them."""
        found = False
        for student in self.students or [""]:
            local = self.out / student if student else self.out
            local.mkdir(parents=True, exist_ok=True)
            try:
                key = self._key(self._stored("checkpoint.pt", student))
                self.store.get_file(key, local / "checkpoint.pt")
            except ObjectNotFound:  # this student had not finished an epoch yet
                continue
            found = True
            best = self._key(self._stored("student_best.pt", student))
            try:
                self.store.get_file(best, local / "student_best.pt")
            except ObjectNotFound:
                pass
        if not found:
            return None
        with session_scope(self.sessions) as session:
            payloads = session.scalars(
                sa.select(JobEvent.payload).where(
                    JobEvent.job_id == self.job_id, JobEvent.type == "checkpoint"
                )
            ).all()
        epoch = max((int(p.get("epoch", 0)) for p in payloads), default=0)
        log.info("job %s: resuming from the stored checkpoint (epoch %d)", self.job_id, epoch)
        return epoch

    @staticmethod
    def _stored(name: str, student: str) -> str:
        """A file's name in the store and among the artifacts: NAME.FILE for a student of several."""
        return f"{student}.{name}" if student else name

    def _key(self, name: str) -> str:
        return job_key(self.tenant_id, self.job_id, name)

    # ----- during the run --------------------------------------------------------------------------------

    def _monitor(self) -> None:
        """Renew the lease every heartbeat and read the cancel flag every ``cancel_poll_s``."""
        next_beat = 0.0
        while not self.stop_monitor.is_set():
            try:
                with session_scope(self.sessions) as session:
                    now = time.monotonic()
                    if now >= next_beat:
                        if not touch(session, self.job_id, self.attempt):
                            job = session.get(Job, self.job_id)
                            if job is None or job.attempts != self.attempt:
                                self.lost.set()
                        next_beat = now + self.ws.heartbeat_s
                    row = session.execute(
                        sa.select(Job.cancel_requested, Job.attempts).where(Job.id == self.job_id)
                    ).first()
                    if row is None or row.cancel_requested:
                        self.cancelled.set()
                    elif row.attempts != self.attempt:
                        self.lost.set()
            except Exception:
                log.warning("job %s: monitor could not reach the database", self.job_id, exc_info=True)
            self.stop_monitor.wait(self.ws.cancel_poll_s)

    def _should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def _write(self) -> Any:
        """A transaction for a write this attempt may still make (it still owns the job)."""
        if self.lost.is_set():
            raise LostLease()
        return session_scope(self.sessions)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.meter.on_event(event)
        kind = event.get("type")
        if kind == "progress":
            # Training steps and evaluation batches alike (``phase``: training | evaluating): at most one
            # write a second, except an epoch's last step or an attack's last batch.
            now = time.monotonic()
            last = (event.get("steps") is not None and event.get("step") == event.get("steps")) or (
                event.get("total") is not None and event.get("done") == event.get("total")
            )
            if now - self._last_progress < PROGRESS_EVERY_S and not last:
                return
            self._last_progress = now
            progress = {"phase": "training", **{k: v for k, v in event.items() if k != "type"}}
            with self._write() as session:
                set_progress(session, self.job_id, finite(progress))
        elif kind == "epoch":
            epoch, metrics = int(event["epoch"]), finite(dict(event.get("metrics") or {}))
            student = str(event.get("student") or "")
            self._best_pending[student] = bool(metrics.get("best"))
            payload = {"epoch": epoch, "epochs": event.get("epochs"), "metrics": metrics}
            if student:  # one row per epoch: {"students": {name: metrics}}, filled as the students report
                payload["student"] = student
                self._epoch_metrics.setdefault(epoch, {})[student] = metrics
                row = {"students": dict(self._epoch_metrics[epoch])}
            else:
                row = metrics
            with self._write() as session:
                upsert_metrics(session, self.job_id, epoch, row)
                add_event(
                    session,
                    self.job_id,
                    "metrics",
                    payload,
                    dedupe_key=f"epoch:{epoch}:{student}" if student else f"epoch:{epoch}",
                )
        elif kind == "checkpoint":
            self._upload_checkpoint(int(event["epoch"]), Path(event["path"]), str(event.get("student") or ""))
        elif kind == "status" and event.get("status") == "evaluating":
            with self._write() as session:
                job = session.get(Job, self.job_id)
                assert job is not None
                if job.status == "running":
                    transition(session, job, "evaluating")
                set_progress(session, self.job_id, {**(job.progress or {}), "fraction": 1.0, "eta_s": None})
        elif kind == "warning":
            message = self._public(str(event.get("message", "")))
            if event.get("student"):  # as the several-student report words it
                message = f"{event['student']}: {message}"
            digest = hashlib.sha1(message.encode()).hexdigest()[:16]
            with self._write() as session:
                add_event(
                    session, self.job_id, "warning", {"message": message}, dedupe_key=f"warning:{digest}"
                )
                job = session.get(Job, self.job_id)
                if job is not None:
                    job.warnings = _with_warnings(job.warnings, [message])
        elif kind == "teacher_check":  # measured before training (core.guardrails.check_teacher)
            record = finite({k: v for k, v in event.items() if k != "type"})
            with self._write() as session:
                add_event(session, self.job_id, "teacher_check", record, dedupe_key="teacher_check")
                job = session.get(Job, self.job_id)
                if job is not None:
                    job.teacher_accuracy = record.get("accuracy")
        else:
            log.debug("job %s: event %s not stored", self.job_id, kind)

    def _upload_checkpoint(self, epoch: int, path: Path, student: str = "") -> None:
        """Best weights first, then the checkpoint: a stored checkpoint always has its best file."""
        if self.lost.is_set():
            raise LostLease()
        best = path.parent / "student_best.pt"
        if self._best_pending.get(student) and best.exists():
            self.store.put_file(self._key(self._stored("student_best.pt", student)), best)
        self.store.put_file(self._key(self._stored("checkpoint.pt", student)), path)
        self._best_pending[student] = False
        payload, dedupe = {"epoch": epoch}, f"checkpoint:{epoch}"
        if student:  # each student of several checkpoints (and resumes) on its own
            payload, dedupe = {**payload, "student": student}, f"{dedupe}:{student}"
        with self._write() as session:
            add_event(session, self.job_id, "checkpoint", payload, dedupe_key=dedupe)

    # ----- the end ------------------------------------------------------------------------------------

    def _finish_success(self, report: dict[str, Any]) -> None:
        if self.students:
            files = [("report.json", self.out / "report.json")]
            files += [(self._stored(name, student), self.out / student / name)
                      for student in self.students for name in RESULT_FILES]
            for student in self.students:
                files += [(self._stored(name, student), path)
                          for name, path in _handed_out(self.out / student, report["students"][student])]
        else:
            files = [(name, self.out / name) for name in RESULT_FILES]
            files += _handed_out(self.out, report)
        for name, path in files:
            self.store.put_file(self._key(name), path)
        with self._write() as session:
            for name, path in files:
                record_artifact(
                    session, self.job_id, name, self._key(name), path.stat().st_size, file_sha256(path)
                )
            job = session.get(Job, self.job_id)
            assert job is not None
            if job.attempts != self.attempt:
                raise LostLease()
            # Add the report's warnings to those its events brought in while the job ran.
            job.warnings = _with_warnings(job.warnings, report.get("warnings", []))
            job.degenerate_student = bool(report.get("degenerate_student"))
            transition(session, job, "succeeded")
        log.info("job %s: succeeded in %.1f s", self.job_id, report.get("seconds") or 0.0)

    def _public(self, text: str) -> str:
        """A message as the tenant may read it: no path of this machine (``service.paths``)."""
        return scrub_paths(text, self._roots)

    def _retry_or_fail(self, error: str) -> str:
        """The job's own unexpected error ended this attempt: retry from the checkpoint, or give up."""
        try:
            with session_scope(self.sessions) as session:
                outcome = retry_or_fail(session, self.job_id, self.attempt, error, self.ws.max_attempts)
        except IllegalTransition:
            return "moved meanwhile"
        if outcome == "retrying":
            try:
                CeleryQueue(self.settings).enqueue(self.job_id)
            except Exception:  # the reaper sends queued jobs without a message again
                log.exception("job %s: requeued for a retry but the broker refused the message", self.job_id)
        return outcome

    def _finish(self, status: str, *, error: str | None, note: str | None = None) -> None:
        """Record a terminal status unless another attempt took the job (or it already ended)."""
        try:
            with session_scope(self.sessions) as session:
                job = session.get(Job, self.job_id)
                if job is None or job.is_terminal or job.attempts != self.attempt:
                    return
                if note:
                    add_event(session, self.job_id, "info", {"message": note})
                transition(session, job, status, error=error)
        except IllegalTransition:
            log.info("job %s: could not move to %s; it moved first", self.job_id, status)
        log.info("job %s: %s%s", self.job_id, status, f": {error}" if error else "")
