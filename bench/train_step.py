"""One RSLAD training step: ours against a faithful re-implementation of the reference loop, in one run.

Reference (bench/common.py): the zibojia/RSLAD step as published: fp32, NCHW, eager, no autocast; the
teacher forward under no_grad, 10 steps of KL-PGD (2/255, start x + 0.001 N(0, 1)) with the student in
eval mode, then 5/6 KL(S(x_adv), T(x)) + 1/6 KL(S(x), T(x)) and one SGD step.
Ours: the trainer's own per-step code (its public per-epoch pieces, as ``core.train.Trainer`` and
``core.multi`` run them, over a split of exactly one batch, so one "epoch" is one step: the batch is
drawn and augmented on the device, the method's loss, zero_grad, backward, SGD step), with its levers:
bf16 autocast, channels_last (both where bf16 is native), the teacher in bf16 under no_grad, no weight
gradients in the attack; ``--compile`` adds torch.compile of the student. The two alternate step by
step so both see the same machine load; times are medians. Ours also does the batch draw and
augmentation the reference's step does not, so the ratio is if anything understated.

The fraction of peak: the step's matmul/convolution FLOPs (counted once, with the reference's step)
over its time, divided by the fastest large matmul measured in the same run (bf16 for ours when it runs
in bf16, fp32 otherwise).

    python -m bench.train_step                          # resnet18 + mobilenet_v2, WRN-34-10 teacher
    python -m bench.train_step --batch-size 32          # quicker
    python -m bench.train_step --check-exact --steps 0  # only the loss-curve comparison
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bench.common import (
    LR,
    add_common_args,
    cifar_bundle,
    count_flops,
    describe_machine,
    machine_info,
    matmul_tflops,
    median,
    random_images,
    reference_optimizer,
    reference_rslad_step,
    setup,
    table,
    timed,
    write_json,
)
from core.data import DatasetBundle, Split
from core.methods import Batch, Method, create_method
from core.models import create_model
from core.train import TrainConfig, Trainer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="resnet18,mobilenet_v2", help="comma-separated student names")
    p.add_argument("--teacher", default="wrn_34_10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first")
    p.add_argument("--steps", type=int, default=2, help="timed steps of each side (0: skip the timing)")
    p.add_argument("--no-amp", action="store_true",
                   help="ours without bf16 autocast (default: the trainer's auto, on where bf16 is native)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="ours in NCHW (default: the trainer's auto, channels_last with bf16)")
    p.add_argument("--compile", action="store_true", help="ours with torch.compile(student)")
    p.add_argument("--depthwise-fp32", choices=["auto", "on", "off"], default="auto",
                   help="with bf16, ours' depthwise convolutions in fp32 (auto: on a CPU)")
    p.add_argument("--fold-bn", choices=["auto", "on", "off"], default="auto",
                   help="ours' attack on the student with BatchNorms folded (auto: with bf16)")
    p.add_argument("--peak-size", type=int, default=None,
                   help="matmul size for the peak (default: the best of 1024 and 2048 on a CPU, "
                        "4096 and 8192 on a GPU)")
    p.add_argument("--check-exact", action="store_true",
                   help="loss curves of a short run: ours fp32 vs the reference on the same batches and "
                        "start noise (same math); ours with the levers vs ours fp32, against seed noise")
    p.add_argument("--exact-student", default="resnet18")
    p.add_argument("--exact-teacher", default="wrn_34_10")
    p.add_argument("--exact-batch-size", type=int, default=16)
    p.add_argument("--exact-steps", type=int, default=8, help="steps of the short run (one batch each)")
    add_common_args(p)
    return p.parse_args(argv)


# ----- the two sides ------------------------------------------------------------------------------------

def build_models(student: str, teacher: str, device: torch.device, seed: int) -> tuple[nn.Module, nn.Module]:
    """Randomly initialised student and teacher (speed does not depend on the weights)."""
    torch.manual_seed(seed)
    return create_model(student, 10).to(device), create_model(teacher, 10).to(device)


def one_batch_bundle(x: torch.Tensor, y: torch.Tensor) -> DatasetBundle:
    """A dataset whose training split is exactly one batch (uint8 images), no validation split."""
    x8 = (x * 255).round().to(torch.uint8).cpu()
    train = Split(x8, y.cpu())
    empty = Split(x8[:0], y.cpu()[:0])
    return DatasetBundle("bench", 10, train, empty, empty, "random images")


class Recorder:
    """Stands in for the method: passes every call on, keeping each batch's input, the attack generator's
    state and the loss, so the reference can be fed exactly what ours saw."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[float] = []

    def loss(self, student: nn.Module, batch: Batch, *, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        self.seen.append((batch.x.detach().clone(), batch.generator.get_state()))
        loss, logs = self.method.loss(student, batch, epoch=epoch)
        self.losses.append(float(logs["loss"]))
        return loss, logs

    def __getattr__(self, key: str) -> Any:
        return getattr(self.method, key)


class Ours:
    """The trainer's step: one trainer epoch over a one-batch training split."""

    def __init__(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 device: torch.device, amp: bool | None, channels_last: bool | None, compile: bool = False,
                 depthwise_fp32: bool | None = None, fold_bn: bool | None = None, seed: int = 0) -> None:
        self.method = create_method("rslad")
        if compile:
            student = torch.compile(student)
        config = TrainConfig(epochs=1, lr=LR, batch_size=len(y), seed=seed, amp=amp,
                             channels_last=channels_last, depthwise_fp32=depthwise_fp32, fold_bn=fold_bn,
                             device=str(device))
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-")
        self.trainer = Trainer(config, self.method, student, teacher, one_batch_bundle(x, y), self._tmp.name)
        self.epoch = 0

    def step(self) -> float:
        logs = train_epoch(self.trainer, self.epoch)
        self.epoch += 1
        return float(logs["loss"])


def train_epoch(trainer: Trainer, epoch: int) -> dict[str, Any]:
    """The training part of one of the trainer's epochs, through the public per-epoch pieces that
    core.multi drives too (what ``Trainer._train_epoch`` does, less the cancel check and progress event)."""
    trainer.begin_epoch(epoch)
    for step, (x, y) in enumerate(trainer.epoch_batches(epoch), start=1):
        trainer.train_step(trainer.make_batch(x, y), epoch, step)
    return trainer.end_epoch()


class Reference:
    """The reference step on a fixed batch (fresh 0.001 * N(0, 1) start noise from ``generator``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
        self.student, self.teacher, self.x = student, teacher, x.contiguous()
        self.optimizer = reference_optimizer(student)
        self.generator = torch.Generator(device=x.device).manual_seed(seed)

    def step(self, x: torch.Tensor | None = None, generator: torch.Generator | None = None) -> float:
        x = self.x if x is None else x.contiguous()
        loss = reference_rslad_step(self.student, self.teacher, self.optimizer, x,
                                    generator=generator or self.generator)
        return float(loss)


# ----- measurements -------------------------------------------------------------------------------------

def step_flops(student: nn.Module, teacher: nn.Module, batch_size: int, device: torch.device) -> int:
    """FLOPs of one reference step at ``batch_size``: counted at batch 2 (on copies), scaled linearly."""
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)
    x, _ = random_images(2, device, seed=1)
    flops = count_flops(lambda: Reference(s, t, x).step())
    return flops * batch_size // 2


def time_pair(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median seconds per step of the reference and of ours, alternating which goes first."""
    student, teacher = build_models(name, args.teacher, device, args.seed)
    x, y = random_images(args.batch_size, device, seed=args.seed)
    x = (x * 255).round() / 255  # the values ours sees after its uint8 round trip
    ours = Ours(copy.deepcopy(student), copy.deepcopy(teacher), x, y, device=device,
                amp=False if args.no_amp else None, channels_last=False if args.no_channels_last else None,
                compile=args.compile, depthwise_fp32={"on": True, "off": False}.get(args.depthwise_fp32),
                fold_bn={"on": True, "off": False}.get(args.fold_bn), seed=args.seed)
    ref = Reference(student, teacher, x, seed=args.seed)
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    for i in range(args.warmup + args.steps):
        order = [("reference", ref), ("ours", ours)]
        for label, side in order if i % 2 == 0 else order[::-1]:
            _, seconds = timed(side.step, device)
            print(f"  {name} step {i + 1}/{args.warmup + args.steps} {label}: {seconds:.2f} s"
                  + (" (warm-up)" if i < args.warmup else ""), flush=True)
            if i >= args.warmup:
                times[label].append(seconds)
    flops = step_flops(student, teacher, args.batch_size, device)
    t_ref, t_ours = median(times["reference"]), median(times["ours"])
    return {"student": name, "teacher": args.teacher, "batch_size": args.batch_size,
            "amp": ours.trainer.amp, "channels_last": ours.trainer.channels_last, "compile": args.compile,
            "depthwise_fp32": ours.trainer.depthwise_fp32, "fold_bn": ours.trainer.fold_bn,
            "reference_s": t_ref, "ours_s": t_ours, "reference_times": times["reference"],
            "ours_times": times["ours"], "reference_img_s": args.batch_size / t_ref,
            "ours_img_s": args.batch_size / t_ours, "speedup": t_ref / t_ours, "step_flops": flops,
            "reference_tflops": flops / t_ref / 1e12, "ours_tflops": flops / t_ours / 1e12}


def short_run(student: nn.Module, teacher: nn.Module, bundle: DatasetBundle, *, batch_size: int, seed: int,
              amp: bool, channels_last: bool, device: torch.device) -> Recorder:
    """One epoch of the real trainer over ``bundle`` (one step per batch) on copies of the models."""
    recorder = Recorder(create_method("rslad"))
    config = TrainConfig(epochs=1, lr=LR, batch_size=batch_size, seed=seed, amp=amp,
                         channels_last=channels_last, teacher_amp=amp, device=str(device), train_eval_size=0)
    with tempfile.TemporaryDirectory(prefix="bench-exact-") as out:
        trainer = Trainer(config, recorder, copy.deepcopy(student), copy.deepcopy(teacher), bundle, out)
        train_epoch(trainer, 0)
    return recorder


def check_exact(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Loss curves of a short run (``--exact-steps`` batches of real CIFAR-10 images when present):

    - the reference, fed ours' batches (after augmentation) and attack start noise, against ours in fp32:
      the same math, so the curves must agree to float rounding;
    - ours with the levers (bf16 autocast for student and teacher, channels_last, and on a CPU fp32
      depthwise layers) against ours fp32 (student and teacher) on the same batches;
    - ours fp32 with another seed (another batch order, augmentation and start noise) against ours fp32:
      the noise any loss curve has. The levers pass when they move the curve less than that.
    """
    student, teacher = build_models(args.exact_student, args.exact_teacher, device, args.seed)
    bundle = cifar_bundle(args.exact_batch_size * args.exact_steps, seed=args.seed)

    def run(amp: bool, channels_last: bool, seed: int) -> Recorder:
        return short_run(student, teacher, bundle, batch_size=args.exact_batch_size, seed=seed, amp=amp,
                         channels_last=channels_last, device=device)

    fp32 = run(False, False, args.seed)
    ref = Reference(copy.deepcopy(student), copy.deepcopy(teacher), fp32.seen[0][0])
    reference = []
    for xb, state in fp32.seen:
        gen = torch.Generator(device=xb.device)
        gen.set_state(state)
        reference.append(ref.step(xb, gen))
    levers = run(True, True, args.seed)
    other_seed = run(False, False, args.seed + 1)

    def max_rel(a: list[float], b: list[float]) -> float:
        return max(abs(u - v) / max(abs(v), 1e-12) for u, v in zip(a, b, strict=True))

    def max_abs(a: list[float], b: list[float]) -> float:
        return max(abs(u - v) for u, v in zip(a, b, strict=True))

    ours = fp32.losses
    return {"student": args.exact_student, "teacher": args.exact_teacher, "batch_size": args.exact_batch_size,
            "steps": args.exact_steps, "data": bundle.note, "reference": reference, "ours_fp32": ours,
            "ours_levers": levers.losses, "ours_fp32_other_seed": other_seed.losses,
            "max_rel_fp32_vs_reference": max_rel(ours, reference),
            "fp32_equal": max_rel(ours, reference) <= 1e-4,
            "max_abs_levers": max_abs(levers.losses, ours), "max_abs_noise": max_abs(other_seed.losses, ours),
            "max_rel_levers": max_rel(levers.losses, ours), "max_rel_noise": max_rel(other_seed.losses, ours),
            "levers_within_noise": max_abs(levers.losses, ours) <= max_abs(other_seed.losses, ours)}


# ----- main ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup(args)
    info = machine_info(device)
    print(describe_machine(info), flush=True)
    result: dict[str, Any] = {"machine": info, "args": vars(args)}

    if args.steps > 0:
        peak_bf16 = matmul_tflops(device, torch.bfloat16, args.peak_size)
        peak_fp32 = matmul_tflops(device, torch.float32, args.peak_size)
        result["peak_tflops"] = {"bf16": peak_bf16, "fp32": peak_fp32}
        rows = []
        for name in [s.strip() for s in args.students.split(",") if s.strip()]:
            rows.append(time_pair(name, args, device))
        for row in rows:
            row["ours_peak_fraction"] = row["ours_tflops"] / (peak_bf16 if row["amp"] else peak_fp32)
            row["reference_peak_fraction"] = row["reference_tflops"] / peak_fp32
        result["rows"] = rows
    if args.check_exact:
        result["exact"] = check_exact(args, device)

    write_json(args.json, result)
    if "exact" in result:
        e = result["exact"]
        print(f"\nloss curve of a short run ({e['student']} student, {e['teacher']} teacher, batch "
              f"{e['batch_size']}, {e['steps']} steps; {e['data']})")
        print(table(["step", "reference", "ours fp32", "ours levers", "ours fp32, other seed"],
                    [[i + 1, f"{r:.6f}", f"{a:.6f}", f"{b:.6f}", f"{c:.6f}"] for i, (r, a, b, c) in
                     enumerate(zip(e["reference"], e["ours_fp32"], e["ours_levers"],
                                   e["ours_fp32_other_seed"], strict=True))]))
        print(f"ours fp32 vs reference (same batches and start noise): max relative deviation "
              f"{e['max_rel_fp32_vs_reference']:.2e} -> "
              f"{'equal within 1e-4' if e['fp32_equal'] else 'NOT equal within 1e-4'}")
        print(f"ours levers (bf16 student and teacher, CL, folded BN; CPU: fp32 depthwise) vs ours fp32: "
              f"max |diff| {e['max_abs_levers']:.3g} "
              f"({100 * e['max_rel_levers']:.2f}%); "
              f"seed-to-seed noise: max |diff| {e['max_abs_noise']:.3g} ({100 * e['max_rel_noise']:.2f}%) -> "
              + ("levers within noise" if e["levers_within_noise"] else "levers NOT within noise"))
    if "rows" in result:
        peaks = result["peak_tflops"]
        print(f"\n{describe_machine(info)}")
        print(f"measured matmul peak: bf16 {peaks['bf16']:.3g} TFLOP/s, fp32 {peaks['fp32']:.3g} TFLOP/s; "
              f"teacher {args.teacher}, batch {args.batch_size}, median of {args.steps} steps")
        print(table(["student", "levers", "reference img/s", "ours img/s", "ratio", "TFLOP/step",
                     "ours % of peak", "ref % of fp32 peak"],
                    [[r["student"], _levers(r), r["reference_img_s"], r["ours_img_s"], f"{r['speedup']:.2f}x",
                      r["step_flops"] / 1e12, f"{100 * r['ours_peak_fraction']:.1f}%",
                      f"{100 * r['reference_peak_fraction']:.1f}%"] for r in result["rows"]]))
        for r in result["rows"]:
            peak = "bf16" if r["amp"] else "fp32"
            fraction = 100 * r["ours_peak_fraction"]
            print(f"{r['student']}: ours {r['ours_img_s']:.2f} img/s, reference {r['reference_img_s']:.2f} "
                  f"img/s, ratio ours/reference {r['speedup']:.2f}x; ours at {fraction:.1f}% of the measured "
                  f"{peak} matmul peak ({r['ours_tflops']:.3g} of {peaks[peak]:.3g} TFLOP/s)")
    return result


def _levers(row: dict[str, Any]) -> str:
    parts = ["bf16" if row["amp"] else "fp32", "CL" if row["channels_last"] else "NCHW"]
    parts += ["fp32 depthwise"] if row.get("depthwise_fp32") else []
    parts += ["folded BN"] if row.get("fold_bn") else []
    return "+".join(parts + (["compile"] if row["compile"] else []))


if __name__ == "__main__":
    main()
