"""The trainer's settings (``TrainConfig``) and how the ones left to "auto" are resolved: the teacher's
precision and the optimiser's lr, momentum and weight decay (a method parameter wins over the job's)."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.methods import Method


@dataclass
class TrainConfig:
    """Optimiser and loop settings. None means "take it from the method" or "auto" (see ``resolve``).

    amp: bf16 autocast for the student's forwards (validation is always fp32). Auto turns it on where the
    hardware has bf16 (CUDA with bf16, CPUs with AVX512-BF16/AMX): with the levers below and the teacher
    in bf16, a ResNet-18 RSLAD step ran ~3.0x and a MobileNetV2 step ~2.7x faster than the fp32 reference
    loop on such a CPU (see bench/).
    channels_last: auto follows amp (it pays off with bf16 kernels).
    fold_bn: attack the student with each BatchNorm folded into its convolution (``core.fold``; the attack
    runs in eval mode, where that is the same function up to rounding); auto follows amp, so that
    ``amp=False`` is the reference's arithmetic exactly.
    depthwise_fp32: with amp, run depthwise convolutions in fp32 (``core.device.depthwise_in_fp32``);
    auto: on a CPU, where oneDNN's bf16 depthwise kernels are slower than its fp32 ones.
    teacher_precision: the teacher's forward: 'bf16', 'fp32' or 'auto' = bf16 where bf16 is native and amp
    is on, else fp32 (so ``amp=False`` runs the teacher in fp32 too: the reference's arithmetic exactly).
    teacher_amp: the older spelling (True = bf16, False = fp32), used when teacher_precision is 'auto'.
    lr, momentum, weight_decay: None takes the method's parameter; the method's lr, when set, wins over
    this lr (``resolve_optimizer``).
    """

    epochs: int | None = None            # None: the method's epochs
    milestones: tuple[int, ...] | None = None   # None: the method's, scaled to ``epochs``
    batch_size: int = 128
    lr: float | None = None              # None: the method's lr, else 0.1 x batch_size / 128 (``resolve_lr``)
    warmup_epochs: int | None = None     # linear warm-up per step; None: ``resolve_warmup``
    momentum: float | None = None        # None: the method's (0.9)
    weight_decay: float | None = None    # None: the method's (2e-4)
    seed: int = 0
    deterministic: bool = False
    amp: bool | None = None
    channels_last: bool | None = None
    depthwise_fp32: bool | None = None   # None: on a CPU with amp
    fold_bn: bool | None = None          # None: with amp
    teacher_precision: str = "auto"      # auto | fp32 | bf16
    teacher_amp: bool | None = None      # older spelling: True = bf16, False = fp32 (when precision is auto)
    val_eps: float | None = None         # None: the method's eps
    val_attack_steps: int = 20           # validation PGD: step 2/255, uniform start (PGD_SAT)
    val_every: int = 1
    val_batch_size: int = 256
    train_eval_size: int = 1000          # train accuracy: on this many un-augmented training images
    device: str = "auto"
    collapse_patience: int = 3           # epochs at chance before the collapse warning; 0: off


TEACHER_PRECISIONS = ("auto", "fp32", "bf16")


def check_teacher_precision(precision: object) -> str:
    if precision not in TEACHER_PRECISIONS:
        raise ConfigError(f"teacher_precision must be one of {', '.join(TEACHER_PRECISIONS)}, "
                          f"got {precision!r}")
    return str(precision)


def resolve_teacher_bf16(precision: str, teacher_amp: bool | None, amp: bool, native: bool) -> bool:
    """Whether the teacher's forward runs in bf16: as ``precision`` says; 'auto' follows ``teacher_amp``
    when given, else bf16 only where it is native and the student's amp is on."""
    check_teacher_precision(precision)
    if precision != "auto":
        return precision == "bf16"
    if teacher_amp is not None:
        return bool(teacher_amp)
    return native and amp


def resolve_optimizer(config: TrainConfig, method: Method) -> tuple[float | None, str, float, float]:
    """(explicit lr or None, where it comes from, momentum, weight decay). Precedence for the lr: the
    method's ``lr`` parameter, then the job-level ``config.lr``, then (None) the linear rule."""
    params = method.params
    if params.get("lr") is not None:
        lr, source = float(params["lr"]), "method parameter lr"
    elif config.lr is not None:
        lr, source = float(config.lr), "set explicitly"
    else:
        lr, source = None, ""
    momentum = params.get("momentum", 0.9) if config.momentum is None else config.momentum
    weight_decay = params.get("weight_decay", 2e-4) if config.weight_decay is None else config.weight_decay
    return lr, source, float(momentum), float(weight_decay)
