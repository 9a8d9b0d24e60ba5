"""Robust accuracy of one model under a suite of attacks, and a sanity check of how the numbers are ordered.

Every attack sees the same examples (the first ``n_examples``, in order), in fp32 with the model in eval
mode, so the rows of one report can be compared with each other. A stronger attack that does worse than
a weaker one, or any attack that does better than no attack, is the classic symptom of gradient masking:
``check_ordering`` turns such inversions into warnings instead of letting them pass as robustness.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from core.attacks import ATTACKS, Attack, create_attack
from core.device import resolve_device
from core.errors import Cancelled, ConfigError, DataError
from core.exported import ONNX_ONLY_CLEAN
from core.guardrails import CHANCE_Z, MIN_CONCLUSIVE_N, at_chance
from core.stats import encode_bits, rounded_interval

# attack -> attacks it is at least as strong as, on the same examples. Not listed on purpose: PGD versus
# FGSM (a PGD run from a random start is not guaranteed to beat the single FGSM step on every model).
# Every attack is also at least as strong as "clean".
# attack -> the attacks it must never do worse than. AutoAttack's cascade contains APGD on CE and Square, and
# an iterative PGD on the same loss and budget should beat one FGSM step: "iterative attacks do worse than
# single-step ones" is a classic sign of gradient masking (Athalye et al., 2018).
STRONGER_THAN: dict[str, tuple[str, ...]] = {
    "aa": ("pgd_sat", "pgd_trades", "cw_inf", "fgsm", "square"),
    "pgd_sat": ("fgsm",),
    "pgd_trades": ("fgsm",),
}


def check_ordering(
    rows: Sequence[dict[str, Any]], *, tolerance: float = 0.0, slack_examples: int = 0
) -> list[str]:
    """Warnings for every robust accuracy above the clean accuracy or above that of a weaker attack.

    Rows are compared only when they were measured on the same number of examples (and, for two attacks,
    at the same eps); ``tolerance`` is an allowance in accuracy units (0.01 = one percentage point), plus
    ``slack_examples`` examples of the rows' n.
    """
    by_name = {row["attack"]: row for row in rows}
    messages: list[str] = []
    clean = by_name.get("clean")
    for row in rows:
        name, accuracy = row["attack"], float(row["accuracy"])
        if name == "clean":
            continue
        allowance = tolerance + slack_examples / max(int(row["n"]), 1) + 1e-12
        if clean is not None and clean["n"] == row["n"] and accuracy > float(clean["accuracy"]) + allowance:
            messages.append(
                f"{name} accuracy {accuracy:.2%} is above the clean accuracy {float(clean['accuracy']):.2%}: "
                f"an attack should never help the model; this may indicate gradient masking")
        for weaker in STRONGER_THAN.get(name, ()):
            other = by_name.get(weaker)
            if other is None or other["n"] != row["n"] or other.get("eps") != row.get("eps"):
                continue
            weaker_accuracy = float(other["accuracy"])
            if accuracy > weaker_accuracy + allowance:
                messages.append(
                    f"{name} accuracy {accuracy:.2%} is above {weaker} accuracy {weaker_accuracy:.2%}: "
                    f"the stronger attack should never do worse; this may indicate gradient masking")
    return messages


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DataError(f"images must be a tensor of shape (N, C, H, W), got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels must be a 1-d tensor with one label per image ({x.shape[0]}), got "
                        f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise DataError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
        if x.numel() and (x.min().item() < 0.0 or x.max().item() > 1.0):
            raise DataError("float images must lie in [0, 1] (normalisation belongs inside the model, "
                            f"e.g. core.teachers.Normalized); got range [{x.min().item():.3g}, "
                            f"{x.max().item():.3g}]")


def _build_attacks(model: nn.Module, attacks: Sequence[str], eps: float, surrogate: nn.Module | None,
                   attack_kwargs: dict[str, dict[str, Any]], seed: int | None) -> list[Attack]:
    """Every attack built before any runs, so a typo fails in a second rather than after hours of AA."""
    if isinstance(attacks, str) or not attacks:
        raise ConfigError(f"attacks must be a non-empty list of names from: {', '.join(ATTACKS)}")
    duplicates = sorted({a for a in attacks if list(attacks).count(a) > 1})
    if duplicates:
        raise ConfigError(f"attack(s) listed twice: {', '.join(duplicates)}")
    stray = sorted(set(attack_kwargs) - set(attacks))
    if stray:
        raise ConfigError(f"attack_kwargs for attack(s) not being run: {', '.join(stray)}")
    built = []
    for name in attacks:
        kwargs = dict(attack_kwargs.get(name, {}))
        if "generator" not in kwargs:
            kwargs.setdefault("seed", seed)
        if name == "transfer" and surrogate is not None:
            kwargs.setdefault("surrogate", surrogate)
        built.append(create_attack(name, model, 0.0 if name == "clean" else eps, **kwargs))
    return built


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[str], *,
                   eps: float = 8 / 255, n_examples: int | None = None, batch_size: int = 256,
                   device: str | torch.device = "cpu", surrogate: nn.Module | None = None,
                   attack_kwargs: dict[str, dict[str, Any]] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   on_progress: Callable[[dict[str, Any]], None] | None = None,
                   seed: int | None = 0) -> dict[str, Any]:
    """Accuracy of ``model`` on (x, y) under each attack in ``attacks``, in the order given.

    Returns ``{"rows": [row, ...], "warnings": [...], "ordering_ok": bool, "degenerate": bool}``. A row:
    ``attack``, ``accuracy`` (a fraction in [0, 1]), ``n``, ``correct``, ``ci95`` (its 95% Wilson interval),
    ``eps``, ``settings``, ``seconds``, ``per_class`` / ``worst_class`` (``class_breakdown``),
    ``examples`` ({n, sha256 of the evaluated images and labels (``examples_fingerprint``), order}) and
    ``correct_bits`` (which of the n examples were still classified correctly after the attack:
    ``core.stats.encode_bits``, example i = the i-th test example), what ``python -m core compare``
    reads. ``seed`` seeds every attack's randomness
    (random starts, Square, AutoAttack) unless ``attack_kwargs[name]`` gives its own seed or generator.
    ``should_stop()`` is polled before every batch and raises ``Cancelled`` when it returns True;
    ``on_progress`` receives ``{"type": "progress", "attack", "done", "total", "fraction"}`` after each.
    """
    _check_data(x, y)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if n_examples is not None and (not isinstance(n_examples, int) or n_examples < 1):
        raise ConfigError(f"n_examples must be a positive integer or None, got {n_examples!r}")
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    non_fp32 = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()} - {"torch.float32"})
    if non_fp32:
        raise ConfigError(f"evaluation runs in fp32 but the model has {', '.join(non_fp32)} parameters; "
                          "pass model.float()")

    warnings: list[str] = []
    n = x.shape[0] if n_examples is None else min(n_examples, x.shape[0])
    if n_examples is not None and n_examples > x.shape[0]:
        warnings.append(f"asked for {n_examples} examples but only {x.shape[0]} are available; using all")
    if n == 0:
        raise DataError("no examples to evaluate")
    x, y = x[:n], y[:n].long()

    model.to(device)
    if surrogate is not None:
        surrogate.to(device)
    was_training = model.training
    with torch.no_grad():
        model.eval()
        num_classes = model(torch.zeros_like(x[:1], dtype=torch.float32, device=device)).shape[1]
    if y.min().item() < 0 or y.max().item() >= num_classes:
        raise DataError(f"labels must be in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
                        f"got [{y.min().item()}, {y.max().item()}]")
    if getattr(model, "supports_gradients", True) is False and any(a != "clean" for a in attacks):
        raise ConfigError(ONNX_ONLY_CLEAN)  # a forward-only model (core.exported.OnnxModel)
    built = _build_attacks(model, attacks, eps, surrogate, dict(attack_kwargs or {}), seed)

    fingerprint = examples_fingerprint(x, y)
    rows: list[dict[str, Any]] = []
    try:
        for index, attack in enumerate(built):
            started = time.perf_counter()
            bits = torch.zeros(n, dtype=torch.bool)
            for lo in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"evaluation cancelled during {attack.name}")
                hi = min(lo + batch_size, n)
                _, still_correct = attack.run(x[lo:hi].to(device), y[lo:hi].to(device))
                bits[lo:hi] = still_correct.detach().to("cpu", torch.bool).reshape(-1)
                if on_progress is not None:
                    on_progress({"type": "progress", "attack": attack.name, "done": hi, "total": n,
                                 "fraction": (index + hi / n) / len(built)})
            seconds = round(time.perf_counter() - started, 3)
            correct = int(bits.sum().item())
            rows.append({"attack": attack.name, "accuracy": correct / n, "n": n, "correct": correct,
                         "ci95": rounded_interval(correct, n), "eps": attack.eps,
                         "settings": dict(attack.settings), "seconds": seconds,
                         **class_breakdown(bits, y, num_classes),
                         "examples": {"n": n, "sha256": fingerprint, "order": EXAMPLE_ORDER},
                         "correct_bits": encode_bits(bits.numpy())})
            warnings.extend(w for w in attack.warnings if w not in warnings)
    finally:
        model.train(was_training)

    # One example either way is within what a random start moves (a stronger attack is stronger on
    # average, not on every example); two or more are flagged.
    ordering = check_ordering(rows, slack_examples=1)
    degenerate = check_degenerate(rows, num_classes, majority_share=_majority_share(y))
    return {"rows": rows, "warnings": warnings + ordering + degenerate, "ordering_ok": not ordering,
            "degenerate": bool(degenerate)}


EXAMPLE_ORDER = "the first n examples of the test split, in order"
# per_class lists every class up to this many; past it only the WORST_KEPT worst (and a note says so)
MAX_PER_CLASS = 1000
WORST_KEPT = 20


def examples_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 over the evaluated images (dtype, shape, bytes) and their int64 labels, in order.

    Two reports are comparable example by example only when their fingerprints (and n) are equal, so
    rows measured on other images, another order or other labels can never be compared by mistake.
    """
    digest = hashlib.sha256()
    images = x.detach().to("cpu").contiguous()
    digest.update(f"images {images.dtype} {tuple(images.shape)}\n".encode())
    digest.update(images.numpy())
    labels = y.detach().to("cpu", torch.int64).contiguous()
    digest.update(f"labels {tuple(labels.shape)}\n".encode())
    digest.update(labels.numpy())
    return digest.hexdigest()


def class_breakdown(bits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """``per_class`` (class -> {accuracy, n, correct}, for the classes present) and ``worst_class``.

    The worst class is the present class with the lowest accuracy (ties: the smallest class index), with
    its n and 95% Wilson interval; with few examples per class it is noisy, which the interval shows.
    Size bound: up to ``MAX_PER_CLASS`` classes every present class is listed; beyond, only the
    ``WORST_KEPT`` worst, and ``per_class_note`` says so (a report stays small for any label count).
    """
    labels = y.detach().to("cpu", torch.int64)
    counts = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=bits.to(torch.float64), minlength=num_classes).round().long()
    present = [k for k in range(num_classes) if int(counts[k]) > 0]
    stats = {k: (int(hits[k]), int(counts[k])) for k in present}
    order = sorted(present, key=lambda k: (stats[k][0] / stats[k][1], k))
    kept = present if num_classes <= MAX_PER_CLASS else sorted(order[:WORST_KEPT])
    out: dict[str, Any] = {"per_class": {str(k): {"accuracy": stats[k][0] / stats[k][1], "n": stats[k][1],
                                                  "correct": stats[k][0]} for k in kept}}
    if num_classes > MAX_PER_CLASS:
        out["per_class_note"] = (f"{num_classes} classes: only the {len(kept)} worst are listed "
                                 f"(every class up to {MAX_PER_CLASS})")
    worst = order[0]
    correct, n = stats[worst]
    out["worst_class"] = {"class": worst, "accuracy": correct / n, "n": n, "correct": correct,
                          "ci95": rounded_interval(correct, n)}
    return out


def _majority_share(y: torch.Tensor) -> float:
    return float(torch.bincount(y.cpu()).max()) / len(y) if len(y) else 0.0


def check_degenerate(rows: Sequence[dict[str, Any]], num_classes: int, *,
                     majority_share: float = 0.0) -> list[str]:
    """Warnings for an evaluation whose robust numbers mean nothing: clean accuracy at chance
    (``core.guardrails.at_chance``), or every attack's accuracy equal to the clean accuracy at the level
    of always answering one class (a constant classifier, which no attack can move)."""
    clean = next((r for r in rows if r["attack"] == "clean"), None)
    if clean is None:
        return []
    accuracy, n = float(clean["accuracy"]), int(clean["n"])
    attacked = [r for r in rows if r["attack"] != "clean" and int(r["n"]) == n]
    what = " and robust" if attacked else ""
    if at_chance(accuracy, n, num_classes):
        return [f"clean accuracy {accuracy:.2%} on {n} images is chance level for {num_classes} classes: the "
                f"model is no better than guessing, so its clean{what} numbers are meaningless"]
    spread = math.sqrt(max(majority_share * (1 - majority_share), 1e-12) / max(n, 1))
    one_class = majority_share + CHANCE_Z * spread
    if (n >= MIN_CONCLUSIVE_N and attacked and accuracy <= one_class
            and all(float(r["accuracy"]) == accuracy for r in attacked)):
        names = ", ".join(r["attack"] for r in attacked)
        return [f"robust accuracy ({names}) equals the clean accuracy {accuracy:.2%}, at the level of always "
                f"answering one class ({majority_share:.2%} of these images share a label): the model is "
                "probably a constant classifier, which no attack can move; the robust numbers are "
                "meaningless"]
    return []
