"""What ``distill-client`` shows while a job runs: a progress bar (tqdm when installed, else one plain
line whenever what it would show changes) and one line per event a person wants to see scroll by."""

from __future__ import annotations

from typing import Any, TextIO

from distill_client.models import EventOut, JobOut

# Metrics worth a place on the progress bar, in the order shown.
BAR_METRICS = (
    ("loss", "loss"),
    ("train_acc", "train"),
    ("val_clean_acc", "val_clean"),
    ("val_robust_acc", "val_robust"),
)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_metric(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def bar_state(job: JobOut) -> tuple[float, str, str]:
    """(percent done, description, postfix) of the job's bar."""
    p = job.progress
    fraction = 1.0 if job.status == "succeeded" else float(p.fraction or 0.0)
    percent = round(100 * min(max(fraction, 0.0), 1.0), 1)
    parts = []
    if p.phase == "evaluating":  # the fraction is the evaluation's own, from 0 again
        who = f"{p.student} " if p.student else ""
        parts.append(f"eval {who}{p.checkpoint or '?'} {p.attack or '?'}")
        if p.total:
            parts.append(f"{p.done or 0}/{p.total}")
    else:
        if p.epochs:
            parts.append(f"epoch {p.epoch or 0}/{p.epochs}")
        if p.steps:
            parts.append(f"step {p.step or 0}/{p.steps}")
    metrics = job.latest_metrics or {}
    parts += [f"{label} {fmt_metric(metrics[k])}" for k, label in BAR_METRICS if metrics.get(k) is not None]
    if job.status in ("running", "evaluating") and p.eta_s is not None:
        parts.append(f"eta {fmt_seconds(p.eta_s)}")
    return percent, f"{job.id[:8]} {job.status}", " ".join(parts)


def describe(event: EventOut) -> str | None:
    """One line for events a person wants to see scroll by."""
    kind, payload = event.type, event.payload or {}
    if kind == "metrics":
        m = payload.get("metrics") or {}
        shown = " ".join(f"{k}={fmt_metric(m[k])}" for k, _ in BAR_METRICS if m.get(k) is not None)
        return f"epoch {payload.get('epoch')}/{payload.get('epochs') or '?'}: {shown}"
    if kind == "status":
        error = f" ({payload['error']})" if payload.get("error") else ""
        return f"status: {payload.get('status')}{error}"
    if kind in ("warning", "info"):
        return f"{kind}: {payload.get('message')}"
    if kind == "resume":
        return f"resumed (attempt {payload.get('attempt')}) from epoch {payload.get('checkpoint_epoch')}"
    return None


class ProgressView:
    """The bar and the event lines on ``out``; ``enabled=False`` shows nothing."""

    def __init__(self, out: TextIO, *, enabled: bool = True) -> None:
        self.out, self.enabled = out, enabled
        self._last_plain: str | None = None
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: plain lines instead of a bar
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=100,
                    unit="%",
                    dynamic_ncols=True,
                    file=out,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}]{postfix}",
                )

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def update(self, job: JobOut) -> None:
        if not self.enabled:
            return
        percent, desc, postfix = bar_state(job)
        if self._bar is not None:
            update_bar(self._bar, percent, desc, postfix)
            return
        plain = f"{desc} {percent:.0f}% {postfix}".rstrip()
        if plain != self._last_plain:
            print(plain, file=self.out, flush=True)
            self._last_plain = plain

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def update_bar(bar: Any, percent: float, desc: str, postfix: str) -> None:
    bar.n = percent
    bar.set_description_str(desc)
    bar.set_postfix_str(postfix, refresh=False)
    bar.refresh()
