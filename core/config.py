"""Every setting of a distillation job (``DistillConfig``), with the range each one may take.

Each number has a lower and an upper bound (``LIMITS``), checked before any work is done, so that a
request cannot ask for 10**100 epochs; the service turns the ``ConfigError`` into a 422.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from core.attacks import ATTACKS
from core.errors import ConfigError
from core.methods import METHODS, Method, create_method
from core.methods.base import MAX_EPOCHS, MAX_LR
from core.models import list_models
from core.recipes import Budget, budget_for, check_recipe, recipe_overrides
from core.teachers import FORMATS, parse_normalize
from core.train_config import check_teacher_precision

DEFAULT_EPS = 8 / 255
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "aa")
# 'transfer' needs a surrogate model, which a distillation job does not have.
DISTILL_ATTACKS = tuple(name for name in ATTACKS if name != "transfer")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

MAX_STUDENTS = 16
MAX_SEED = 2**31 - 1
# Integer settings: (lowest, highest). Those in OPTIONAL may also be None.
LIMITS: dict[str, tuple[int, int]] = {
    "epochs": (1, MAX_EPOCHS),
    "batch_size": (1, 4096),
    "train_subset": (1, 10_000_000),
    "val_size": (0, 1_000_000),
    "seed": (0, MAX_SEED),
    "n_eval": (1, 1_000_000),
    "eval_batch_size": (1, 4096),
    "warmup_epochs": (0, MAX_EPOCHS),
    "collapse_patience": (0, MAX_EPOCHS),
}
OPTIONAL = {"epochs", "train_subset", "n_eval", "warmup_epochs"}


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
    # The teacher's forward: auto = bf16 where bf16 is native and amp is on, else fp32 (so amp=False is
    # the reference's arithmetic for the teacher too); fp32 or bf16 force it.
    teacher_precision: str = "auto"
    channels_last: bool | None = None
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    n_eval: int | None = None
    eval_batch_size: int = 256
    evaluate_teacher: bool = False
    # Learning rate: None follows the batch size, 0.1 x batch_size / 128 (the linear rule, Goyal et al.
    # 2017; the methods' reference lr 0.1 is for batch 128). Set it to use exactly that value. A method's
    # own lr parameter (method_params lr) wins over this one.
    lr: float | None = None
    # Which settings the method trains with for this budget (core/recipes.py): 'reference' = the
    # method's published code; 'auto' = the same, adjusted where a short run needs it. Explicit settings win.
    recipe: str = "auto"
    # Linear warm-up of the lr over this many epochs (per step). None: off, except when the linear rule
    # raises the lr above the reference (batch > 128): then min(5, epochs // 10) epochs.
    warmup_epochs: int | None = None
    # Guardrails (core/guardrails.py): epochs at chance before the collapse warning (0: no warning);
    # keep a degenerate student (or a teacher at chance) instead of failing, flagged in the report.
    collapse_patience: int = 3
    allow_degenerate: bool = False
    teacher_claimed_accuracy: float | None = None  # in (0, 1]; measured well below it: a warning
    # How the report names the teacher (the service sets them; the report never names a server path).
    teacher_id: str | None = None
    teacher_sha256: str | None = None
    job_id: str | None = None  # the service's job id, written into the exported students' metadata
    # Formats the best and last students are exported to (core/export.FORMATS); [] exports none.
    exports: list[str] = field(default_factory=lambda: list(_export_formats()))
    # Several students in one pass (core/multi.py): each {"student", "method", "method_params"?, "name"?,
    # "recipe"?};
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
        """method_params plus what the job-level settings and the recipe imply for the method (explicit
        method_params win over both)."""
        params = dict(self.method_params)
        cls = METHODS[self.method]
        defaults = cls.defaults
        if self.epochs is not None:
            params["epochs"] = self.epochs
        if self.eps is not None and "eps" in defaults:
            params["eps"] = float(self.eps)
        explicit = set(self.method_params) | ({"lr"} if self.lr is not None else set())  # the user's win
        for key, (value, _why) in recipe_overrides(check_recipe(self.recipe), cls, self.budget(),
                                                   explicit).items():
            params[key] = value
        if (num_classes == 100 and "kl_scale" in defaults
                and params.get("kl_reduction", defaults.get("kl_reduction")) == "reference"):
            params.setdefault("kl_scale", 10.0)  # the reference scales its B x C mean KL by 10 on CIFAR-100
        return params

    def budget(self) -> Budget:
        """This job's budget for its method: epochs (None: the method's), batch size and eps."""
        return budget_for(METHODS[self.method], self.epochs, self.batch_size, self.eps)

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
            extra = sorted(set(spec) - {"student", "method", "method_params", "name", "recipe"})
            if extra:
                raise ConfigError(f"students[{i}]: unknown key(s) {', '.join(extra)}; "
                                  "allowed: student, method, method_params, name, recipe")
            recipe = spec.get("recipe") or self.recipe
            try:
                check_recipe(recipe)
            except ConfigError as exc:
                raise ConfigError(f"students[{i}]: {exc}") from None
            name = str(spec.get("name") or f"{spec['student']}-{spec['method']}")
            if not _NAME.fullmatch(name):
                raise ConfigError(f"students[{i}]: name {name!r} must be letters, digits, '_', '-' or '.' "
                                  "(at most 64), starting with a letter or digit")
            if name in out:
                raise ConfigError(f"two students are named {name!r}: give them distinct 'name's")
            out[name] = replace(self, student=spec["student"], method=spec["method"], recipe=recipe,
                                method_params=dict(spec.get("method_params") or {}), students=None)
        return out

    def validate(self) -> Method:
        """Raise ConfigError for anything that would fail later; return the method it describes (the
        first student's, for several)."""
        check_recipe(self.recipe)
        check_teacher_precision(self.teacher_precision)
        if self.students is not None:
            if not self.students:
                raise ConfigError("students is empty: list at least one {student, method}")
            if isinstance(self.students, list) and len(self.students) > MAX_STUDENTS:
                raise ConfigError(f"at most {MAX_STUDENTS} students in one job, got {len(self.students)}")
            methods = [sub.validate() for sub in self.student_configs().values()]
            return methods[0]
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                _check_int(name, value, low, high)
        if self.lr is not None and (not _is_number(self.lr) or not 0 < self.lr <= MAX_LR):
            raise ConfigError(f"lr must be a number in (0, {MAX_LR:g}], got {self.lr!r}")
        if self.teacher_claimed_accuracy is not None and (
                not _is_number(self.teacher_claimed_accuracy) or not 0 < self.teacher_claimed_accuracy <= 1):
            raise ConfigError("teacher_claimed_accuracy must be a fraction in (0, 1] (0.67 for 67%), got "
                              f"{self.teacher_claimed_accuracy!r}")
        if not isinstance(self.allow_degenerate, bool):
            raise ConfigError(f"allow_degenerate must be true or false, got {self.allow_degenerate!r}")
        _check_exports(self.exports)
        for name in ("teacher_id", "teacher_sha256", "job_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _NAME.fullmatch(value)):
                raise ConfigError(f"{name} must be a short name of letters and digits, got {value!r}")
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


def _export_formats() -> tuple[str, ...]:
    from core.export import FORMATS as EXPORT_FORMATS  # lazy: the exporters import onnx and safetensors

    return EXPORT_FORMATS


def _check_exports(exports: Any) -> None:
    known = _export_formats()
    if isinstance(exports, str) or not isinstance(exports, list):
        raise ConfigError(f"exports must be a list from: {', '.join(known)} ([] exports none)")
    bad = [f for f in exports if f not in known]
    if bad:
        raise ConfigError(f"unknown export format(s) {', '.join(map(repr, bad))}; known: {', '.join(known)}")
    if len(set(exports)) != len(exports):
        raise ConfigError(f"export formats listed twice in {', '.join(exports)}")


def _check_int(name: str, value: Any, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
