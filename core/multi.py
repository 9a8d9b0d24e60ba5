"""Several students from one teacher in one pass over the data.

Users often want more than one student (two architectures, or RSLAD next to ARD) from the same teacher.
Run separately, each job draws, augments and moves every batch itself and runs the teacher forward on
it again. ``MultiTrainer`` drives several ``Trainer`` objects over one data pass instead: each batch is
drawn and augmented once, the teacher labels it once (``Batch`` caches ``T(x)``), and every student
then takes its own step with its own method, optimiser, schedule and attack generator.

Nothing about a student changes: its data order, augmentation and attack starts are the same pure
functions of (seed, epoch) as in a separate run, so with ``deterministic=True`` on the CPU each student
is bit for bit the student a separate job would have trained (tests/unit/test_multi.py checks it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from core.errors import Cancelled, ConfigError, UserError
from core.train import Determinism, EventFn, ProgressMeter, StopFn, Trainer

# What the students must share to share a data pass and a teacher forward.
# Students may differ in amp and memory format (each gets x in its own); the teacher's settings are one.
_SHARED = ("batch_size", "seed", "deterministic", "device", "teacher_amp")


class MultiTrainer:
    """Trains ``trainers`` (name -> Trainer, each with its own out dir) in lockstep over one data pass.

    The trainers must share the training split, the teacher and the loop settings in ``_SHARED``; their
    epochs may differ (a student whose epochs are done drops out of the pass). Per-student events go to
    each trainer's own callback; this object emits the pass's progress events (tagged ``students``).
    """

    def __init__(self, trainers: Mapping[str, Trainer], *, on_event: EventFn | None = None,
                 should_stop: StopFn | None = None) -> None:
        if not trainers:
            raise ConfigError("a multi-student run needs at least one student")
        self.trainers = dict(trainers)
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        lead = self.lead = next(iter(self.trainers.values()))
        for name, t in self.trainers.items():
            differ = [k for k in _SHARED if _setting(t, k) != _setting(lead, k)]
            if differ:
                raise ConfigError(f"student {name!r} differs from the others in {', '.join(differ)}: the "
                                  "students of one pass share the data order, batch and device settings")
            if t.data is not lead.data:
                raise ConfigError(f"student {name!r} trains on other data than the others")
            if t.teacher is not None and lead.teacher is not None and t.teacher is not lead.teacher:
                raise ConfigError(f"student {name!r} has another teacher object: pass the same one to all")
        self.teacher = next((t.teacher for t in self.trainers.values() if t.teacher is not None), None)
        self.epochs = max(t.epochs for t in self.trainers.values())

    def fit(self) -> dict[str, dict[str, Any]]:
        """Train every student to its epochs; name -> that trainer's ``result()``."""
        lead = self.lead
        with Determinism(lead.config.deterministic, lead.device):
            for t in self.trainers.values():
                t.start()
            start = min(t.start_epoch for t in self.trainers.values())
            self._progress = ProgressMeter(self.epochs, start, self.on_event, students=list(self.trainers))
            for epoch in range(start, self.epochs):
                self._run_epoch(epoch)
        return {name: t.result() for name, t in self.trainers.items()}

    def _run_epoch(self, epoch: int) -> None:
        active = [t for t in self.trainers.values() if t.start_epoch <= epoch < t.epochs]
        if not active:
            return
        t0 = time.monotonic()
        lrs = [t.optimizer.param_groups[0]["lr"] for t in active]
        steps = self.lead.steps_per_epoch()
        for t in active:
            t.begin_epoch(epoch)
        for step, (x, y) in enumerate(self.lead.epoch_batches(epoch), start=1):
            if self.should_stop():
                raise Cancelled(f"cancelled during epoch {epoch + 1} step {step}; the checkpoints of "
                                f"epoch {epoch} remain")
            shared: dict = {}  # the one teacher forward every student's loss reads
            for t in active:
                batch = t.make_batch(x, y, shared)
                batch.teacher = self.teacher
                try:
                    t.train_step(batch, epoch, step)
                except ConfigError as exc:  # e.g. a diverged loss: say which student
                    raise ConfigError(f"student {self._name(t)!r}: {exc}") from exc
            self._progress(epoch, step, steps)
        train_seconds = time.monotonic() - t0
        for t, lr in zip(active, lrs, strict=True):
            t.finish_epoch(epoch, lr, t.end_epoch(), train_seconds, t0)

    def _name(self, trainer: Trainer) -> str:
        return next(name for name, t in self.trainers.items() if t is trainer)


def _setting(trainer: Trainer, key: str) -> Any:
    if key == "teacher_amp":
        return trainer.teacher_amp
    if key == "device":
        return str(trainer.device)
    return getattr(trainer.config, key)


def student_comparisons(reports: Mapping[str, dict[str, Any]], checkpoint: str = "best") -> dict[str, Any]:
    """The report's ``comparisons``: every other student against a reference student, per attack, on
    the ``checkpoint`` evaluation, by McNemar's exact test (``core.compare.compare_rows``).

    The reference is the first student trained with RSLAD (the method this library is built around, so
    "does this alternative beat RSLAD?" is the question asked), or the first student when none is.
    ``a`` is the reference, ``b`` the other student: ``diff`` = student minus reference. A pair that
    cannot be compared (no bits, other examples) carries ``error`` instead of failing the job.
    """
    from core.compare import compare_row_lists, report_rows

    names = list(reports)
    reference = next((n for n in names if (reports[n].get("config") or {}).get("method") == "rslad"),
                     names[0] if names else None)
    results: list[dict[str, Any]] = []
    for name in names:
        if name == reference:
            continue
        try:
            pairs = compare_row_lists(report_rows(reports[reference], checkpoint=checkpoint),
                                      report_rows(reports[name], checkpoint=checkpoint),
                                      a_label=reference, b_label=name)
        except UserError as exc:
            results.append({"reference": reference, "student": name, "error": str(exc)})
            continue
        results += [{"reference": reference, "student": name, **pair} for pair in pairs]
    return {"reference": reference, "checkpoint": checkpoint,
            "rule": "the first RSLAD student, else the first student; a = reference, b = student, "
                    "diff = b_acc - a_acc",
            "test": "McNemar exact, two-sided (not mid-p), on the same test examples", "results": results}
