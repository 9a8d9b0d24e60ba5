"""Shared pieces of the benchmarks: machine facts, timing, the matmul peak, FLOP counts, data, and the
faithful re-implementation of the reference RSLAD training step (zibojia/RSLAD) that ours is compared with.

Run the benches from the repository root as modules: ``python -m bench.train_step --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from core.data import DatasetBundle, Split
from core.device import resolve_device
from core.train import bf16_supported

CIFAR10_PARTIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-batches-py-partial"

# The reference RSLAD settings (paper section 4.1 and the reference code).
EPS = 8 / 255
STEP_SIZE = 2 / 255
ATTACK_STEPS = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 2e-4


# ----- command line and machine -------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every bench takes: device, threads, seed, JSON output."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --seed; return the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return resolve_device(args.device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cpu":
        info["mkldnn_bf16"] = bf16_supported(device)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    bf16 = ""
    if "mkldnn_bf16" in info:
        bf16 = f", bf16 {'native (oneDNN)' if info['mkldnn_bf16'] else 'not native'}"
    return (f"device {info['device']} ({info['device_name']}), torch {info['torch']}, "
            f"{info['torch_threads']} threads, {info['cpu_cores']} cores{bf16}")


# ----- timing -------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), wall seconds), with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """TFLOP/s of the fastest n x n x n matmul: the machine's practical peak for that dtype.

    The fastest of ``repeats`` runs, not the median, since other load only ever slows a run down; without
    ``n``, the best over a few sizes (1024 and 2048 on a CPU, 4096 and 8192 on a GPU), since the size
    that reaches the peak differs between dtypes and machines.
    """
    sizes = [n] if n else ([4096, 8192] if device.type == "cuda" else [1024, 2048])
    best = 0.0
    for size in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, dtype=torch.float32, generator=gen).to(dtype)
        b = torch.randn(size, size, device=device, dtype=torch.float32, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up (kernel selection, page faults)
        times = [timed(lambda a=a, b=b: torch.mm(a, b), device)[1] for _ in range(repeats)]
        best = max(best, 2.0 * size**3 / min(times) / 1e12)
    return best


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break ``torch.autograd.grad``
    with respect to a leaf input (the attack's gradient); only the global total is wanted here."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each of a convolution's two backward products (grad input, grad weight) costs what its forward
    costs. torch's own formula ignores ``groups`` for the weight gradient and so counts a depthwise
    convolution's weight gradient (MobileNetV2) C times too high."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul and convolution FLOPs (forward and backward) that fn() executes."""
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


# ----- data ---------------------------------------------------------------------------------------------

def load_cifar10(n: int, *, test: bool = False, root: Path = CIFAR10_PARTIAL, seed: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to n real CIFAR-10 images (uint8 NHWC, int64 labels) from the partial pickles, topped up with
    random images when there are fewer (or none); the third value says which."""
    files = ["test_batch"] if test else [f"data_batch_{i}" for i in range(1, 6)]
    xs, ys = [], []
    for name in files:
        path = root / name
        if not path.exists() or sum(len(y) for y in ys) >= n:
            continue
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(entry["labels"], dtype=np.int64))
    real = sum(len(y) for y in ys)
    source = f"{min(real, n)} real CIFAR-10 images from {root}" if real else "random images"
    if real < n:
        rng = np.random.default_rng(seed)
        xs.append(rng.integers(0, 256, size=(n - real, 32, 32, 3), dtype=np.uint8))
        ys.append(rng.integers(0, 10, size=n - real, dtype=np.int64))
        if real:
            source += f" + {n - real} random"
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n], source


def numpy_split(x: np.ndarray, y: np.ndarray) -> Split:
    """uint8 NHWC + int64 arrays -> a core ``Split`` (uint8 NCHW tensors)."""
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y))


def cifar_bundle(n_train: int, n_val: int = 0, *, seed: int = 0) -> DatasetBundle:
    """A core ``DatasetBundle`` of the first n_train + n_val CIFAR-10 training images (see load_cifar10);
    the validation split is also the test split; ``note`` says where the images came from."""
    x, y, source = load_cifar10(n_train + n_val, seed=seed)
    train, val = numpy_split(x[:n_train], y[:n_train]), numpy_split(x[n_train:], y[n_train:])
    return DatasetBundle("bench", 10, train, val, val, source)


def random_images(n: int, device: torch.device, seed: int = 0, num_classes: int = 10,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped float images in [0, 1] (contiguous NCHW) and int64 labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return x.to(device), y.to(device)


# ----- the reference RSLAD step (zibojia/RSLAD, rslad_loss.py + rslad_train.py) -------------------------

def reference_kl(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """The reference's ``kl_loss(log_softmax(S), softmax(T))`` then ``torch.mean``: element-wise mean."""
    a = F.log_softmax(logits, dim=1)
    b = teacher_probs
    return torch.mean(-a * b + torch.log(b + 1e-5) * b)


def reference_rslad_inner(model: nn.Module, teacher_logits: torch.Tensor, x_natural: torch.Tensor, *,
                          step_size: float = STEP_SIZE, epsilon: float = EPS,
                          perturb_steps: int = ATTACK_STEPS, generator: torch.Generator | None = None,
                          ) -> torch.Tensor:
    """The reference ``rslad_inner_loss``: KL-PGD from x + 0.001 N(0, 1), student in eval mode; returns the
    student's train-mode logits on x_adv. ``generator`` replaces the global RNG so runs can be paired."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    noise = torch.randn(x_natural.shape, generator=generator, device=x_natural.device, dtype=x_natural.dtype)
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = x_adv.detach().requires_grad_(False)
    return model(x_adv)


def reference_optimizer(student: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def reference_rslad_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                         x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One iteration of the reference training loop: fp32, eager, NCHW, no autocast. Returns the loss."""
    student.train()
    teacher.eval()
    optimizer.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(x)
    adv_logits = reference_rslad_inner(student, teacher_logits, x, generator=generator)
    student.train()
    nat_logits = student(x)
    kl_loss1 = reference_kl(adv_logits, F.softmax(teacher_logits.detach(), dim=1))
    kl_loss2 = reference_kl(nat_logits, F.softmax(teacher_logits.detach(), dim=1))
    loss = 5 / 6.0 * kl_loss1 + 1 / 6.0 * kl_loss2
    loss.backward()
    optimizer.step()
    return loss.detach()


def reference_attack_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack_iters: int = 20,
                         step_size: float = 0.003, epsilon: float = EPS) -> torch.Tensor:
    """The reference's validation attack (``attack_pgd`` in rslad_loss.py, called with 20 steps of 0.003):
    mean cross entropy from a uniform start, ``loss.backward()`` (which also fills the weights' .grad,
    as the reference does), clip to [0, 1] then to the eps ball. fp32; the caller sets eval mode."""
    x_adv = x.detach() + torch.zeros_like(x).uniform_(-epsilon, epsilon)
    x_adv = torch.clamp(x_adv, 0, 1)
    for _ in range(attack_iters):
        x_adv.requires_grad_()
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        grad = x_adv.grad.detach()
        x_adv = x_adv + step_size * torch.sign(grad)
        x_adv = torch.clamp(x_adv.detach(), 0, 1)
        pert = torch.clamp(x_adv - x, -epsilon, epsilon)
        x_adv = (x + pert).detach()
    return x_adv


# ----- output -------------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with the columns padded to line up in a terminal."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
