"""The evaluation phase reports progress like training: checkpoint, attack, examples done, fraction, ETA;
the worker stores it (throttled) as the job's progress with ``phase``, and the API shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from api.schemas import Progress
from core import eval_progress
from core.eval_progress import EvaluationProgress
from core.pipeline import DistillConfig, run_distillation
from service.db import make_engine, make_session_factory, session_scope, upgrade_to_head
from service.models import Job, Tenant
from service.settings import Settings
from worker.lease import WorkerSettings
from worker.tasks import JobRun


def _data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(300) % 4
    x = rng.uniform(40, 215, size=(4, 3))[y][:, None, None, :] + rng.normal(0, 40, size=(300, 8, 8, 3))
    np.savez(path, x=np.clip(x[:200], 0, 255).astype(np.uint8), y=y[:200],
             x_test=np.clip(x[200:], 0, 255).astype(np.uint8), y_test=y[200:])
    return path


def test_run_distillation_reports_evaluation_progress(tmp_path: Path) -> None:
    data = _data(tmp_path / "d.npz")
    cfg = DistillConfig(student="tiny_cnn", method="natural", dataset="npz", data_root=str(data), epochs=2,
                        batch_size=32, val_size=50, attacks=["clean", "fgsm"], n_eval=100, eval_batch_size=16,
                        device="cpu", amp=False, allow_degenerate=True)
    events: list[dict[str, Any]] = []
    run_distillation(cfg, tmp_path / "out", on_event=events.append)
    evaluating = [e for e in events if e["type"] == "progress" and e.get("phase") == "evaluating"]
    assert evaluating, "no evaluation progress"
    checkpoints = {e["checkpoint"] for e in evaluating}
    assert "last" in checkpoints and checkpoints <= {"best", "last"}
    assert {e["attack"] for e in evaluating} == {"clean", "fgsm"}
    assert all(e["total"] == 100 and 0 < e["done"] <= 100 for e in evaluating)
    fractions = [e["fraction"] for e in evaluating]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert evaluating[-1]["eta_s"] == pytest.approx(0.0, abs=1e-6)
    # Each attack of each checkpoint reports its first and its last batch, whatever the throttle does.
    for checkpoint in checkpoints:
        for attack in ("clean", "fgsm"):
            done = [e["done"] for e in evaluating if e["checkpoint"] == checkpoint and e["attack"] == attack]
            assert done[0] == 16 and done[-1] == 100
    # Evaluation comes after training and after the status says so.
    first = events.index(evaluating[0])
    assert any(e == {"type": "status", "status": "evaluating"} for e in events[:first])
    assert not [e for e in events[first:] if e["type"] == "progress" and e.get("phase") != "evaluating"]


def test_evaluation_progress_is_throttled_but_keeps_first_and_last(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 100.0}
    monkeypatch.setattr(eval_progress.time, "monotonic", lambda: clock["now"])
    sent: list[dict[str, Any]] = []
    meter = EvaluationProgress(2, sent.append, student="a")
    last, best = meter.hook("last"), meter.hook("best")
    for hook in (last, best):
        for i, attack in enumerate(("clean", "pgd")):
            for done in range(10, 101, 10):
                clock["now"] += 0.01  # a hundred batches a second: only first and last get through
                hook({"type": "progress", "attack": attack, "done": done, "total": 100,
                      "fraction": (i + done / 100) / 2})
    assert [(e["checkpoint"], e["attack"], e["done"]) for e in sent] == [
        (c, a, d) for c in ("last", "best") for a in ("clean", "pgd") for d in (10, 100)
    ]
    assert [e["fraction"] for e in sent] == pytest.approx([0.025, 0.25, 0.275, 0.5, 0.525, 0.75, 0.775, 1.0])
    assert all(e["phase"] == "evaluating" and e["student"] == "a" for e in sent)
    assert sent[-1]["eta_s"] == 0.0 and sent[0]["eta_s"] > 0


@pytest.fixture
def job_run(tmp_path: Path):
    settings = Settings(var_dir=tmp_path / "var")
    upgrade_to_head(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, student_arch="tiny_cnn", method="natural", params={}, status="queued",
                  progress={"epoch": 0, "epochs": 2, "fraction": 0.0})
        session.add(job)
        session.flush()
        job_id = job.id
    run = JobRun(job_id, settings, WorkerSettings())
    try:
        yield run, sessions
    finally:
        run.engine.dispose()
        engine.dispose()


def _progress(sessions: Any, job_id: str) -> dict[str, Any]:
    with sessions() as session:
        return session.scalar(sa.select(Job.progress).where(Job.id == job_id))


def test_worker_stores_evaluation_progress_throttled(job_run: Any) -> None:
    run, sessions = job_run
    run._on_event({"type": "progress", "epoch": 2, "epochs": 2, "step": 7, "steps": 7, "fraction": 1.0,
                   "eta_s": 0.0})
    assert _progress(sessions, run.job_id)["phase"] == "training"
    event = {"type": "progress", "phase": "evaluating", "checkpoint": "best", "attack": "pgd", "done": 32,
             "total": 100, "fraction": 0.16, "eta_s": 40.0}
    run._last_progress = 0.0
    run._on_event(event)
    stored = _progress(sessions, run.job_id)
    assert {k: stored[k] for k in ("phase", "checkpoint", "attack", "done", "total")} == {
        "phase": "evaluating", "checkpoint": "best", "attack": "pgd", "done": 32, "total": 100}
    run._on_event({**event, "done": 64})  # within a second of the last write: skipped
    assert _progress(sessions, run.job_id)["done"] == 32
    run._on_event({**event, "done": 100, "fraction": 0.5})  # an attack's last batch: always written
    assert _progress(sessions, run.job_id)["done"] == 100
    shown = Progress.model_validate(_progress(sessions, run.job_id)).model_dump()
    assert shown["phase"] == "evaluating" and shown["attack"] == "pgd" and shown["eta_s"] == 40.0


def test_progress_shows_only_what_was_reported() -> None:
    assert Progress.model_validate({"epoch": 1, "epochs": 2, "fraction": 0.5}).model_dump() == {
        "epoch": 1, "epochs": 2, "fraction": 0.5}


def test_client_bar_names_the_checkpoint_and_attack() -> None:
    import io

    from tqdm import tqdm

    from distill_client.models import JobOut
    from distill_client.progress import bar_state, update_bar

    out = io.StringIO()
    bar = tqdm(total=100, file=out, bar_format="{desc} {percentage:3.0f}%|{postfix}")
    progress = {"phase": "evaluating", "epoch": 2, "epochs": 2, "checkpoint": "best", "attack": "autoattack",
                "done": 256, "total": 1000, "fraction": 0.6, "eta_s": 90.0}
    job = JobOut.model_construct(id="j" * 32, status="evaluating", progress=Progress(**progress),
                                 latest_metrics=None)
    update_bar(bar, *bar_state(job))
    shown = out.getvalue()
    assert "eval best autoattack 256/1000" in shown and "eta 1m30s" in shown and "epoch" not in shown
    assert bar.n == 60
