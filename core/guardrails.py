"""Guardrails: a job never succeeds silently with a useless student or a misread teacher.

Three checks share one statistical yardstick, "at chance": an accuracy measured on ``n`` images of a
``C``-class task is at chance when it is not clearly above what guessing gets, i.e. at most
``1/C + z * sqrt(p (1 - p) / n)`` with ``p = 1/C`` and ``z = CHANCE_Z`` (3: a guessing model stays under
the bound 99.9% of the time). Below ``MIN_CONCLUSIVE_N`` images the bound is too wide to fail a job on
(16 images of 4 classes: anything under 57% would "be at chance"), so such a check is recorded as
inconclusive and decides nothing.

- ``check_teacher``: the teacher's clean accuracy on a few hundred images before training. At chance, or
  clearly beaten by another reading of the inputs (without its normalisation, or with the CIFAR-10 /
  CIFAR-100 statistics), it is a misread teacher: the job fails with a message naming normalisation.
  Well below an accuracy its uploader claimed, it is a warning.
- ``CollapseDetector``: during training, ``patience`` epochs with train and validation accuracy at chance
  and a loss that fell by less than ``LOSS_DROP`` over them raise a warning.
- ``check_student``: at the end, a best checkpoint at chance is a degenerate student (``DegenerateStudent``).

Everything here takes a loaded model and a ``Split``, so it runs as well in a child process of the API
(the upload-time check) as in the worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.data import Split, iterate_batches
from core.errors import UserError
from core.stats import rounded_interval
from core.teachers import NAMED_NORMALIZATIONS, Normalized

CHANCE_Z = 3.0            # the binomial margin, in standard errors
MIN_CONCLUSIVE_N = 100    # fewer images than this decide nothing
CHECK_IMAGES = 500        # images measured by the teacher and final-student checks
LOSS_DROP = 0.05          # a loss that fell by less than 5% of its first-epoch value "has not fallen"
CLAIM_SLACK = 0.05        # measured this far (and z standard errors) below a claim: a warning
SUSPICIOUS_BELOW = 0.5    # a teacher under this accuracy is also tried with the other input readings
NORMALIZE_HINT = ("check the teacher's input normalisation: give the mean and std it was trained with "
                  "(--teacher-normalize 'm1,m2,m3;s1,s2,s3' in the CLI, 'normalize' when uploading), or "
                  "none if the model normalises inside itself")


class DegenerateStudent(UserError):
    """The trained student's best checkpoint is no better than guessing."""


class TeacherCheckFailed(UserError):
    """The teacher is no better than guessing, or is clearly being read with the wrong normalisation."""


def chance_bound(num_classes: int, n: int, z: float = CHANCE_Z) -> float:
    """The highest accuracy on ``n`` images that is still consistent with guessing among ``num_classes``."""
    p = 1.0 / max(int(num_classes), 1)
    return p + z * math.sqrt(p * (1.0 - p) / max(int(n), 1))


def at_chance(accuracy: float | None, n: int, num_classes: int, z: float = CHANCE_Z) -> bool | None:
    """True/False when ``n`` is enough to tell (``MIN_CONCLUSIVE_N``), None when it is not (or no number)."""
    if accuracy is None or not math.isfinite(accuracy) or n < MIN_CONCLUSIVE_N or num_classes < 2:
        return None
    return accuracy <= chance_bound(num_classes, n, z)


def chance_record(accuracy: float, n: int, num_classes: int) -> dict[str, Any]:
    """What a report says about one accuracy: the number, its 95% interval, chance, the bound and the
    verdict."""
    interval = rounded_interval(round(accuracy * n), n) if n and math.isfinite(accuracy) else None
    return {"accuracy": accuracy, "n": n, "ci95": interval, "chance": 1.0 / num_classes,
            "chance_bound": chance_bound(num_classes, n), "z": CHANCE_Z,
            "at_chance": at_chance(accuracy, n, num_classes)}


def first_images(split: Split, n: int) -> Split:
    return split if n >= len(split) else Split(x=split.x[:n], y=split.y[:n])


@torch.no_grad()
def clean_accuracy(model: nn.Module, split: Split, device: str | torch.device, n: int = CHECK_IMAGES,
                   batch_size: int = 256) -> tuple[float, int, list[int]]:
    """(accuracy, images, predictions per class) of ``model`` on the first ``n`` images, eval mode, fp32."""
    part = first_images(split, n)
    was_training = model.training
    model.eval()
    correct, preds = 0, []
    try:
        for x, y in iterate_batches(part, batch_size, shuffle=False, augment=False, generator=None,
                                    device=device):
            pred = model(x).float().argmax(1)
            correct += int((pred == y).sum())
            preds.append(pred.cpu())
    finally:
        model.train(was_training)
    counts = torch.bincount(torch.cat(preds)).tolist() if preds else []
    total = len(part)
    return (correct / total if total else float("nan")), total, counts


def teacher_clean_accuracy(model: nn.Module, split: Split, device: str | torch.device,
                           n: int = CHECK_IMAGES, num_classes: int | None = None) -> dict[str, Any]:
    """The teacher's clean accuracy on the first ``n`` images of ``split``, with its chance verdict."""
    accuracy, total, _ = clean_accuracy(model, split, device, n)
    classes = num_classes or int(split.y.max()) + 1
    return chance_record(accuracy, total, classes)


@dataclass
class TeacherCheck:
    """The verdict on a teacher: ``record`` goes into the report, ``failure`` (if any) fails the job."""

    record: dict[str, Any]
    failure: str | None = None
    warnings: list[str] = field(default_factory=list)


def _readings(model: nn.Module, normalize: tuple[Sequence[float], Sequence[float]] | None,
              channels: int) -> dict[str, nn.Module]:
    """Other ways the inputs could have been meant: without the given normalisation, or with the
    CIFAR statistics (3-channel images only)."""
    raw = model.model if isinstance(model, Normalized) else model
    out: dict[str, nn.Module] = {}
    if isinstance(model, Normalized):
        out["none"] = raw
    if channels == 3:
        for name, (mean, std) in NAMED_NORMALIZATIONS.items():
            if normalize is None or tuple(normalize[0]) != tuple(mean) or tuple(normalize[1]) != tuple(std):
                out[name] = Normalized(raw, mean, std).to(_device_of(raw))
    return out


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _clearly_better(other: float, base: float, n: int) -> bool:
    """A two-proportion z-test at ``CHANCE_Z`` on the same ``n`` images, and at least 1.5x the base."""
    pooled = (other + base) / 2
    se = math.sqrt(max(2 * pooled * (1 - pooled) / n, 1e-12))
    return other - base > CHANCE_Z * se and other >= 1.5 * base


def check_teacher(model: nn.Module, split: Split, num_classes: int, device: str | torch.device, *,
                  normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                  claimed_accuracy: float | None = None, n: int = CHECK_IMAGES,
                  split_name: str = "validation") -> TeacherCheck:
    """Measure the teacher on the first ``n`` images of ``split`` and judge it (see the module doc).

    ``normalize`` is the (mean, std) the teacher was loaded with (``LoadedModel.normalize``), so that the
    other readings can be tried on the same weights.
    """
    record = teacher_clean_accuracy(model, split, device, n, num_classes)
    record["split"] = split_name
    accuracy, total = record["accuracy"], record["n"]
    check = TeacherCheck(record)
    if record["at_chance"] is None:
        record["note"] = (f"only {total} images to measure on (at least {MIN_CONCLUSIVE_N} are needed to "
                          "tell a teacher from guessing): not judged")
        record["passed"] = None
        return check
    channels = int(split.x.shape[1])
    better: dict[str, float] = {}
    if accuracy < SUSPICIOUS_BELOW:  # a teacher this good is read right: skip the extra forwards
        for name, other in _readings(model, normalize, channels).items():
            acc, _, _ = clean_accuracy(other, split, device, n)
            if _clearly_better(acc, accuracy, total):
                better[name] = acc
    if better:
        record["other_readings"] = better
    given = "without normalisation" if normalize is None else "with the normalisation given"
    measured = f"the teacher reaches {accuracy:.1%} clean accuracy on {total} {split_name} images {given}"
    if better:
        name, acc = max(better.items(), key=lambda item: item[1])
        how = "without any normalisation" if name == "none" else f"with normalize={name!r}"
        check.failure = (f"{measured}, but {acc:.1%} {how}: the teacher is being read with the wrong input "
                         f"normalisation; {NORMALIZE_HINT}")
    elif record["at_chance"]:
        check.failure = (f"{measured}, which is chance level for {num_classes} classes (at most "
                         f"{record['chance_bound']:.1%} is indistinguishable from guessing): distilling "
                         f"from it teaches nothing; {NORMALIZE_HINT}")
    if claimed_accuracy is not None:
        record["claimed_accuracy"] = claimed_accuracy
        se = math.sqrt(max(claimed_accuracy * (1 - claimed_accuracy), 1e-12) / total)
        if claimed_accuracy - accuracy > max(CLAIM_SLACK, CHANCE_Z * se):
            check.warnings.append(
                f"{measured}, well below the claimed {claimed_accuracy:.1%}; if the claim is right, the "
                f"teacher is being read wrongly: {NORMALIZE_HINT}")
    record["passed"] = check.failure is None
    return check


class CollapseDetector:
    """Watches a run's history for a student that learns nothing; one warning per run.

    Collapse at epoch k: the last ``patience`` epochs all have train accuracy and (when measured)
    validation clean accuracy at chance, and the loss has stopped falling over them (epoch k's loss is
    above (1 - LOSS_DROP) x the loss of the window's first epoch). The window, not epoch 1: a collapsed
    student's loss still drops at first, to the loss of its constant prediction, and then stays there.
    """

    def __init__(self, num_classes: int, train_n: int, val_n: int, patience: int = 3,
                 lr_note: str = "") -> None:
        self.num_classes, self.train_n, self.val_n, self.patience = num_classes, train_n, val_n, patience
        self.lr_note = lr_note  # e.g. "lr 0.1, set explicitly": the run's lr and where it came from
        self.warned = False

    def _epoch_at_chance(self, m: dict[str, Any]) -> bool:
        train = at_chance(m.get("train_acc"), self.train_n, self.num_classes)
        if not train:
            return False
        if m.get("val_clean_acc") is None:
            return self.val_n == 0
        return bool(at_chance(m["val_clean_acc"], self.val_n, self.num_classes))

    def check(self, history: Sequence[dict[str, Any]]) -> str | None:
        """The warning message when ``history`` (oldest first) shows a collapse not yet warned about."""
        if self.warned or self.patience < 1 or len(history) < self.patience:
            return None
        recent = history[-self.patience:]
        if not all(self._epoch_at_chance(m) for m in recent):
            return None
        first, last = recent[0].get("loss"), recent[-1].get("loss")
        if first is None or last is None or not math.isfinite(first) or not math.isfinite(last):
            return None
        if last < first - LOSS_DROP * abs(first):  # still falling: it may yet learn
            return None
        self.warned = True
        m = history[-1]
        lr = self.lr_note or f"lr {m['lr']:.3g}"
        val = f", validation {m['val_clean_acc']:.1%}" if m.get("val_clean_acc") is not None else ""
        return (f"the student has not learnt for {self.patience} epochs (to epoch {m['epoch']}): train "
                f"accuracy {m['train_acc']:.1%}{val} are at chance ({1 / self.num_classes:.1%} for "
                f"{self.num_classes} classes) and the loss went from {first:.4g} to {last:.4g}; it has "
                f"probably collapsed to a constant prediction: lower the learning rate ({lr}; lr / --lr), "
                "add warm-up epochs, or check the teacher")


def check_student(model: nn.Module, split: Split, num_classes: int, device: str | torch.device,
                  n: int = CHECK_IMAGES, split_name: str = "validation") -> dict[str, Any]:
    """The best checkpoint's clean accuracy on the check split, and whether it is at chance."""
    accuracy, total, counts = clean_accuracy(model, split, device, n)
    record = chance_record(accuracy, total, num_classes)
    record["split"] = split_name
    if counts and total:
        record["top_class_share"] = max(counts) / total  # 1.0: one class predicted for every image
    return record


def degenerate_message(name: str, record: dict[str, Any], num_classes: int) -> str:
    who = "the student" if not name else f"student {name!r}"
    share = record.get("top_class_share")
    one = f"; {share:.0%} of its predictions are one class" if share is not None and share >= 0.5 else ""
    return (f"{who} is degenerate: its best checkpoint reaches {record['accuracy']:.1%} clean accuracy on "
            f"{record['n']} {record['split']} images, chance level for {num_classes} classes (at most "
            f"{record['chance_bound']:.1%} is indistinguishable from guessing){one}; its robust numbers "
            "would be meaningless. Lower the learning rate (it follows the batch size unless lr is set), "
            "add warm-up epochs, check the teacher, or train longer; allow_degenerate=true "
            "(--allow-degenerate) keeps such a result, flagged")
