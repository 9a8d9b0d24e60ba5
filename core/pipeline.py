"""One distillation job end to end: data, teacher, student, training, test-set evaluation, report.

The CLI and the service's worker both call ``run_distillation``; everything a job needs is in one
JSON-serialisable ``DistillConfig``, and everything it learnt is in the returned (and written) report.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import core
from core import guardrails
from core.config import (  # noqa: F401  (DistillConfig and the defaults are imported from here too)
    DEFAULT_ATTACKS,
    DEFAULT_EPS,
    DISTILL_ATTACKS,
    LIMITS,
    DistillConfig,
    _check_attacks,
    _check_int,
    _is_number,
)
from core.data import DatasetBundle, Split, load_dataset
from core.device import resolve_device
from core.errors import ConfigError, ModelLoadError
from core.eval_progress import EvaluationProgress, ProgressFn
from core.evaluate import evaluate_model
from core.exported import check_attacks_for_format
from core.files import finite, sha256_file, write_json
from core.models import create_model
from core.recipes import recipe_record
from core.stats import history_with_intervals
from core.student_outputs import finish_outputs
from core.teachers import load_model_file
from core.train import EventFn, StopFn, TrainConfig, Trainer


def versions() -> dict[str, str]:
    out = {"core": core.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "pyautoattack"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def dataset_info(data: DatasetBundle) -> dict[str, Any]:
    n_val = int(data.val.y.shape[0])
    return {
        "name": data.name, "num_classes": data.num_classes, "image_shape": list(data.train.x.shape[1:]),
        "train": int(data.train.y.shape[0]), "val": n_val, "test": int(data.test.y.shape[0]),
        "note": data.note,
        "val_note": (f"best checkpoint selected on a held-out validation split of {n_val} training images, "
                     "not on the test set as the reference code does") if n_val else
                    "no validation split: the best checkpoint is the last one",
    }


def public_config(cfg: DistillConfig) -> dict[str, Any]:
    """The settings as a report shows them: file names, never a path of the machine that ran the job."""
    out = cfg.to_dict()
    for key in ("teacher_path", "data_root"):
        if out.get(key):
            out[key] = os.path.basename(os.path.normpath(str(out[key])))
    return out


def teacher_name(cfg: DistillConfig) -> dict[str, Any]:
    """How a report names the teacher: its id and sha256 when the service gave them, else its file name
    (and the file's sha256)."""
    if cfg.teacher_id:
        return {"id": cfg.teacher_id, "sha256": cfg.teacher_sha256}
    assert cfg.teacher_path
    sha256 = cfg.teacher_sha256 or sha256_file(cfg.teacher_path)
    return {"file": os.path.basename(cfg.teacher_path), "sha256": sha256}


def _emit(on_event: EventFn | None, event: dict[str, Any]) -> None:
    if on_event is not None:
        on_event(event)


def run_distillation(cfg: DistillConfig, out_dir: str | os.PathLike, *, on_event: EventFn | None = None,
                     should_stop: StopFn | None = None) -> dict[str, Any]:
    """Train a student as ``cfg`` says, evaluate its best and last checkpoints, write ``report.json``.

    ``out_dir`` holding a ``checkpoint.pt`` of the same run resumes it after its last finished epoch.
    With ``cfg.students`` it trains them all in one pass (see ``run_multi_distillation``).
    """
    if cfg.students is not None:
        return run_multi_distillation(cfg, out_dir, on_event=on_event, should_stop=should_stop)
    started = time.monotonic()
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = _Inputs(cfg, on_event, should_stop)
    trainer = job.trainer(cfg, out, on_event)
    fit = trainer.fit()
    checks = job.check_students(cfg, {"": out})
    _emit(on_event, {"type": "status", "status": "evaluating"})
    report = job.report(cfg, fit, out, started, checks[""])
    finish_outputs(cfg, job.data, out, report)
    write_json(report, out / "report.json")
    return report


def run_multi_distillation(cfg: DistillConfig, out_dir: str | os.PathLike, *, on_event: EventFn | None = None,
                           should_stop: StopFn | None = None) -> dict[str, Any]:
    """Several students from one teacher in one pass over the data (``cfg.students``).

    Each student gets ``out_dir/NAME/`` with the files and ``report.json`` a single run writes; the
    returned (and written) ``out_dir/report.json`` holds every student's report under ``students``.
    Per-student events carry ``student: NAME``; progress events are the pass's.
    """
    from core.multi import MultiTrainer, student_comparisons

    started = time.monotonic()
    cfg.validate()
    subs = cfg.student_configs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = _Inputs(cfg, on_event, should_stop)

    def tagged(name: str) -> EventFn:
        def emit(event: dict[str, Any]) -> None:
            if event.get("type") != "progress":
                _emit(on_event, {**event, "student": name})
        return emit

    trainers = {name: job.trainer(sub, out / name, tagged(name)) for name, sub in subs.items()}
    fits = MultiTrainer(trainers, on_event=on_event, should_stop=should_stop).fit()
    checks = job.check_students(cfg, {name: out / name for name in subs})
    _emit(on_event, {"type": "status", "status": "evaluating"})
    reports: dict[str, Any] = {}
    for name, sub in subs.items():
        reports[name] = job.report(sub, fits[name], out / name, started, checks[name], student=name)
        finish_outputs(sub, job.data, out / name, reports[name], student=name)
        write_json(reports[name], out / name / "report.json")
    degenerate = sorted(name for name, r in reports.items() if r["degenerate_student"])
    warnings = list(job.warnings)
    for name, r in reports.items():
        warnings += [f"{name}: {w}" for w in r["warnings"] if w not in job.warnings]
    report = finite({
        "degenerate_student": bool(degenerate),
        "degenerate_students": degenerate,
        "warnings": warnings,
        "config": public_config(cfg),
        "dataset": dataset_info(job.data),
        "teacher": job.teacher_info,
        "students": reports,
        "comparisons": student_comparisons(reports),
        "shared_pass": {"students": list(subs), "teacher_forwards_per_batch": 1},
        "versions": versions(),
        "seconds": round(time.monotonic() - started, 3),
    })
    write_json(report, out / "report.json")
    return report


class _Inputs:
    """What the students of one job share: the device, the data, the teacher and its evaluation."""

    def __init__(self, cfg: DistillConfig, on_event: EventFn | None, should_stop: StopFn | None) -> None:
        self.on_event, self.should_stop = on_event, should_stop
        self.device = resolve_device(cfg.device)
        self.warnings: list[str] = []
        if cfg.teacher_path and not Path(cfg.teacher_path).is_file():  # fail before loading the data
            raise ModelLoadError(f"teacher file {cfg.teacher_path!r} does not exist or is not a file")
        self.data = load_dataset(cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed,
                                 train_subset=cfg.train_subset)
        subs = cfg.student_configs().values()
        needs_teacher = any(sub.build_method(self.data.num_classes).needs_teacher for sub in subs)
        image_shape = tuple(int(s) for s in self.data.train.x.shape[1:])
        self.teacher_info: dict[str, Any] | None = None
        self.teacher: nn.Module | None = None
        # The images the guardrails measure on: the first few hundred of the validation split (the test
        # split when there is none), so the test set stays untouched by any decision.
        self.check_split_name = "validation" if len(self.data.val) else "test"
        self.check_split: Split = self.data.val if len(self.data.val) else self.data.test
        if cfg.teacher_path and (needs_teacher or cfg.evaluate_teacher):
            loaded = load_model_file(cfg.teacher_path, arch=cfg.teacher_arch,
                                     num_classes=self.data.num_classes,
                                     normalize=cfg.teacher_normalize or None, fmt=cfg.teacher_format,
                                     device=self.device, input_shape=image_shape)
            self.teacher = loaded.model
            self.teacher_info = {**teacher_name(cfg), "format": loaded.format,
                                 "arch": loaded.arch, "num_classes": loaded.num_classes,
                                 "params": loaded.num_params, "normalize": loaded.normalize,
                                 "probe": loaded.probe}
            self._check_teacher(cfg, loaded.normalize)
            if cfg.evaluate_teacher:
                self.teacher_info["evaluation"] = _evaluate(self.teacher, self.data, cfg, self.device,
                                                            should_stop)
        elif cfg.teacher_path:
            methods = sorted({sub.method for sub in subs})
            named = (f"method {methods[0]!r} does not use a teacher" if len(methods) == 1 else
                     f"none of this job's methods ({', '.join(map(repr, methods))}) uses a teacher")
            self.warn(f"{named}; the teacher file is ignored")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        _emit(self.on_event, {"type": "warning", "message": message})

    def _check_teacher(self, cfg: DistillConfig, normalize: Any) -> None:
        """Before any training: a teacher at chance (or read with the wrong normalisation) fails the job."""
        assert self.teacher is not None and self.teacher_info is not None
        check = guardrails.check_teacher(self.teacher, self.check_split, self.data.num_classes, self.device,
                                         normalize=normalize, claimed_accuracy=cfg.teacher_claimed_accuracy,
                                         split_name=self.check_split_name)
        self.teacher_info["check"] = check.record
        _emit(self.on_event, {"type": "teacher_check", **check.record})
        for message in check.warnings:
            self.warn(f"teacher check: {message}")
        if check.failure is not None:
            if not cfg.allow_degenerate:
                raise guardrails.TeacherCheckFailed(f"teacher check failed: {check.failure}")
            self.warn(f"teacher check failed (kept going: allow_degenerate): {check.failure}")

    def check_students(self, cfg: DistillConfig, outs: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """After training: each best checkpoint's clean accuracy on the check split. A student at chance
        fails the job (``DegenerateStudent``) unless ``allow_degenerate``; then it is flagged."""
        subs = cfg.student_configs()
        checks: dict[str, dict[str, Any]] = {}
        failures: list[str] = []
        for name, out in outs.items():
            sub = subs[name] if name else cfg
            model = create_model(sub.student, self.data.num_classes)
            model.load_state_dict(torch.load(out / "student_best.pt", map_location="cpu", weights_only=True))
            model.to(self.device)
            record = guardrails.check_student(model, self.check_split, self.data.num_classes, self.device,
                                              split_name=self.check_split_name)
            record["degenerate"] = bool(record["at_chance"])
            checks[name] = record
            if record["degenerate"]:
                failures.append(guardrails.degenerate_message(name, record, self.data.num_classes))
        if failures and not cfg.allow_degenerate:
            raise guardrails.DegenerateStudent("; ".join(failures))
        for message in failures:
            self.warn(f"DEGENERATE STUDENT (kept: allow_degenerate): {message}")
        return checks

    def trainer(self, cfg: DistillConfig, out: Path, on_event: EventFn | None) -> Trainer:
        method = cfg.build_method(self.data.num_classes)
        torch.manual_seed(cfg.seed)  # the student's initial weights are a function of the seed
        student = create_model(cfg.student, self.data.num_classes)
        train_cfg = TrainConfig(epochs=method.epochs, milestones=tuple(method.milestones),
                                batch_size=cfg.batch_size, seed=cfg.seed, deterministic=cfg.deterministic,
                                amp=cfg.amp, channels_last=cfg.channels_last, val_eps=cfg.eval_eps,
                                device=str(self.device), val_batch_size=cfg.eval_batch_size, lr=cfg.lr,
                                warmup_epochs=cfg.warmup_epochs, collapse_patience=cfg.collapse_patience,
                                teacher_precision=cfg.teacher_precision)
        return Trainer(train_cfg, method, student, self.teacher if method.needs_teacher else None, self.data,
                       out, on_event=on_event, should_stop=self.should_stop)

    def report(self, cfg: DistillConfig, fit: dict[str, Any], out: Path, started: float,
               check: dict[str, Any], student: str = "") -> dict[str, Any]:
        """Evaluate the best and the last checkpoint on the test split; the run's report. Its first keys
        say whether the student is degenerate and what went wrong (``warnings``). Progress events of the
        evaluation (``core.eval_progress``) carry ``student`` when given."""
        final: dict[str, Any] = {}
        warnings = list(self.warnings) + [w for w in fit.get("warnings", []) if w not in self.warnings]
        last_epoch = fit["history"][-1]["epoch"] if fit["history"] else None
        meter = EvaluationProgress(1 if fit["best"]["epoch"] == last_epoch else 2,
                                   lambda event: _emit(self.on_event, event),
                                   **({"student": student} if student else {}))
        for which, epoch in (("last", last_epoch), ("best", fit["best"]["epoch"])):
            if which == "best" and epoch == last_epoch:
                final["best"] = {**final["last"], "same_as_last": True}
                continue
            model = create_model(cfg.student, self.data.num_classes)
            state = torch.load(out / f"student_{which}.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            final[which] = {"epoch": epoch, **_evaluate(model, self.data, cfg, self.device, self.should_stop,
                                                        meter.hook(which) if self.on_event else None)}
        final = {"best": final["best"], "last": final["last"]}
        for which in ("best", "last"):
            for message in final[which]["warnings"]:
                warnings.append(f"{which} checkpoint: {message}")
                _emit(self.on_event, {"type": "warning", "message": warnings[-1]})
        return finite({
            "degenerate_student": bool(check["degenerate"]),
            "warnings": warnings,
            "config": public_config(cfg),
            "train_config": fit["config"],
            "recipe": recipe_record(cfg.recipe, cfg.build_method(self.data.num_classes), cfg.budget(),
                                    cfg.method_params, cfg.lr, cfg.warmup_epochs),
            "student_check": check,
            "dataset": dataset_info(self.data),
            "teacher": self.teacher_info,
            "history": history_with_intervals(fit["history"], int(self.data.val.y.shape[0])),
            "best_selected_on": fit["best"]["metric"],
            "resumed_from_epoch": fit["resumed_from"],
            "final": final,
            "versions": versions(),
            "seconds": round(time.monotonic() - started, 3),
        })


def _evaluate(model: nn.Module, data: DatasetBundle, cfg: DistillConfig, device: torch.device,
              should_stop: StopFn | None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """The paper's white-box suite on the test split, fp32, the job's eps and seed."""
    return evaluate_model(model, data.test.x, data.test.y, list(cfg.attacks), eps=cfg.eval_eps,
                          n_examples=cfg.n_eval, batch_size=cfg.eval_batch_size, device=device,
                          should_stop=should_stop, on_progress=on_progress, seed=cfg.seed)


def run_evaluation(model_path: str | os.PathLike, *, arch: str | None = None, normalize: str | None = None,
                   dataset: str = "cifar10", data_root: str = "data", attacks: list[str] | None = None,
                   n_examples: int | None = None, eps: float = DEFAULT_EPS, device: str = "auto",
                   fmt: str = "auto", batch_size: int = 256, seed: int = 0,
                   should_stop: StopFn | None = None, on_event: EventFn | None = None,
                   job_test_split: bool = False) -> dict[str, Any]:
    """One model file on a dataset's test split under an attack suite (``python -m core evaluate``).

    An npz without ``x_test`` is evaluated whole; ``job_test_split`` evaluates the seeded 20% a
    distillation job with this seed held out instead (to re-check that job's numbers)."""
    started = time.monotonic()
    attacks = list(attacks or DEFAULT_ATTACKS)
    if not _is_number(eps) or not 0 < eps <= 1:
        raise ConfigError(f"eps must be a number in (0, 1] (8/255 = {8 / 255:.5f}), got {eps!r}")
    _check_attacks(attacks)
    check_attacks_for_format(model_path, fmt, attacks)  # ONNX: clean only, said before loading data
    if n_examples is not None:
        _check_int("n_examples", n_examples, *LIMITS["n_eval"])
    if not Path(model_path).is_file():  # fail before loading the data
        raise ModelLoadError(f"model file {str(model_path)!r} does not exist or is not a file")
    dev = resolve_device(device)
    data = load_dataset(dataset, data_root, val_size=0, seed=seed,
                        evaluation_only=not job_test_split)
    loaded = load_model_file(model_path, arch=arch, num_classes=data.num_classes, normalize=normalize or None,
                             fmt=fmt, device=dev, input_shape=tuple(int(s) for s in data.test.x.shape[1:]),
                             allow_onnx=True)

    def progress(event: dict[str, Any]) -> None:
        _emit(on_event, {"type": "eval_progress", **{k: v for k, v in event.items() if k != "type"}})

    result = evaluate_model(loaded.model, data.test.x, data.test.y, attacks, eps=float(eps),
                            n_examples=n_examples, batch_size=batch_size, device=dev, should_stop=should_stop,
                            on_progress=progress, seed=seed)
    report = {
        "model": {"path": os.path.basename(str(model_path)), "format": loaded.format, "arch": loaded.arch,
                  "num_classes": loaded.num_classes, "params": loaded.num_params,
                  "normalize": loaded.normalize, "probe": loaded.probe},
        "dataset": {"name": data.name, "num_classes": data.num_classes, "test": int(data.test.y.shape[0]),
                    "note": data.note},
        "eps": float(eps),
        **result,
        "versions": versions(),
        "seconds": round(time.monotonic() - started, 3),
    }
    return finite(report)
