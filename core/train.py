"""The training loop: SGD on a method's loss, per-epoch validation, atomic checkpoints, exact resume.

One epoch is a pure function of (weights, optimiser state, seed, epoch): the data order, the
augmentation and the attacks' random starts draw from generators seeded with (seed, epoch), so a run
stopped after any epoch and resumed from ``checkpoint.pt`` reproduces the uninterrupted run bit for bit
(on the CPU, with ``deterministic=True``).

Epochs are 0-based inside (``method.loss(..., epoch=e)``, as the reference loops count) and 1-based in
everything a person reads: events, history, ``checkpoint.pt['epoch']`` (= epochs completed).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.attacks import create_attack
from core.data import DatasetBundle, Split, iterate_batches
from core.device import autocast, depthwise_in_fp32, memory_format, resolve_device
from core.errors import Cancelled, ConfigError
from core.fold import FoldedEval
from core.guardrails import CollapseDetector
from core.lr_schedule import decay_milestones, resolve_lr, resolve_warmup, warmup_factor
from core.methods import Batch, Method
from core.run_state import (  # noqa: F401  (plain_state_dict is imported from here too)
    Determinism,
    _atomic_save,
    _mix,
    _rng_state,
    _set_rng_state,
    plain_state_dict,
)
from core.train_config import (  # noqa: F401  (imported from core.train by the pipeline and multi)
    TEACHER_PRECISIONS,
    TrainConfig,
    resolve_optimizer,
    resolve_teacher_bf16,
)

EventFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]

# Settings that change the trained weights: a checkpoint made with other values is another run.
_RUN_KEYS = ("epochs", "milestones", "batch_size", "lr", "warmup_epochs", "momentum", "weight_decay", "seed")
# Defaults of run keys that older checkpoints did not record.
_RUN_KEY_DEFAULTS = {"warmup_epochs": 0}
# Method parameters that older checkpoints did not record, with the value those runs used: the optimiser
# came from the run keys above, ARD/IAD divided the lr at every milestone, ARD averaged its KL over B x C.
_LEGACY_METHOD_PARAMS = {"lr": None, "momentum": 0.9, "weight_decay": 2e-4, "lr_schedule": "step",
                         "kl_reduction": "reference", "igdm_weight": 0.0}
# Runs from before the IGDM add-on had it off (weight 0), so its other parameters match any value.
_LEGACY_IGDM_FREE = ("igdm_ramp_epochs", "igdm_beta", "igdm_gamma")

def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs on native kernels here (emulated bf16 would be slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False



def _size(split: Split) -> int:
    return int(split.y.shape[0])


class ProgressMeter:
    """Progress events for a run of ``epochs`` starting at ``start_epoch``: always on an epoch's first and
    last step, else at most once a second; the ETA extrapolates the rate of this process's steps."""

    def __init__(self, epochs: int, start_epoch: int, emit: EventFn, **extra: Any) -> None:
        self.epochs, self.emit, self.extra = epochs, emit, extra
        self.t_start, self.frac_start, self.last = time.monotonic(), start_epoch / epochs, 0.0

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        now = time.monotonic()
        if 1 < step < steps and now - self.last < 1.0:
            return
        self.last = now
        fraction = (epoch + step / steps) / self.epochs
        done = fraction - self.frac_start
        eta = (now - self.t_start) / done * (1.0 - fraction) if done > 0 else None
        self.emit({"type": "progress", "epoch": epoch + 1, "epochs": self.epochs, "step": step,
                   "steps": steps, "fraction": fraction, "eta_s": eta, **self.extra})


class Trainer:
    """Trains ``student`` with ``method`` on ``data.train``, validates on ``data.val``, writes ``out_dir``.

    Files: ``checkpoint.pt`` (everything needed to resume), ``student_best.pt`` (highest validation
    PGD accuracy; clean accuracy for 'natural'), ``student_last.pt``; the last two are plain state dicts.
    """

    def __init__(self, config: TrainConfig, method: Method, student: nn.Module, teacher: nn.Module | None,
                 data: DatasetBundle, out_dir: str | os.PathLike, *, on_event: EventFn | None = None,
                 should_stop: StopFn | None = None) -> None:
        self.config, self.method, self.data = config, method, data
        self.out_dir = Path(out_dir)
        self.on_event = on_event or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)

        self.epochs = int(config.epochs if config.epochs is not None else method.epochs)
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if config.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
        milestones = method.scaled_milestones(self.epochs) if config.milestones is None else config.milestones
        self.milestones = tuple(int(m) for m in milestones)
        self.val_eps = float(getattr(method, "eps", 8 / 255) if config.val_eps is None else config.val_eps)
        self.select_on = "val_clean_acc" if method.name == "natural" else "val_robust_acc"

        self.device = resolve_device(config.device)
        native = bf16_supported(self.device)
        self.amp = native if config.amp is None else bool(config.amp)
        self.teacher_amp = resolve_teacher_bf16(config.teacher_precision, config.teacher_amp, self.amp,
                                                native)
        self.channels_last = self.amp if config.channels_last is None else bool(config.channels_last)
        self.memory_format = memory_format(self.channels_last)
        cpu = self.device.type == "cpu"
        depthwise = cpu if config.depthwise_fp32 is None else bool(config.depthwise_fp32)

        self.train_split, self.val_split = data.train.to(self.device), data.val.to(self.device)
        self.student = student.to(self.device, memory_format=self.memory_format)
        self._depthwise_hooks = depthwise_in_fp32(self.student, self.device) if self.amp and depthwise else []
        self.depthwise_fp32 = bool(self._depthwise_hooks)  # what this run does: False without such layers
        fold = self.amp if config.fold_bn is None else bool(config.fold_bn)
        self.folded = FoldedEval.build(self.student) if fold and method.attack_mode == "eval" else None
        self.fold_bn = self.folded is not None
        self.teacher_memory_format = memory_format(self.teacher_amp)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            self.teacher.to(memory_format=self.teacher_memory_format)
        explicit_lr, lr_source, self.momentum, self.weight_decay = resolve_optimizer(config, method)
        self.lr, self.lr_rule = resolve_lr(explicit_lr, config.batch_size)
        if lr_source:
            self.lr_rule = lr_source
        self.warmup_epochs = resolve_warmup(config.warmup_epochs, explicit_lr, config.batch_size, self.epochs)
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup_epochs < 0:
            raise ConfigError(f"lr must be > 0 and warmup_epochs >= 0, got {self.lr!r}, "
                              f"{self.warmup_epochs!r}")
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay)
        self.lr_schedule = str(method.params.get("lr_schedule", "step"))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, decay_milestones(self.milestones, self.lr_schedule), 0.1)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "metric": self.select_on, "value": -math.inf}
        self.start_epoch = 0
        self._progress = ProgressMeter(self.epochs, 0, self.on_event)  # start() resets it on resume
        self.warnings: list[str] = []
        train_n = min(_size(self.train_split), config.train_eval_size)
        self.collapse = CollapseDetector(data.num_classes, train_n, _size(self.val_split),
                                         config.collapse_patience,
                                         lr_note=f"lr {self.lr:.3g}, {self.lr_rule}")

    # ----- the public loop -----------------------------------------------------------------------------

    def resolved(self) -> dict[str, Any]:
        """The config with every auto value filled in: what this run actually does (stored and reported)."""
        cfg = asdict(self.config)
        cfg.update(lr=self.lr, lr_rule=self.lr_rule, warmup_epochs=self.warmup_epochs, momentum=self.momentum,
                   weight_decay=self.weight_decay, lr_schedule=self.lr_schedule,
                   teacher_precision="bf16" if self.teacher_amp else "fp32")
        cfg.update(epochs=self.epochs, milestones=list(self.milestones), val_eps=self.val_eps, amp=self.amp,
                   teacher_amp=self.teacher_amp, channels_last=self.channels_last, device=str(self.device),
                   depthwise_fp32=self.depthwise_fp32, fold_bn=self.fold_bn,
                   select_on=self.select_on,
                   method=self.method.name,
                   method_params={k: list(v) if isinstance(v, tuple) else v
                                  for k, v in self.method.params.items()})
        return cfg

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; return {"history", "best", "config", "resumed_from"}."""
        with Determinism(self.config.deterministic, self.device):
            self.start()
            for epoch in range(self.start_epoch, self.epochs):
                self._run_epoch(epoch)
        return self.result()

    def start(self) -> None:
        """Resume from ``checkpoint.pt`` when the out dir has one, else seed the global RNGs."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self._resume():
            self.start_epoch = 0
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
            np.random.seed(self.config.seed % 2**32)
        self._progress = ProgressMeter(self.epochs, self.start_epoch, self.on_event)

    def result(self) -> dict[str, Any]:
        return {"history": self.history, "best": dict(self.best), "config": self.resolved(),
                "resumed_from": self.start_epoch, "warnings": list(self.warnings)}

    # ----- one epoch -----------------------------------------------------------------------------------

    def _run_epoch(self, epoch: int) -> None:
        t0, lr = time.monotonic(), self.optimizer.param_groups[0]["lr"]
        train = self._train_epoch(epoch)
        self.finish_epoch(epoch, lr, train, time.monotonic() - t0, t0)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training split; returns the means of the method's logged terms."""
        steps = self.steps_per_epoch()
        self.begin_epoch(epoch)
        for step, (x, y) in enumerate(self.epoch_batches(epoch), start=1):
            self._check_stop(epoch, step)
            self.train_step(self.make_batch(x, y), epoch, step)
            self._progress(epoch, step, steps)
        return self.end_epoch()

    # The pieces of an epoch, public so that core.multi can drive several trainers over one data pass.

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(_size(self.train_split) / self.config.batch_size))

    def epoch_batches(self, epoch: int):
        """The epoch's shuffled, augmented batches: a pure function of (seed, epoch)."""
        data_gen = torch.Generator(device=self.device).manual_seed(_mix(self.config.seed, epoch, 0))
        return iterate_batches(self.train_split, self.config.batch_size, shuffle=True, augment=True,
                               generator=data_gen, device=self.device)

    def make_batch(self, x: torch.Tensor, y: torch.Tensor,
                   shared: dict[str, torch.Tensor] | None = None) -> Batch:
        """A Batch in the student's memory format; its teacher logits are computed once, on first use
        (once for all the Batches given the same ``shared`` dict)."""
        return Batch(x=x.contiguous(memory_format=self.memory_format), y=y, teacher=self.teacher,
                     autocast=self._autocast, teacher_autocast=self._teacher_autocast,
                     teacher_memory_format=self.teacher_memory_format,
                     shared={} if shared is None else shared, folded=self.folded)

    def begin_epoch(self, epoch: int) -> None:
        self._attack_gen = torch.Generator(device=self.device).manual_seed(_mix(self.config.seed, epoch, 1))
        self._epoch_lr = self.optimizer.param_groups[0]["lr"]  # the schedule's lr; warm-up scales it per step
        self._sums: dict[str, float] = {}
        self._seen = 0
        self._epoch = epoch
        self.student.train()

    def train_step(self, batch: Batch, epoch: int, step: int) -> None:
        """The method's loss on one batch, then one SGD step (the attack draws from this run's generator)."""
        batch.generator = self._attack_gen
        loss, logs = self.method.loss(self.student, batch, epoch=epoch)
        if not torch.isfinite(loss):
            raise ConfigError(
                f"the loss is {float(loss.detach())} at epoch {epoch + 1} step {step}: training diverged. "
                f"Lower the learning rate (lr {self._epoch_lr:.3g}, {self.lr_rule}; set lr / --lr), add "
                "warm-up epochs (warmup_epochs / --warmup-epochs), or turn amp off (amp=false / --no-amp)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        warm = self._warmup_factor(epoch, step)
        if warm < 1.0:  # the scheduled lr is put back after the step: the schedule never sees warm-up
            for group in self.optimizer.param_groups:
                group["lr"] = self._epoch_lr * warm
        self.optimizer.step()
        if warm < 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = self._epoch_lr
        n = len(batch.y)
        self._seen += n
        for k, v in logs.items():
            self._sums[k] = self._sums.get(k, 0.0) + v * n

    def _warmup_factor(self, epoch: int, step: int) -> float:
        """Linear warm-up: step s of W warm-up epochs' steps uses s / (W x steps) of the lr (a pure
        function of (epoch, step), so a resumed run warms up exactly as the uninterrupted one)."""
        return warmup_factor(epoch, step, self.steps_per_epoch(), self.warmup_epochs)

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's mean logged terms; the method's per-epoch update (ABSLD) runs here, before the
        checkpoint, and its new state is recorded in the history."""
        self.method.end_epoch(self._epoch)
        out = {**{k: v / max(self._seen, 1) for k, v in self._sums.items()}, "images": self._seen}
        method_state = self.method.state_dict()
        if method_state:
            out["method_state"] = method_state
        return out

    def finish_epoch(self, epoch: int, lr: float, train: dict[str, Any], train_seconds: float,
                     t0: float) -> None:
        """Train accuracy, validation, the schedule step, checkpoints and the epoch's events."""
        cfg = self.config
        metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **train}
        if epoch < self.warmup_epochs:
            metrics["warmup"] = True
        metrics["train_acc"] = self._accuracy(self.train_split, limit=cfg.train_eval_size)
        if self._validate_now(epoch):
            metrics.update(self._validate())
        self.scheduler.step()
        metrics["train_seconds"] = train_seconds
        metrics["seconds"] = time.monotonic() - t0
        metrics["images_per_s"] = train["images"] / max(train_seconds, 1e-9)

        score = metrics.get(self.select_on)
        if score is None and _size(self.val_split) == 0:
            score = float(epoch)  # no validation split: the latest epoch is the best one
        metrics["best"] = score is not None and score > self.best["value"]
        self.history.append(metrics)
        if metrics["best"]:
            self.best.update(epoch=epoch + 1, value=score)
            _atomic_save(plain_state_dict(self.student), self.out_dir / "student_best.pt")
        _atomic_save(plain_state_dict(self.student), self.out_dir / "student_last.pt")
        path = self.out_dir / "checkpoint.pt"
        _atomic_save(self._checkpoint(epoch + 1), path)
        self.on_event({"type": "epoch", "epoch": epoch + 1, "epochs": self.epochs, "metrics": metrics})
        self.on_event({"type": "checkpoint", "epoch": epoch + 1, "path": str(path)})
        message = self.collapse.check(self.history)
        if message is not None:
            self.warnings.append(message)
            self.on_event({"type": "warning", "message": message})

    def _autocast(self):
        return autocast(self.device, self.amp)

    def _teacher_autocast(self):
        return autocast(self.device, self.teacher_amp)

    def _validate_now(self, epoch: int) -> bool:
        if _size(self.val_split) == 0:
            return False
        return (epoch + 1) % max(1, self.config.val_every) == 0 or epoch + 1 == self.epochs

    def _validate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the validation split, fp32, eval mode, a fixed attack seed."""
        cfg, split = self.config, self.val_split
        out = {"val_clean_acc": self._accuracy(split)}
        if self.select_on == "val_clean_acc":
            return out
        attack = create_attack("pgd_sat", self.student, self.val_eps, steps=cfg.val_attack_steps,
                               seed=_mix(cfg.seed, 2))
        correct = 0
        for x, y in iterate_batches(split, cfg.val_batch_size, shuffle=False, augment=False, generator=None,
                                    device=self.device):
            self._check_stop(None, None)
            _, ok = attack.run(x, y)
            correct += int(ok.sum())
        self.student.train()
        out["val_robust_acc"] = correct / _size(split)
        return out

    @torch.no_grad()
    def _accuracy(self, split: Split, limit: int | None = None) -> float:
        """Clean accuracy in eval mode and fp32 (on the first ``limit`` images)."""
        if limit is not None and limit < _size(split):
            split = Split(x=split.x[:limit], y=split.y[:limit])
        if _size(split) == 0:
            return float("nan")
        was_training = self.student.training
        self.student.eval()
        correct = 0
        for x, y in iterate_batches(split, self.config.val_batch_size, shuffle=False, augment=False,
                                    generator=None, device=self.device):
            self._check_stop(None, None)
            correct += int((self.student(x).argmax(1) == y).sum())
        self.student.train(was_training)
        return correct / _size(split)

    # ----- events and cancel -----------------------------------------------------------------------------

    def _check_stop(self, epoch: int | None, step: int | None) -> None:
        if self.should_stop():
            where = f"epoch {epoch + 1} step {step}" if epoch is not None else "validation"
            done = len(self.history) and self.history[-1]["epoch"]
            raise Cancelled(f"cancelled during {where}; the checkpoint of epoch {done} remains")

    # ----- checkpoints -------------------------------------------------------------------------------

    def _checkpoint(self, epochs_done: int) -> dict[str, Any]:
        return {
            "format": "robust-distill-checkpoint-1",
            "epoch": epochs_done,
            "student": plain_state_dict(self.student),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "best": dict(self.best),
            "history": self.history,
            "config": self.resolved(),
            "method": self.method.state_dict(),
        }

    def _resume(self) -> bool:
        """Load ``checkpoint.pt`` if the out dir has one; refuse one that belongs to a different run."""
        path = self.out_dir / "checkpoint.pt"
        if not path.exists():
            return False
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file is the user's to remove, not a crash
            raise ConfigError(f"cannot read {path} to resume ({exc}); delete it to start over") from exc
        saved, now = ckpt.get("config", {}), self.resolved()
        keys = [*_RUN_KEYS, "method", "method_params"]
        if isinstance(saved.get("method_params"), dict):
            legacy = {k: v for k, v in _LEGACY_METHOD_PARAMS.items() if k in now["method_params"]}
            if "igdm_weight" not in saved["method_params"]:
                params = now["method_params"]
                legacy.update({k: params[k] for k in _LEGACY_IGDM_FREE if k in params})
            saved = {**saved, "method_params": {**legacy, **saved["method_params"]}}
        diff = [k for k in keys if saved.get(k, _RUN_KEY_DEFAULTS.get(k)) != now.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in diff)
            raise ConfigError(f"{self.out_dir} holds a checkpoint of a different run ({detail}); "
                              "use another output directory")
        try:
            self.student.load_state_dict(ckpt["student"])
        except RuntimeError as exc:
            raise ConfigError(f"the checkpoint in {self.out_dir} is for another student architecture: "
                              f"{str(exc).splitlines()[0]}") from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.best = dict(ckpt["best"])
        self.method.load_state_dict(ckpt.get("method", {}))
        self.history = list(ckpt["history"])
        self.start_epoch = int(ckpt["epoch"])
        for end in range(1, len(self.history) + 1):  # the warnings of the epochs already done, not re-emitted
            message = self.collapse.check(self.history[:end])
            if message is not None:
                self.warnings.append(message)
        return True
