"""What a training step costs per method: AdaAD, ABSLD and the IGDM add-on against RSLAD, in one run.

Each method runs the trainer's own per-step code (``bench.train_step.train_epoch`` over a one-batch
training split: the batch draw, the method's loss, backward, SGD step) on copies of the same student and
teacher and the same images. The methods take turns step by step, in an order rotated each round, so all
see the same machine load; times are medians, and every ratio is against RSLAD's median in this run.

Where the cost comes from: RSLAD's attack runs the student only (T(x) once per batch); AdaAD's runs the
teacher forward and backward at each of its 10 PGD steps, so its extra cost grows with the teacher's
size; ABSLD is RSLAD's step plus per-class bookkeeping; IGDM adds two student and two teacher forwards
(x +- delta) to its host's outer loss.

    python -m bench.method_cost                                   # resnet18 student, wrn_34_10 teacher
    python -m bench.method_cost --teacher resnet18 --batch-size 16 --steps 2      # quicker on a CPU
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import (
    LR,
    add_common_args,
    describe_machine,
    machine_info,
    median,
    random_images,
    setup,
    table,
    timed,
    write_json,
)
from bench.train_step import build_models, one_batch_bundle, train_epoch
from core.methods import create_method
from core.train import TrainConfig, Trainer

# label -> (method, parameters); "+igdm" turns the add-on on at the code's weight (20).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rslad": ("rslad", {}),
    "adaad": ("adaad", {}),
    "absld": ("absld", {}),
    "rslad+igdm": ("rslad", {"igdm_weight": 20.0}),
    "adaad+igdm": ("adaad", {"igdm_weight": 20.0}),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="wrn_34_10")
    p.add_argument("--methods", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--attack-steps", type=int, default=10, help="PGD steps of every method (reference: 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each method first")
    p.add_argument("--steps", type=int, default=2, help="timed steps of each method")
    p.add_argument("--no-amp", action="store_true", help="fp32 (default: bf16 autocast where native)")
    add_common_args(p)
    return p.parse_args(argv)


class MethodStep:
    """One method's trainer over a one-batch split: ``step()`` is one training step."""

    def __init__(self, label: str, student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor,
                 y: torch.Tensor, *, args: argparse.Namespace, device: torch.device) -> None:
        name, params = VARIANTS[label]
        method = create_method(name, **params, steps=args.attack_steps)
        config = TrainConfig(epochs=1, lr=LR, batch_size=len(y), seed=args.seed,
                             amp=False if args.no_amp else None, device=str(device))
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-")
        self.trainer = Trainer(config, method, student, teacher, one_batch_bundle(x, y), self._tmp.name)
        self.epoch = 0

    def step(self) -> float:
        logs = train_epoch(self.trainer, self.epoch)
        self.epoch += 1
        return float(logs["loss"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup(args)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in VARIANTS]
    if unknown or "rslad" not in labels:
        raise SystemExit(f"--methods: rslad is the baseline and must be listed; unknown: {unknown}")
    info = machine_info(device)
    print(f"method_cost: {args.student} student, {args.teacher} teacher, batch {args.batch_size}, "
          f"{args.attack_steps} attack steps; {describe_machine(info)}", flush=True)
    student, teacher = build_models(args.student, args.teacher, device, args.seed)
    x, y = random_images(args.batch_size, device, seed=args.seed)
    sides = {label: MethodStep(label, copy.deepcopy(student), teacher, x, y, args=args, device=device)
             for label in labels}
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(args.warmup + args.steps):
        order = labels[i % len(labels):] + labels[:i % len(labels)]
        for label in order:
            _, seconds = timed(sides[label].step, device)
            print(f"  step {i + 1}/{args.warmup + args.steps} {label}: {seconds:.2f} s"
                  + (" (warm-up)" if i < args.warmup else ""), flush=True)
            if i >= args.warmup:
                times[label].append(seconds)
    base = median(times["rslad"])
    rows = []
    for label in labels:
        seconds = median(times[label])
        rows.append({"method": label, "seconds": seconds, "img_s": args.batch_size / seconds,
                     "cost_vs_rslad": seconds / base, "times": times[label]})
    print()
    print(table(["method", "s/step", "img/s", "time / RSLAD's"],
                [[r["method"], r["seconds"], r["img_s"], r["cost_vs_rslad"]] for r in rows]))
    for r in rows:
        if r["method"] != "rslad":
            print(f"{r['method']} / rslad step time: {r['cost_vs_rslad']:.2f}x")
    result = {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size,
              "attack_steps": args.attack_steps, "amp": sides["rslad"].trainer.amp, "rows": rows,
              "machine": info}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
