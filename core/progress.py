"""Terminal output for a run's events: a tqdm bar on a terminal, one plain line per epoch otherwise.

The trainer and the pipeline only emit event dicts; this is the CLI's way of showing them (the service
stores the same events instead).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


def format_epoch(metrics: dict[str, Any], epochs: int | None = None) -> str:
    """'epoch 3/10  loss 0.412  train 61.2%  val 58.0% / pgd 31.0%  lr 0.1  42s  310 img/s  best'."""
    m = metrics
    total = f"/{epochs}" if epochs else ""
    parts = [f"epoch {m['epoch']}{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if m.get("train_acc") is not None:
        parts.append(f"train {m['train_acc']:.1%}")
    if m.get("val_clean_acc") is not None:
        val = f"val {m['val_clean_acc']:.1%}"
        if m.get("val_robust_acc") is not None:
            val += f" / pgd {m['val_robust_acc']:.1%}"
        parts.append(val)
    parts.append(f"lr {m['lr']:.3g}")
    parts.append(f"{m['seconds']:.0f}s")
    parts.append(f"{m['images_per_s']:.0f} img/s")
    if m.get("best"):
        parts.append("best")
    return "  ".join(parts)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class ProgressPrinter:
    """Call it with every event; close it at the end. ``bar=None`` picks the bar when ``stream`` is a TTY."""

    def __init__(self, stream: TextIO | None = None, *, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.use_bar = self.stream.isatty() if bar is None else bar
        self.bar: tqdm | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "progress" and "step" in event:
            self._progress(event)
        elif kind == "epoch":
            who = f"{event['student']}: " if event.get("student") else ""  # one student of several
            self._line(who + format_epoch(event["metrics"], event.get("epochs")))
        elif kind == "status":
            self.close()
            self._line(f"{event['status']}...")
        elif kind == "warning":
            self._line(f"warning: {event['message']}")

    def _progress(self, event: dict[str, Any]) -> None:
        if not self.use_bar:
            return
        total = event["epochs"] * event["steps"]
        if self.bar is None:
            self.bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True, leave=False)
        self.bar.set_description(f"epoch {event['epoch']}/{event['epochs']}", refresh=False)
        self.bar.update(round(event["fraction"] * total) - self.bar.n)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
