"""What every training method shares: the batch it sees and the min-max skeleton of eq. (1).

eq. (1):  min_S  E_(x,y) [ L_min(S, x, x_adv, y) ],   x_adv = argmax_{||x' - x||_inf <= eps} L_max(S, x', y)

A method supplies only its two losses: ``attack`` (the inner maximisation, always through
``core.attacks.pgd.pgd``) and ``outer`` (the loss the optimiser minimises). ``Method.loss`` runs them in
order, with the student in eval mode for the attack (train mode for ARD/IAD, a reference quirk) and in
train mode for the outer loss. Epochs are 0-based indices, as in the reference loops
(``for epoch in range(epochs)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from core.attacks.pgd import LossFn, pgd
from core.errors import ConfigError
from core.fold import FoldedEval

INITS = ("uniform", "normal", "none")

# Range rules by parameter name, shared by every method so one name always means one thing. Every
# number has an upper bound too, so that a request cannot ask for 10**100 attack steps or epochs.
MAX_EPOCHS = 1000
MAX_STEPS = 1000          # PGD steps of the inner maximisation
MAX_MILESTONES = 100
MAX_WEIGHT = 1000.0       # loss weights and scales (beta, kl_scale, ...) and temperatures
MAX_LR = 10.0
# The optimiser every method trains with, as method parameters so that a reference that differs can be
# reproduced (MART's ResNet-18 script: lr=0.01, weight_decay=3.5e-3). lr None: the job-level lr, else the
# linear rule 0.1 x batch/128 (core.lr_schedule); an lr set here wins over the job-level one.
OPTIMIZER_DEFAULTS: dict[str, Any] = {"lr": None, "momentum": 0.9, "weight_decay": 2e-4}
# A job eps within this relative distance of a method's reference eps keeps the reference step (TRADES
# writes 8/255 as 0.031); further away, the step scales with eps by the reference's step / eps ratio.
STEP_EPS_TOLERANCE = 0.02
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "eps": (0.0, 1.0),
    "step_size": (0.0, 1.0),
    "alpha": (0.0, 1.0),  # ARD/IAD: (1 - alpha) weights the CE term, so alpha > 1 would reward error
    "smoothing": (0.0, 1.0),
    "beta": (0.0, MAX_WEIGHT),
    "adv_weight": (0.0, MAX_WEIGHT),
    "nat_weight": (0.0, MAX_WEIGHT),
    "kl_scale": (0.0, MAX_WEIGHT),
    "temperature": (0.0, MAX_WEIGHT),
    # the optimiser (OPTIMIZER_DEFAULTS): lr in (0, MAX_LR] or None
    "lr": (0.0, MAX_LR),
    "momentum": (0.0, 0.999),
    "weight_decay": (0.0, 0.1),
    # IGDM add-on (core.methods.igdm): its weight, and the scales of x_adv - x in x +- scale * delta
    "igdm_weight": (0.0, MAX_WEIGHT),
    "igdm_beta": (0.0, 10.0),
    "igdm_gamma": (0.0, 10.0),
    # ABSLD's per-class temperatures: their bounds and their per-epoch step
    "temp_min": (0.0, MAX_WEIGHT),
    "temp_max": (0.0, MAX_WEIGHT),
    "temp_rate": (0.0, MAX_WEIGHT),
}
_DEFAULT_FLOAT_RANGE = (-MAX_WEIGHT, MAX_WEIGHT)  # a number without a rule of its own
_POSITIVE = {"temperature", "temp_min", "lr"}
_INT_RANGES = {"steps": (0, MAX_STEPS), "epochs": (1, MAX_EPOCHS), "warmup_epochs": (0, MAX_EPOCHS),
               "igdm_ramp_epochs": (1, MAX_EPOCHS)}


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Logits from an autocast forward (bf16/fp16) cast up to fp32; fp32 and fp64 pass through."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass
class Batch:
    """One training batch, plus the teacher that labels it.

    The teacher's logits on ``x`` are computed on first use and cached, so several students trained on
    the same batch share one teacher forward; do not change ``x`` after creating the batch. ``autocast``
    wraps every student forward and, unless ``teacher_autocast`` is given, the teacher's (the trainer
    passes bf16 autocasts); losses are computed in fp32. ``generator`` (on x's device) drives the
    attacks' random starts, so a seeded run repeats.
    """

    x: torch.Tensor
    y: torch.Tensor
    teacher: nn.Module | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    teacher_autocast: Callable[[], contextlib.AbstractContextManager] | None = None  # None: ``autocast``
    generator: torch.Generator | None = None
    teacher_memory_format: torch.memory_format = torch.contiguous_format
    # Several students on the same images pass one dict to all their Batches: T(x) is computed once.
    shared: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # The student with its BatchNorms folded (core.fold), attacked in its place by eval-mode attacks.
    folded: FoldedEval | None = field(default=None, repr=False)

    def teacher_logits(self) -> torch.Tensor:
        """T(x) in full precision: eval mode, no grad, cached (in ``shared``)."""
        if "teacher_logits" not in self.shared:
            self.shared["teacher_logits"] = self.teacher_logits_on(self.x)
        return self.shared["teacher_logits"]

    def teacher_logits_on(self, x: torch.Tensor) -> torch.Tensor:
        """T(x_other) in fp32, not cached (IAD's reliability on x_adv, RSLAD's adversarial-RSL ablation)."""
        if self.teacher is None:
            raise ConfigError("this method needs a teacher model, but none was given")
        teacher = self.teacher
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad(), (self.teacher_autocast or self.autocast)():
                logits = teacher(x.contiguous(memory_format=self.teacher_memory_format))
        finally:
            teacher.train(was_training)
        return full_precision(logits)

    def teacher_logits_grad(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) in fp32 with the graph through ``x`` kept (AdaAD's inner maximisation differentiates the
        teacher too). Eval mode, the mode put back after; the teacher's weights stay out of the graph,
        so they never get a ``.grad``."""
        if self.teacher is None:
            raise ConfigError("this method needs a teacher model, but none was given")
        teacher = self.teacher
        was_training = teacher.training
        frozen = [p for p in teacher.parameters() if p.requires_grad]
        teacher.eval()
        for p in frozen:
            p.requires_grad_(False)
        try:
            with (self.teacher_autocast or self.autocast)():
                logits = teacher(x.contiguous(memory_format=self.teacher_memory_format))
        finally:
            for p in frozen:
                p.requires_grad_(True)
            teacher.train(was_training)
        return full_precision(logits)


class Method:
    """One training method: defaults, validated overrides, and ``loss`` for a batch.

    Subclasses set ``name``, ``needs_teacher``, ``defaults`` (every hyper-parameter, with the reference
    value), ``choices`` (allowed values of string parameters) and implement ``outer`` and, if they train
    on adversarial examples, ``attack``. Parameters read as attributes: ``method.eps``.
    """

    name: ClassVar[str] = ""
    needs_teacher: bool = False
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    attack_mode: ClassVar[str] = "eval"  # the student's mode during the inner maximisation
    epoch_keys: ClassVar[tuple[str, ...]] = ()  # epoch counts that scale with ``epochs`` like milestones

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method gets the optimiser parameters (``OPTIMIZER_DEFAULTS``) unless it sets its own."""
        super().__init_subclass__(**kwargs)
        missing = {k: v for k, v in OPTIMIZER_DEFAULTS.items() if k not in cls.defaults}
        cls.defaults = {**cls.defaults, **missing}

    def __init__(self, **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ConfigError(f"method {self.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(self.defaults))}")
        params = dict(self.defaults)
        for key, value in overrides.items():
            params[key] = self._check_value(key, value)
        self.overrides = frozenset(overrides)
        self.params = params
        if "eps" in overrides and "step_size" not in overrides and "step_size" in self.defaults:
            params["step_size"] = self.scaled_step(params["eps"])
        if "epochs" in overrides:
            params["milestones"] = self.scaled_milestones(params["epochs"])
            for key in self.epoch_keys:
                if key not in overrides:
                    params[key] = _scale_epoch(self.defaults[key], self.defaults["epochs"], params["epochs"])
        self._check_params(params)

    def __getattr__(self, key: str) -> Any:
        params = self.__dict__.get("params")
        if params is not None and key in params:
            return params[key]
        raise AttributeError(f"{type(self).__name__!s} has no attribute or parameter {key!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    # ----- the training step -------------------------------------------------------------------------

    def loss(self, student: nn.Module, batch: Batch, *, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The outer loss on this batch (to call ``backward`` on) and its terms as floats, for logging."""
        if self.needs_teacher and batch.teacher is None:
            raise ConfigError(f"method {self.name!r} needs a teacher model, but none was given")
        student.train(self.attack_mode == "train")
        try:
            use_folded = self.attack_mode == "eval" and batch.folded is not None
            attacked = batch.folded.refreshed() if use_folded else student
            x_adv = self.attack(attacked, batch, epoch=epoch)
        finally:
            student.train()
        loss, terms = self.outer(student, batch, x_adv, epoch=epoch)
        logs = {"loss": float(loss.detach())}
        logs.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
        return loss, logs

    # ----- state across epochs (ABSLD's per-class temperatures); no-ops for stateless methods -----------

    def end_epoch(self, epoch: int) -> None:
        """Called by the trainer after the training pass of ``epoch`` (0-based), before the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        """What ``end_epoch`` changed, as plain lists and numbers: saved in the checkpoint and the history."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` on resume (and drop anything accumulated since)."""

    def attack(self, student: nn.Module, batch: Batch, *, epoch: int) -> torch.Tensor | None:
        """The inner maximisation; None for methods that train on clean inputs only."""
        return None

    def outer(self, student: nn.Module, batch: Batch, x_adv: torch.Tensor | None, *,
              epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ----- helpers for subclasses -------------------------------------------------------------------

    def ascend(self, student: nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """PGD with this method's eps / step_size / steps / init; no weight gradient is touched."""
        with batch.autocast():
            return pgd(student, batch.x, loss_fn, eps=self.params["eps"], step_size=self.params["step_size"],
                       steps=self.params["steps"], init=self.params["init"], generator=batch.generator)

    @staticmethod
    def logits(model: nn.Module, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """A forward under the batch's autocast, returned in fp32 (or fp64) so losses never run in bf16."""
        with batch.autocast():
            out = model(x)
        return full_precision(out)

    def reduce_kl(self, elements: torch.Tensor) -> torch.Tensor:
        """Sum a (B, C) tensor of per-class KL terms as ``kl_reduction`` says: 'reference' averages over all
        B x C elements (``nn.KLDivLoss()``'s mean in the reference codes, = batch-mean KL / C); 'batchmean'
        divides by B only."""
        if self.params["kl_reduction"] == "reference":
            return elements.sum() / elements.numel()
        return elements.sum() / elements.shape[0]

    @staticmethod
    def ce_sum(y: torch.Tensor) -> LossFn:
        """Summed cross-entropy for the attacks: the sum (not mean) keeps tiny per-sample gradients from
        underflowing in bf16; PGD uses only the gradient's sign, so the scale changes nothing else."""
        return lambda logits, _x: F.cross_entropy(full_precision(logits), y, reduction="sum")

    def scaled_step(self, eps: float) -> float:
        """The inner attack's step for budget ``eps``: the reference step scaled by eps / reference eps
        (SAT/ARD/IAD/RSLAD 2/255 per 8/255, TRADES 0.007 per 0.031, MART 0.007 per 8/255); within
        ``STEP_EPS_TOLERANCE`` of the reference eps, the reference step itself (bit-identical at 8/255)."""
        ref_eps, ref_step = float(self.defaults["eps"]), float(self.defaults["step_size"])
        if abs(eps / ref_eps - 1.0) <= STEP_EPS_TOLERANCE:
            return ref_step
        return ref_step * (eps / ref_eps)

    # ----- epochs and learning-rate milestones ------------------------------------------------------

    def scaled_milestones(self, epochs: int) -> tuple[int, ...]:
        """Learning-rate milestones for a run of ``epochs`` epochs.

        Milestones set explicitly are returned as given (they must lie before ``epochs``). The default
        milestones scale with epochs / default epochs, rounded half up, kept strictly increasing inside
        [1, epochs); ones that no longer fit are dropped (e.g. RSLAD 300 -> 30 epochs: (22, 26, 29)).
        """
        epochs = _as_int(self.name, "epochs", epochs, 1)
        if "milestones" in self.overrides:
            milestones = self.params["milestones"]
            if milestones and milestones[-1] >= epochs:
                raise ConfigError(f"method {self.name!r}: milestones {list(milestones)} must all be "
                                  f"below epochs={epochs}")
            return milestones
        out: list[int] = []
        for m in self.defaults["milestones"]:
            s = max(_scale_epoch(m, self.defaults["epochs"], epochs), 1, out[-1] + 1 if out else 1)
            if s < epochs:
                out.append(s)
        return tuple(out)

    # ----- description and validation ---------------------------------------------------------------

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, whether a teacher is needed, the reference defaults and allowed choices (CLI, API, docs)."""
        doc = (cls.__doc__ or "").strip().splitlines()
        return {
            "name": cls.name,
            "needs_teacher": cls.needs_teacher,
            "summary": doc[0] if doc else "",
            "defaults": {k: list(v) if isinstance(v, tuple) else v for k, v in cls.defaults.items()},
            "choices": {k: list(v) for k, v in cls.choices.items()},
        }

    def _check_params(self, params: dict[str, Any]) -> None:
        """Checks across parameters; subclasses extend."""
        if "milestones" in params and "epochs" in params:
            ms = params["milestones"]
            if ms and ms[-1] >= params["epochs"]:
                raise ConfigError(f"method {self.name!r}: milestones {list(ms)} must all be below "
                                  f"epochs={params['epochs']}")

    def _check_value(self, key: str, value: Any) -> Any:
        name = self.name
        if value is None and self.defaults.get(key, 0) is None and key not in self.choices:
            return None  # an optional number (lr): None means "not set here"
        if key in self.choices:
            allowed = self.choices[key]
            if value not in allowed:
                raise ConfigError(f"method {name!r}: {key} must be one of {list(allowed)}, got {value!r}")
            return value
        if key == "milestones":
            return _as_milestones(name, value)
        if key in _INT_RANGES:
            return _as_int(name, key, value, *_INT_RANGES[key])
        number = _as_float(name, key, value)
        if key in _POSITIVE and number <= 0:
            raise ConfigError(f"method {name!r}: {key} must be > 0, got {value!r}")
        low, high = _FLOAT_RANGES.get(key, _DEFAULT_FLOAT_RANGE)
        if not low <= number <= high:
            raise ConfigError(f"method {name!r}: {key} must lie in [{low}, {high}], got {value!r}")
        return number


def _scale_epoch(value: int, base_epochs: int, epochs: int) -> int:
    return int(math.floor(value * epochs / base_epochs + 0.5))


def _as_float(method: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"method {method!r}: {key} must be a finite number, got {value!r}")
    return float(value)


def _as_int(method: str, key: str, value: Any, minimum: int, maximum: int = MAX_EPOCHS) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"method {method!r}: {key} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ConfigError(f"method {method!r}: {key} must be an integer in [{minimum}, {maximum}], "
                          f"got {value!r}")
    return value


def _as_milestones(method: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"method {method!r}: milestones must be a list of epochs, got {value!r}")
    if len(value) > MAX_MILESTONES:
        raise ConfigError(f"method {method!r}: at most {MAX_MILESTONES} milestones, got {len(value)}")
    ms = tuple(_as_int(method, "milestones", m, 1, MAX_EPOCHS) for m in value)
    if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ConfigError(f"method {method!r}: milestones must be strictly increasing, got {list(value)}")
    return ms
