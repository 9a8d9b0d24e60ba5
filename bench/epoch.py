"""One whole RSLAD epoch, data loading, augmentation and per-epoch validation included: ours against the
reference loop.

Reference (zibojia/RSLAD resnet18_rslad_cifar10.py): a torchvision CIFAR-style Dataset over uint8 arrays
(a PIL image per item, RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor on the CPU), a DataLoader with
``--num-workers`` workers (2 in the reference) and shuffle, the reference step (bench/common.py) per
batch, then its validation: ``attack_pgd`` (PGD-20, step 0.003, mean cross entropy, ``loss.backward()``)
on the validation images in batches of ``--batch-size``, accuracy, and ``torch.save`` of the student.
(The reference validates every 20th epoch before epoch 215 and every epoch after; here every epoch.)
Ours: ``core.train.Trainer.fit()`` for one epoch on resident uint8 tensors with augmentation on the
device, bf16 autocast and channels_last where bf16 is native (``--no-amp``, ``--no-channels-last``),
then its own validation (clean accuracy + PGD-20 fp32 on the validation images, clean accuracy on up to
1000 training images) and its checkpoint files. Ours does a little more validation work than the
reference. The sides alternate epoch by epoch; seconds per epoch are medians over ``--repeats``.

    python -m bench.epoch                                    # resnet18, WRN-34-10 teacher, 512 + 128 images
    python -m bench.epoch --teacher resnet18 --n-train 256   # a quick run
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from bench.common import (
    LR,
    add_common_args,
    describe_machine,
    load_cifar10,
    machine_info,
    median,
    numpy_split,
    reference_attack_pgd,
    reference_optimizer,
    reference_rslad_step,
    setup,
    sync,
    table,
    timed,
    write_json,
)
from core.data import DatasetBundle
from core.methods import create_method
from core.models import create_model
from core.train import TrainConfig, Trainer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="resnet18", help="comma-separated student names")
    p.add_argument("--teacher", default="wrn_34_10", help="wrn_34_10 (the paper's); resnet18 for a quick run")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-batch-size", type=int, default=256,
                   help="ours' validation batch (the trainer's default); the reference validates in batches "
                        "of --batch-size, as its code does")
    p.add_argument("--num-workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--repeats", type=int, default=1, help="epochs timed per side")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    add_common_args(p)
    return p.parse_args(argv)


class CIFARArray(Dataset):
    """torchvision's CIFAR10 ``__getitem__`` over in-memory arrays: uint8 HWC -> PIL -> transform."""

    def __init__(self, data: np.ndarray, targets: np.ndarray, transform: Any) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[index])
        return self.transform(img), int(self.targets[index])


def reference_epoch(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                    train: DataLoader, val: DataLoader, device: torch.device, out_dir: str,
                    ) -> dict[str, float]:
    """The reference loop's epoch: the step on every batch, then robust accuracy (``attack_pgd``, PGD-20 of
    0.003) on ``val`` and a ``torch.save`` of the student, as the reference does after a validated epoch."""
    start = time.perf_counter()
    for x, _y in train:
        student.train()
        reference_rslad_step(student, teacher, optimizer, x.float().to(device))
    sync(device)
    train_seconds = time.perf_counter() - start
    student.eval()
    correct = total = 0
    for x, y in val:
        x, y = x.to(device), y.to(device)
        x_adv = reference_attack_pgd(student, x, y, attack_iters=20, step_size=0.003)
        logits = student(x_adv)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    torch.save(student.state_dict(), os.path.join(out_dir, "student.pth"))
    return {"train_seconds": train_seconds, "val_robust_acc": correct / total}


def ours_epoch(student: nn.Module, teacher: nn.Module, bundle: DatasetBundle, args: argparse.Namespace,
               ) -> dict[str, Any]:
    """One epoch of the real trainer (fresh output folder, so no resume)."""
    config = TrainConfig(epochs=1, lr=LR, batch_size=args.batch_size, val_batch_size=args.val_batch_size,
                         seed=args.seed, amp=False if args.no_amp else None,
                         channels_last=False if args.no_channels_last else None, device=args.device)
    with tempfile.TemporaryDirectory(prefix="bench-epoch-") as out:
        trainer = Trainer(config, create_method("rslad"), student, teacher, bundle, out)
        result = trainer.fit()
    metrics = result["history"][-1]
    return {"train_seconds": metrics["train_seconds"], "val_clean_acc": metrics.get("val_clean_acc"),
            "val_robust_acc": metrics.get("val_robust_acc"),
            "amp": trainer.amp, "channels_last": trainer.channels_last}


def time_student(name: str, args: argparse.Namespace, device: torch.device, data: dict[str, Any],
                 ) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    student0, teacher = create_model(name, 10), create_model(args.teacher, 10).to(device)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor()])
    train_loader = DataLoader(CIFARArray(data["x_train"], data["y_train"], transform),
                              batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    val_loader = DataLoader(CIFARArray(data["x_val"], data["y_val"], transforms.ToTensor()),
                            batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    val_split = numpy_split(data["x_val"], data["y_val"])
    bundle = DatasetBundle("bench", 10, numpy_split(data["x_train"], data["y_train"]), val_split, val_split,
                           data["source"])
    ref_student = copy.deepcopy(student0).to(device)
    ref_optimizer = reference_optimizer(ref_student)
    ref_out = tempfile.TemporaryDirectory(prefix="bench-epoch-ref-")
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    last: dict[str, Any] = {}
    for i in range(args.repeats):
        ours_student = copy.deepcopy(student0)  # a fresh student each time, copied outside the timing
        sides = [
            ("reference", lambda: reference_epoch(ref_student, teacher, ref_optimizer, train_loader,
                                                  val_loader, device, ref_out.name)),
            ("ours", lambda s=ours_student: ours_epoch(s, teacher, bundle, args)),
        ]
        for label, run in sides if i % 2 == 0 else sides[::-1]:
            last[label], seconds = timed(run, device)
            times[label].append(seconds)
            print(f"  {name} epoch {i + 1}/{args.repeats} {label}: {seconds:.1f} s", flush=True)
    ref_out.cleanup()
    t_ref, t_ours = median(times["reference"]), median(times["ours"])
    return {"student": name, "teacher": args.teacher, "reference_s": t_ref, "ours_s": t_ours,
            "reference_times": times["reference"], "ours_times": times["ours"], "speedup": t_ref / t_ours,
            "amp": last["ours"]["amp"], "channels_last": last["ours"]["channels_last"],
            "reference_metrics": last["reference"], "ours_metrics": last["ours"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup(args)
    info = machine_info(device)
    print(describe_machine(info), flush=True)
    x, y, source = load_cifar10(args.n_train + args.n_val, seed=args.seed)
    data = {"x_train": x[:args.n_train], "y_train": y[:args.n_train], "x_val": x[args.n_train:],
            "y_val": y[args.n_train:], "source": source}
    names = [name.strip() for name in args.students.split(",") if name.strip()]
    rows = [time_student(name, args, device, data) for name in names]
    result = {"machine": info, "args": vars(args), "data": source, "rows": rows}
    write_json(args.json, result)

    print(f"\n{describe_machine(info)}")
    print(f"data: {source}; {args.n_train} training images, {args.n_val} validation images, batch "
          f"{args.batch_size}, teacher {args.teacher}, reference DataLoader with {args.num_workers} workers")
    print(table(["student", "ours levers", "reference s/epoch", "ours s/epoch", "ratio",
                 "reference s training", "ours s training"],
                [[r["student"], ("bf16" if r["amp"] else "fp32") + ("+CL" if r["channels_last"] else ""),
                  r["reference_s"], r["ours_s"], f"{r['speedup']:.2f}x",
                  r["reference_metrics"]["train_seconds"], r["ours_metrics"]["train_seconds"]]
                 for r in rows]))
    print("(s training: the training steps only, data loading included, of the last epoch timed; the rest "
          "of an epoch is validation and checkpoints)")
    for r in rows:
        ref_rate = args.n_train / r["reference_s"]
        print(f"{r['student']}: reference {r['reference_s']:.1f} s/epoch ({ref_rate:.2f} "
              f"train img/s), ours {r['ours_s']:.1f} s/epoch ({args.n_train / r['ours_s']:.2f} train img/s), "
              f"ratio reference/ours {r['speedup']:.2f}x (median of {args.repeats})")
        ref_train, ours_train = r["reference_metrics"]["train_seconds"], r["ours_metrics"]["train_seconds"]
        print(f"{r['student']}, training steps only: reference {ref_train:.1f} s, ours {ours_train:.1f} s, "
              f"ratio reference/ours {ref_train / ours_train:.2f}x")
    return result


if __name__ == "__main__":
    main()
