"""One distillation job end to end: data, teacher, student, training, test-set evaluation, report.

The CLI and the service's worker both call ``run_distillation``; everything a job needs is in one
JSON-serialisable ``DistillConfig``, and everything it learnt is in the returned (and written) report.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import core
from core.attacks import ATTACKS
from core.data import DatasetBundle, load_dataset
from core.device import resolve_device
from core.errors import ConfigError, ModelLoadError
from core.evaluate import evaluate_model
from core.methods import METHODS, Method, create_method
from core.models import create_model, list_models
from core.teachers import FORMATS, load_model_file, parse_normalize
from core.train import EventFn, StopFn, TrainConfig, Trainer

DEFAULT_EPS = 8 / 255
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "aa")
# 'transfer' needs a surrogate model, which a distillation job does not have.
DISTILL_ATTACKS = tuple(name for name in ATTACKS if name != "transfer")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass
class DistillConfig:
    """Every setting of a job. None means the method's reference value (epochs) or 8/255 (eps).

    eps: when given, both the training attack and the evaluation use it; when None, the method keeps
    its reference eps (TRADES: 0.031) and the evaluation uses 8/255, as in the paper.
    """

    teacher_path: str | None = None
    teacher_arch: str | None = None
    teacher_format: str = "auto"
    teacher_normalize: str | None = None   # "m1,m2,m3;s1,s2,s3", "cifar10", "cifar100" or None
    student: str = "resnet18"
    method: str = "rslad"
    method_params: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10"
    data_root: str = "data"
    epochs: int | None = None
    batch_size: int = 128
    eps: float | None = None
    train_subset: int | None = None
    val_size: int = 1000
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool | None = None
    channels_last: bool | None = None
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    n_eval: int | None = None
    eval_batch_size: int = 256
    evaluate_teacher: bool = False
    # Several students in one pass (core/multi.py): each {"student", "method", "method_params"?, "name"?};
    # when given, it replaces student / method / method_params above. Every other setting is shared.
    students: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @property
    def eval_eps(self) -> float:
        return DEFAULT_EPS if self.eps is None else float(self.eps)

    def method_overrides(self, num_classes: int | None = None) -> dict[str, Any]:
        """method_params plus what the job-level settings imply for the method."""
        params = dict(self.method_params)
        defaults = METHODS[self.method].defaults
        if self.epochs is not None:
            params["epochs"] = self.epochs
        if self.eps is not None and "eps" in defaults:
            params["eps"] = float(self.eps)
        if self.method == "rslad" and num_classes == 100:
            params.setdefault("kl_scale", 10.0)  # the reference scales each KL by 10 on CIFAR-100
        return params

    def build_method(self, num_classes: int | None = None) -> Method:
        return create_method(self.method, **self.method_overrides(num_classes))

    def student_configs(self) -> dict[str, DistillConfig]:
        """name -> the single-student config of each student (one entry, named 'student', without
        ``students``). Names default to 'ARCH-METHOD' and become folder and artifact names."""
        if not self.students:
            return {"student": self}
        if not isinstance(self.students, list):
            raise ConfigError("students must be a list of {student, method, method_params, name}")
        out: dict[str, DistillConfig] = {}
        for i, spec in enumerate(self.students):
            if not isinstance(spec, dict) or not spec.get("student") or not spec.get("method"):
                raise ConfigError(f"students[{i}] must be an object with 'student' and 'method', "
                                  f"got {spec!r}")
            extra = sorted(set(spec) - {"student", "method", "method_params", "name"})
            if extra:
                raise ConfigError(f"students[{i}]: unknown key(s) {', '.join(extra)}; "
                                  "allowed: student, method, method_params, name")
            name = str(spec.get("name") or f"{spec['student']}-{spec['method']}")
            if not _NAME.fullmatch(name):
                raise ConfigError(f"students[{i}]: name {name!r} must be letters, digits, '_', '-' or '.' "
                                  "(at most 64), starting with a letter or digit")
            if name in out:
                raise ConfigError(f"two students are named {name!r}: give them distinct 'name's")
            out[name] = replace(self, student=spec["student"], method=spec["method"],
                                method_params=dict(spec.get("method_params") or {}), students=None)
        return out

    def validate(self) -> Method:
        """Raise ConfigError for anything that would fail later; return the method it describes (the
        first student's, for several)."""
        if self.students is not None:
            if not self.students:
                raise ConfigError("students is empty: list at least one {student, method}")
            methods = [sub.validate() for sub in self.student_configs().values()]
            return methods[0]
        _check_int("batch_size", self.batch_size, 1)
        _check_int("val_size", self.val_size, 0)
        _check_int("seed", self.seed, 0)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        for name in ("epochs", "train_subset", "n_eval"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.eps is not None:
            if not _is_number(self.eps) or not 0 < self.eps <= 1:
                raise ConfigError(f"eps must be a number in (0, 1] (images are in [0, 1]; 8/255 = "
                                  f"{8 / 255:.5f}), got {self.eps!r}")
        if self.student not in list_models():
            raise ConfigError(f"unknown student {self.student!r}; known: {', '.join(list_models())}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if not isinstance(self.method_params, dict):
            raise ConfigError(f"method_params must be a dict, got {type(self.method_params).__name__}")
        method = self.build_method()
        if method.needs_teacher and not self.teacher_path:
            raise ConfigError(f"method {self.method!r} distils from a teacher: give the teacher model file "
                              "(--teacher PATH)")
        if self.evaluate_teacher and not self.teacher_path:
            raise ConfigError("evaluate_teacher needs a teacher model file (--teacher PATH)")
        if self.teacher_format not in ("auto", *FORMATS):
            raise ConfigError(f"unknown teacher format {self.teacher_format!r}; use auto or one of "
                              f"{', '.join(FORMATS)}")
        if self.teacher_normalize not in (None, "", "none"):
            parse_normalize(self.teacher_normalize)
        _check_attacks(self.attacks)
        if not self.data_root:
            raise ConfigError("data_root is empty: give the folder that holds the dataset (--data-root)")
        if self.device != "auto" and self.device != "cpu" and not str(self.device).startswith("cuda"):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu or cuda")
        return method


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_attacks(attacks: list[str]) -> None:
    if isinstance(attacks, str) or not attacks:
        raise ConfigError(f"attacks must be a non-empty list from: {', '.join(DISTILL_ATTACKS)}")
    bad = [a for a in attacks if a not in DISTILL_ATTACKS]
    if bad:
        raise ConfigError(f"unknown attack(s) {', '.join(map(repr, bad))}; "
                          f"known: {', '.join(DISTILL_ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ConfigError(f"attacks listed twice in {', '.join(attacks)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: replace them by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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
    _emit(on_event, {"type": "status", "status": "evaluating"})
    report = job.report(cfg, fit, out, started)
    _write_json(report, out / "report.json")
    return report


def run_multi_distillation(cfg: DistillConfig, out_dir: str | os.PathLike, *, on_event: EventFn | None = None,
                           should_stop: StopFn | None = None) -> dict[str, Any]:
    """Several students from one teacher in one pass over the data (``cfg.students``).

    Each student gets ``out_dir/NAME/`` with the files and ``report.json`` a single run writes; the
    returned (and written) ``out_dir/report.json`` holds every student's report under ``students``.
    Per-student events carry ``student: NAME``; progress events are the pass's.
    """
    from core.multi import MultiTrainer

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
    _emit(on_event, {"type": "status", "status": "evaluating"})
    reports: dict[str, Any] = {}
    for name, sub in subs.items():
        reports[name] = job.report(sub, fits[name], out / name, started)
        _write_json(reports[name], out / name / "report.json")
    report = _finite({
        "config": cfg.to_dict(),
        "dataset": dataset_info(job.data),
        "teacher": job.teacher_info,
        "students": reports,
        "shared_pass": {"students": list(subs), "teacher_forwards_per_batch": 1},
        "warnings": list(job.warnings),
        "versions": versions(),
        "seconds": round(time.monotonic() - started, 3),
    })
    _write_json(report, out / "report.json")
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
        if cfg.teacher_path and (needs_teacher or cfg.evaluate_teacher):
            loaded = load_model_file(cfg.teacher_path, arch=cfg.teacher_arch,
                                     num_classes=self.data.num_classes,
                                     normalize=cfg.teacher_normalize or None, fmt=cfg.teacher_format,
                                     device=self.device, input_shape=image_shape)
            self.teacher = loaded.model
            self.teacher_info = {"path": os.path.basename(cfg.teacher_path), "format": loaded.format,
                                 "arch": loaded.arch, "num_classes": loaded.num_classes,
                                 "params": loaded.num_params, "normalize": loaded.normalize,
                                 "probe": loaded.probe}
            if cfg.evaluate_teacher:
                self.teacher_info["evaluation"] = _evaluate(self.teacher, self.data, cfg, self.device,
                                                            should_stop)
        elif cfg.teacher_path:
            self.warn(f"method {cfg.method!r} does not use a teacher; the teacher file is ignored")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        _emit(self.on_event, {"type": "warning", "message": message})

    def trainer(self, cfg: DistillConfig, out: Path, on_event: EventFn | None) -> Trainer:
        method = cfg.build_method(self.data.num_classes)
        torch.manual_seed(cfg.seed)  # the student's initial weights are a function of the seed
        student = create_model(cfg.student, self.data.num_classes)
        train_cfg = TrainConfig(epochs=method.epochs, milestones=tuple(method.milestones),
                                batch_size=cfg.batch_size, seed=cfg.seed, deterministic=cfg.deterministic,
                                amp=cfg.amp, channels_last=cfg.channels_last, val_eps=cfg.eval_eps,
                                device=str(self.device), val_batch_size=cfg.eval_batch_size)
        return Trainer(train_cfg, method, student, self.teacher if method.needs_teacher else None, self.data,
                       out, on_event=on_event, should_stop=self.should_stop)

    def report(self, cfg: DistillConfig, fit: dict[str, Any], out: Path, started: float) -> dict[str, Any]:
        """Evaluate the best and the last checkpoint on the test split; the run's report."""
        final: dict[str, Any] = {}
        warnings = list(self.warnings)
        last_epoch = fit["history"][-1]["epoch"] if fit["history"] else None
        for which, epoch in (("last", last_epoch), ("best", fit["best"]["epoch"])):
            if which == "best" and epoch == last_epoch:
                final["best"] = {**final["last"], "same_as_last": True}
                continue
            model = create_model(cfg.student, self.data.num_classes)
            state = torch.load(out / f"student_{which}.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            final[which] = {"epoch": epoch, **_evaluate(model, self.data, cfg, self.device, self.should_stop)}
        final = {"best": final["best"], "last": final["last"]}
        for which in ("best", "last"):
            for message in final[which]["warnings"]:
                warnings.append(f"{which} checkpoint: {message}")
                _emit(self.on_event, {"type": "warning", "message": warnings[-1]})
        return _finite({
            "config": cfg.to_dict(),
            "train_config": fit["config"],
            "dataset": dataset_info(self.data),
            "teacher": self.teacher_info,
            "history": fit["history"],
            "best_selected_on": fit["best"]["metric"],
            "resumed_from_epoch": fit["resumed_from"],
            "final": final,
            "warnings": warnings,
            "versions": versions(),
            "seconds": round(time.monotonic() - started, 3),
        })


def _evaluate(model: nn.Module, data: DatasetBundle, cfg: DistillConfig, device: torch.device,
              should_stop: StopFn | None) -> dict[str, Any]:
    """The paper's white-box suite on the test split, fp32, the job's eps and seed."""
    return evaluate_model(model, data.test.x, data.test.y, list(cfg.attacks), eps=cfg.eval_eps,
                          n_examples=cfg.n_eval, batch_size=cfg.eval_batch_size, device=device,
                          should_stop=should_stop, seed=cfg.seed)


def run_evaluation(model_path: str | os.PathLike, *, arch: str | None = None, normalize: str | None = None,
                   dataset: str = "cifar10", data_root: str = "data", attacks: list[str] | None = None,
                   n_examples: int | None = None, eps: float = DEFAULT_EPS, device: str = "auto",
                   fmt: str = "auto", batch_size: int = 256, seed: int = 0,
                   should_stop: StopFn | None = None, on_event: EventFn | None = None) -> dict[str, Any]:
    """One model file on a dataset's test split under an attack suite (``python -m core evaluate``)."""
    started = time.monotonic()
    attacks = list(attacks or DEFAULT_ATTACKS)
    if not _is_number(eps) or not 0 < eps <= 1:
        raise ConfigError(f"eps must be a number in (0, 1] (8/255 = {8 / 255:.5f}), got {eps!r}")
    _check_attacks(attacks)
    if n_examples is not None:
        _check_int("n_examples", n_examples, 1)
    if not Path(model_path).is_file():  # fail before loading the data
        raise ModelLoadError(f"model file {str(model_path)!r} does not exist or is not a file")
    dev = resolve_device(device)
    data = load_dataset(dataset, data_root, val_size=0, seed=seed)
    loaded = load_model_file(model_path, arch=arch, num_classes=data.num_classes, normalize=normalize or None,
                             fmt=fmt, device=dev, input_shape=tuple(int(s) for s in data.test.x.shape[1:]))

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
    return _finite(report)
