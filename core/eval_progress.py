"""Progress of the evaluation phase (every attack on the best and the last checkpoint), reported like the
training steps so that a job shows where it is and how long it has left while AutoAttack runs.

Events: ``{"type": "progress", "phase": "evaluating", "checkpoint": "best"|"last", "attack", "done",
"total", "fraction", "eta_s", **extra}`` where ``done``/``total`` count the checkpoint's examples under
the current attack and ``fraction`` is the share of the whole evaluation phase done (every planned
checkpoint and attack counted alike). Throttled like ``core.train.ProgressMeter``: an attack's first and
last batch always, else at most once a second. The ETA extrapolates this phase's own rate; attacks differ
a lot in cost (clean is nearly free, AutoAttack is not), so it firms up as the phase goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

EventFn = Callable[[dict[str, Any]], None]
ProgressFn = Callable[[dict[str, Any]], None]


class EvaluationProgress:
    """One evaluation phase of ``checkpoints`` evaluate_model runs, in order; ``hook(name)`` gives the
    next run's ``on_progress``."""

    def __init__(self, checkpoints: int, emit: EventFn, *, min_interval_s: float = 1.0, **extra: Any) -> None:
        if checkpoints < 1:
            raise ValueError("an evaluation phase evaluates at least one checkpoint")
        self.checkpoints, self.emit, self.extra = checkpoints, emit, extra
        self.min_interval_s = min_interval_s
        self.started = time.monotonic()
        self.index = 0
        self.last_emit = 0.0
        self.last_attack: tuple[int, str] | None = None

    def hook(self, checkpoint: str) -> ProgressFn:
        index = min(self.index, self.checkpoints - 1)
        self.index += 1

        def on_progress(event: dict[str, Any]) -> None:
            self._report(index, checkpoint, event)

        return on_progress

    def _report(self, index: int, checkpoint: str, event: dict[str, Any]) -> None:
        now = time.monotonic()
        attack, done, total = str(event.get("attack", "")), int(event["done"]), int(event["total"])
        first = self.last_attack != (index, attack)
        self.last_attack = (index, attack)
        if not first and done < total and now - self.last_emit < self.min_interval_s:
            return
        self.last_emit = now
        fraction = min(1.0, (index + float(event.get("fraction", 0.0))) / self.checkpoints)
        elapsed = now - self.started
        eta = elapsed / fraction * (1.0 - fraction) if fraction > 0 else None
        self.emit({"type": "progress", "phase": "evaluating", "checkpoint": checkpoint, "attack": attack,
                   "done": done, "total": total, "fraction": fraction, "eta_s": eta, **self.extra})
