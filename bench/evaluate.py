"""Evaluation: the attack suite through ``core.evaluate.evaluate_model`` against a naive per-attack loop.

Every attack runs on the same first ``--n`` test images (real CIFAR-10 test images when present), in
fp32, eps 8/255. Ours: ``evaluate_model`` at each of ``--batch-sizes`` (256 is the pipeline's default);
its attacks freeze the weights, so no weight gradient is ever computed. Naive: the loop the reference
repositories write, one attack at a time over batches of ``--naive-batch-size`` (128, the reference's
test loader): ``loss.backward()`` on the mean cross entropy (IAD's summed CW loss for cw_inf), which also
computes and accumulates the weights' gradients, and a final forward with autograd on. The naive loop
draws its random starts exactly as ours does (same seed, same formula), so the accuracies must be
identical: speed-ups must never change a robust accuracy. Only clean, fgsm, pgd_sat, pgd_trades and cw_inf
have a naive version; other attacks (aa, square, transfer) are timed for ours only.

    python -m bench.evaluate                                   # resnet18, random weights, 128 images
    python -m bench.evaluate --batch-sizes 128,256,512 --n 512
    python -m bench.evaluate --model abcrown_resnet4b --normalize cifar10 \\
        --checkpoint ../shared/weights/abcrown_cifar10_resnet4b_adv2px.pth   # a robust model
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    add_common_args,
    describe_machine,
    load_cifar10,
    machine_info,
    median,
    setup,
    table,
    timed,
    write_json,
)
from core.attacks import ATTACKS
from core.evaluate import evaluate_model
from core.models import create_model
from core.teachers import load_model_file

DEFAULT_ATTACKS = "clean,fgsm,pgd_sat,pgd_trades,cw_inf"
NAIVE = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf")
EPS = 8 / 255


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18",
                   help="architecture name (random weights unless --checkpoint)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="weights for --model (any format core loads)")
    p.add_argument("--normalize", default=None,
                   help="the checkpoint's input normalisation ('cifar10' or 'mean;std'), if it expects one")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS, help="comma-separated; add aa for AutoAttack")
    p.add_argument("--n", type=int, default=128, help="test images")
    p.add_argument("--batch-sizes", default="256", help="ours' batch sizes, comma-separated")
    p.add_argument("--naive-batch-size", type=int, default=128, help="0 skips the naive loop")
    p.add_argument("--repeats", type=int, default=1, help="passes (medians reported)")
    add_common_args(p)
    return p.parse_args(argv)


def load_model(args: argparse.Namespace) -> nn.Module:
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
        return create_model(args.model, 10)
    return load_model_file(args.checkpoint, arch=args.model, num_classes=10, normalize=args.normalize).model


# ----- the naive loop ------------------------------------------------------------------------------------

def _cw_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """IAD's ``cwloss``: -clamp(z_y - max_{j != y} z_j + kappa, min=0), summed."""
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    real = (onehot * logits).sum(1)
    other = ((1.0 - onehot) * logits - onehot * 10000.0).max(1)[0]
    return -torch.clamp(real - other + kappa, min=0.0).sum()


def naive_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """One attack on one batch, written the plain way (fp32, weights not frozen, ``loss.backward()``)."""
    settings = ATTACKS[name].defaults
    if name == "clean":
        return x
    if name == "fgsm":
        x_adv = x.clone().requires_grad_()
        F.cross_entropy(model(x_adv), y).backward()
        x_adv = x + EPS * torch.sign(x_adv.grad)
        return torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    steps, step_size = int(settings["steps"]), float(settings["step_size"])

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        if name == "cw_inf":
            return _cw_loss(logits, y, float(settings["kappa"]))
        return F.cross_entropy(logits, y)

    # The random start exactly as core draws it (uniform in the eps box, clipped), so that the two see the
    # same starts; the weights' .grad accumulates over the steps, as in the reference's attack_pgd.
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    x_adv = (x + EPS * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_()
        loss_fn(model(x_adv)).backward()
        x_adv = x_adv.detach() + step_size * torch.sign(x_adv.grad)
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    return x_adv.detach()


def naive_suite(model: nn.Module, x8: torch.Tensor, y: torch.Tensor, attacks: Sequence[str], *,
                batch_size: int, seed: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """attack -> {seconds, accuracy}, each attack timed on its own, the weights requiring gradients."""
    out: dict[str, dict[str, Any]] = {}
    model.eval()
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:  # as a freshly built model has them (a loaded teacher file comes frozen)
        p.requires_grad_(True)
    for name in attacks:
        generator = torch.Generator(device=device).manual_seed(seed)

        def run(name: str = name, generator: torch.Generator = generator) -> torch.Tensor:
            correct = []
            for lo in range(0, len(y), batch_size):
                xb = x8[lo:lo + batch_size].to(device).float().div_(255.0)
                yb = y[lo:lo + batch_size].to(device)
                x_adv = naive_attack(name, model, xb, yb, generator)
                correct.append(model(x_adv).argmax(1) == yb)
            return torch.cat(correct).cpu()

        correct, seconds = timed(run, device)
        model.zero_grad(set_to_none=True)
        out[name] = {"seconds": seconds, "accuracy": int(correct.sum()) / len(correct)}
    for p, requires_grad in saved:
        p.requires_grad_(requires_grad)
    return out


# ----- main ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = setup(args)
    info = machine_info(device)
    print(describe_machine(info), flush=True)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    x_np, y_np, source = load_cifar10(args.n, test=True, seed=args.seed)
    x8 = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())  # uint8 NCHW, as the evaluator takes it
    y = torch.from_numpy(y_np)
    n = len(y)
    model = load_model(args).to(device).float()
    naive_attacks = [a for a in attacks if a in NAIVE] if args.naive_batch_size > 0 else []

    sides: list[tuple[str, Callable[[], dict[str, dict[str, Any]]]]] = []
    for bs in batch_sizes:
        def ours(bs: int = bs) -> dict[str, dict[str, Any]]:
            report = evaluate_model(model, x8, y, attacks, n_examples=n, batch_size=bs, device=device,
                                    seed=args.seed)
            return {r["attack"]: {"seconds": float(r["seconds"]), "accuracy": float(r["accuracy"])}
                    for r in report["rows"]}
        sides.append((f"ours, batch {bs}", ours))
    if naive_attacks:
        sides.append((f"naive, batch {args.naive_batch_size}",
                      lambda: naive_suite(model, x8, y, naive_attacks, batch_size=args.naive_batch_size,
                                          seed=args.seed, device=device)))

    seconds: dict[str, dict[str, list[float]]] = {label: {} for label, _ in sides}
    accuracy: dict[str, dict[str, float]] = {label: {} for label, _ in sides}
    for i in range(args.repeats):
        for label, run in sides if i % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            rows = run()
            for attack, row in rows.items():
                seconds[label].setdefault(attack, []).append(row["seconds"])
                if attack in accuracy[label] and accuracy[label][attack] != row["accuracy"]:
                    print(f"  note: {label} {attack} accuracy changed between passes", flush=True)
                accuracy[label][attack] = row["accuracy"]
            print(f"  {label} pass {i + 1}/{args.repeats} ({time.perf_counter() - t0:.1f} s): "
                  + ", ".join(f"{a} {rows[a]['seconds']:.1f} s" for a in rows), flush=True)

    med = {label: {a: median(v) for a, v in per.items()} for label, per in seconds.items()}
    ours_labels = [label for label, _ in sides if label.startswith("ours")]
    naive_label = next((label for label, _ in sides if label.startswith("naive")), None)
    baseline = ours_labels[0]
    identical = {a: len({accuracy[label][a] for label in accuracy if a in accuracy[label]}) == 1
                 for a in attacks}
    result = {"machine": info, "args": vars(args), "data": source, "n": n, "seconds": med,
              "accuracy": accuracy, "accuracy_identical": identical, "all_identical": all(identical.values())}
    write_json(args.json, result)

    print(f"\n{describe_machine(info)}")
    print(f"model {args.model} ({args.checkpoint or 'random weights'}), {n} test images ({source}), fp32, "
          f"eps 8/255, median of {args.repeats} pass(es)")
    labels = ours_labels + ([naive_label] if naive_label else [])
    print("seconds per attack:")
    print(table(["attack", *labels, "images/s (ours, first batch size)"],
                [[a, *[f"{med[label][a]:.2f}" if a in med[label] else "n/a" for label in labels],
                  f"{n / max(med[baseline][a], 1e-9):.1f}"] for a in attacks]))
    print("accuracy:")

    def pct(label: str, a: str) -> str:
        return f"{100 * accuracy[label][a]:.2f}%" if a in accuracy[label] else "n/a"

    print(table(["attack", *labels, "identical"],
                [[a, *[pct(label, a) for label in labels], "yes" if identical[a] else "NO"]
                 for a in attacks]))
    totals = {label: sum(med[label][a] for a in naive_attacks or attacks) for label in labels}
    for label in ours_labels:
        line = f"{label}: whole suite {sum(med[label].values()):.1f} s"
        if naive_label:
            ratio = totals[naive_label] / max(totals[label], 1e-9)
            line += (f"; on the attacks the naive loop has, {totals[label]:.1f} s vs naive "
                     f"{totals[naive_label]:.1f} s: ratio naive/ours {ratio:.2f}x")
        print(line)
    if naive_label:
        for a in naive_attacks:
            ratio = med[naive_label][a] / max(med[baseline][a], 1e-9)
            print(f"  {a}: ratio naive/ours ({baseline}) {ratio:.2f}x")
    print("robust accuracy identical across ours' batch sizes and the naive loop: "
          + ("yes" if result["all_identical"] else "NO (" + ", ".join(a for a in attacks if not identical[a])
                                                    + ")"))
    return result


if __name__ == "__main__":
    main()
