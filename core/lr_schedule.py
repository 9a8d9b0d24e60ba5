"""The learning rate a run uses: the linear rule for the batch size, and a linear warm-up.

Every method here was tuned with SGD lr 0.1 at batch 128. Another batch size scales that lr linearly
(Goyal et al. 2017, "Accurate, Large Minibatch SGD"): a batch of 64 takes half as large a step, as it
averages half as many gradients. Without it, lr 0.1 at a small batch can drive a student to a constant
prediction (tests/unit/test_guardrails.py shows one).
"""

from __future__ import annotations

REFERENCE_LR, REFERENCE_BATCH = 0.1, 128
MAX_AUTO_WARMUP = 5  # epochs of warm-up when the linear rule raises the lr (batch > 128), at most


def resolve_lr(lr: float | None, batch_size: int) -> tuple[float, str]:
    """(the learning rate, why): ``lr`` when given, else the reference lr scaled by batch_size / 128."""
    if lr is not None:
        return float(lr), "set explicitly"
    if batch_size == REFERENCE_BATCH:
        return REFERENCE_LR, f"reference: {REFERENCE_LR:g} at batch {REFERENCE_BATCH}"
    return (REFERENCE_LR * batch_size / REFERENCE_BATCH,
            f"linear: {REFERENCE_LR:g} x {batch_size}/{REFERENCE_BATCH}")


def resolve_warmup(warmup_epochs: int | None, lr: float | None, batch_size: int, epochs: int) -> int:
    """Warm-up epochs: as given; else none, unless the linear rule raised the lr above the reference
    (batch > 128, lr not set): then min(5, epochs // 10), the large-batch recipe's gradual warm-up."""
    if warmup_epochs is not None:
        return int(warmup_epochs)
    if lr is None and batch_size > REFERENCE_BATCH:
        return min(MAX_AUTO_WARMUP, epochs // 10)
    return 0


LR_SCHEDULES = ("step", "reference")


def decay_milestones(milestones: tuple[int, ...] | list[int], schedule: str) -> list[int]:
    """The milestones at which the lr is divided by 10. 'step': every one (lr 0.1, 0.01, 0.001, ...).
    'reference' (ARD, IAD): their code calls adjust_learning_rate(optimizer, epoch, base_lr), which sets
    base_lr * 0.1 at each milestone, so only the first one lowers the lr (0.1, then 0.01 for good)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    milestones = [int(m) for m in milestones]
    return milestones[:1] if schedule == "reference" else milestones


def warmup_factor(epoch: int, step: int, steps_per_epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up: step s (1-based, counted over the run) of the first ``warmup_epochs`` epochs uses
    s / (warmup_epochs x steps_per_epoch) of the scheduled lr; 1 after them. A pure function of (epoch,
    step), so a resumed run warms up exactly as the uninterrupted one."""
    if epoch >= warmup_epochs:
        return 1.0
    return (epoch * steps_per_epoch + step) / (warmup_epochs * steps_per_epoch)
