"""Several students from one teacher: one shared pass (``core.multi.MultiTrainer``) against separate runs.

One pass: ``MultiTrainer`` drives K ``Trainer`` objects over one data pass; each batch is drawn and
augmented once and the teacher labels it once (``Batch`` caches T(x)), then every student takes its own
step. Separate: K ``Trainer.fit()`` runs one after the other over the same batches (same seed, so the
same data order, augmentation and attack starts), each drawing its batches and running the teacher
itself. Both sides are the real trainer with its defaults (bf16 autocast + channels_last where bf16 is
native), on ``--steps`` batches of real CIFAR-10 training images (random images if none are found),
without validation. The teacher is wrapped in a timer, so the teacher-forward share of each side is
measured, not estimated. The students each side trains are compared at the end: sharing must not change
them. Sides alternate over ``--repeats``; seconds are medians.

    python -m bench.multi_student                                  # resnet18 + mobilenet_v2, WRN-34-10
    python -m bench.multi_student --students resnet18,resnet18,mobilenet_v2 --steps 4
    python -m bench.multi_student --teacher resnet18 --batch-size 64   # a quick run
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bench.common import (
    LR,
    add_common_args,
    cifar_bundle,
    describe_machine,
    machine_info,
    median,
    setup,
    sync,
    write_json,
)
from core.data import DatasetBundle
from core.methods import create_method
from core.models import create_model
from core.multi import MultiTrainer
from core.train import TrainConfig, Trainer, plain_state_dict


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="resnet18,mobilenet_v2", help="comma-separated student names (K)")
    p.add_argument("--teacher", default="wrn_34_10")
    p.add_argument("--method", default="rslad", help="the method every student trains with")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed batches per side (one epoch of this many)")
    p.add_argument("--warmup", type=int, default=1, help="untimed one-pass batches first (0: none)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side (medians reported)")
    p.add_argument("--no-amp", action="store_true", help="fp32 (default: the trainer's auto)")
    p.add_argument("--no-channels-last", action="store_true")
    add_common_args(p)
    return p.parse_args(argv)


class TimedModule(nn.Module):
    """Wraps the teacher: counts its forwards and adds up their wall time (device synchronised)."""

    def __init__(self, inner: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner, self.device = inner, device
        self.seconds, self.calls = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        start = time.perf_counter()
        out = self.inner(x)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def make_trainer(args: argparse.Namespace, student: nn.Module, teacher: nn.Module, bundle: DatasetBundle,
                 out_dir: str) -> Trainer:
    config = TrainConfig(epochs=1, lr=LR, batch_size=args.batch_size, seed=args.seed, device=args.device,
                         amp=False if args.no_amp else None,
                         channels_last=False if args.no_channels_last else None, train_eval_size=0)
    return Trainer(config, create_method(args.method), copy.deepcopy(student), teacher, bundle, out_dir)


def run_side(kind: str, args: argparse.Namespace, students: list[tuple[str, nn.Module]], teacher: TimedModule,
             bundle: DatasetBundle, device: torch.device) -> dict[str, Any]:
    """One timed run of a side ('one_pass' or 'separate'): seconds, teacher seconds and forwards, weights."""
    with tempfile.TemporaryDirectory(prefix=f"bench-multi-{kind}-") as out:  # fresh: never a resume
        trainers = {f"{i}-{name}": make_trainer(args, model, teacher, bundle, f"{out}/{i}")
                    for i, (name, model) in enumerate(students)}
        teacher.reset()
        sync(device)
        start = time.perf_counter()
        if kind == "one_pass":
            MultiTrainer(trainers).fit()
        else:
            for trainer in trainers.values():
                trainer.fit()
        sync(device)
        seconds = time.perf_counter() - start
    first = next(iter(trainers.values()))
    return {"seconds": seconds, "teacher_seconds": teacher.seconds, "teacher_forwards": teacher.calls,
            "amp": first.amp, "channels_last": first.channels_last,
            "weights": {name: plain_state_dict(t.student) for name, t in trainers.items()}}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup(args)
    info = machine_info(device)
    print(describe_machine(info), flush=True)
    names = [s.strip() for s in args.students.split(",") if s.strip()]
    torch.manual_seed(args.seed)
    students = [(name, create_model(name, 10)) for name in names]
    teacher = TimedModule(create_model(args.teacher, 10), device).to(device).eval()
    bundle = cifar_bundle(args.batch_size * args.steps, seed=args.seed)
    k, images = len(names), args.batch_size * args.steps

    if args.warmup > 0:
        warm = cifar_bundle(args.batch_size * args.warmup, seed=args.seed)
        seconds = run_side("one_pass", args, students, teacher, warm, device)["seconds"]
        print(f"  warm-up: {args.warmup} one-pass batch(es), {seconds:.1f} s", flush=True)

    sides = ["one_pass", "separate"]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i in range(args.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            r = run_side(side, args, students, teacher, bundle, device)
            runs[side].append(r)
            print(f"  {side} run {i + 1}/{args.repeats}: {r['seconds']:.1f} s, teacher "
                  f"{r['teacher_forwards']} forwards in {r['teacher_seconds']:.1f} s", flush=True)

    summary: dict[str, dict[str, Any]] = {}
    for side in sides:
        seconds = median([r["seconds"] for r in runs[side]])
        teacher_s = median([r["teacher_seconds"] for r in runs[side]])
        summary[side] = {"seconds": seconds, "teacher_seconds": teacher_s,
                         "teacher_forwards": runs[side][-1]["teacher_forwards"],
                         "student_images_per_s": k * images / seconds, "teacher_share": teacher_s / seconds}
    ratio = summary["separate"]["seconds"] / summary["one_pass"]["seconds"]
    last_one, last_sep = runs["one_pass"][-1], runs["separate"][-1]
    diffs = {name: max_weight_diff(last_one["weights"][name], last_sep["weights"][name])
             for name in last_one["weights"]}
    per_forward = summary["separate"]["teacher_seconds"] / max(summary["separate"]["teacher_forwards"], 1)
    levers = ("bf16" if last_one["amp"] else "fp32") + ("+CL" if last_one["channels_last"] else "")
    result = {"machine": info, "args": vars(args), "data": bundle.note, "students": names, "summary": summary,
              "ratio_separate_over_one_pass": ratio, "teacher_seconds_per_forward": per_forward,
              "max_weight_diff": diffs, "identical": all(d == 0.0 for d in diffs.values())}
    write_json(args.json, result)

    one, sep = summary["one_pass"], summary["separate"]
    print(f"\n{describe_machine(info)}")
    print(f"{k} students ({', '.join(names)}) from teacher {args.teacher}, method {args.method}, {levers}, "
          f"batch {args.batch_size}, {args.steps} steps each; data: {bundle.note}; median of {args.repeats}")
    print(f"teacher forward: {per_forward:.2f} s per batch; share of the time: one pass "
          f"{100 * one['teacher_share']:.1f}% ({one['teacher_forwards']} forwards), separate runs "
          f"{100 * sep['teacher_share']:.1f}% ({sep['teacher_forwards']} forwards)")
    print("students the same either way: " + ("yes (bit for bit)" if result["identical"] else
          "NO, max |weight difference| " + ", ".join(f"{n} {d:.3g}" for n, d in diffs.items())))
    print(f"one pass:      {one['seconds']:.1f} s, {one['student_images_per_s']:.2f} student-images/s")
    print(f"separate runs: {sep['seconds']:.1f} s, {sep['student_images_per_s']:.2f} student-images/s")
    print(f"ratio separate/one-pass: {ratio:.2f}x (saved {sep['seconds'] - one['seconds']:.1f} s; "
          f"{k - 1} teacher forward(s) per batch not run: {(k - 1) * args.steps * per_forward:.1f} s)")
    return result


if __name__ == "__main__":
    main()
