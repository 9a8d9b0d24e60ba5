"""The statistics a report states: Wilson intervals for accuracies, McNemar's exact test for comparing
two models on the same examples, and the compact per-example correctness bits the test reads."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
# McNemar: exact integer sums up to this many discordant pairs (milliseconds), a log-space sum beyond
EXACT_LIMIT = 20_000


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``correct / n`` (default 95%).

    Chosen over the normal ("Wald") interval because it stays inside [0, 1] and is sensible at 0% and
    100% accuracy, which small robust-accuracy evaluations reach.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, {n}], got {correct!r}")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: no 0.9999999999999999
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null (both classifiers equally accurate) each discordant example is a fair coin, so
    ``p = min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``, and ``p = 1`` when
    ``b + c = 0``. This is the conventional exact (conservative) test; the mid-p variant, which subtracts
    half the probability of the observed count, is deliberately not used. Exact integer arithmetic up to
    ``EXACT_LIMIT`` discordant pairs, a log-space sum of the binomial terms beyond (relative error ~1e-12).
    """
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    if n <= EXACT_LIMIT:
        term, tail = 1, 1  # comb(n, 0); each next term comb(n, i+1) = comb(n, i) * (n - i) // (i + 1)
        for i in range(k):
            term = term * (n - i) // (i + 1)
            tail += term
        return min(1.0, tail / (1 << (n - 1)))  # 2 * tail / 2**n, an exact int ratio rounded once
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1)]
    top = max(logs)
    log_tail = top + math.log(math.fsum(math.exp(v - top) for v in logs))
    return min(1.0, math.exp(log_tail + math.log(2.0) - n * math.log(2.0)))


def encode_bits(bits: Sequence[bool] | np.ndarray) -> str:
    """Booleans -> base64 of ``numpy.packbits`` (big bit order: example 0 is the first byte's top bit)."""
    packed = np.packbits(np.asarray(bits, dtype=bool), bitorder="big")
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_bits(text: str, n: int) -> np.ndarray:
    """``encode_bits``'s inverse for ``n`` examples; ValueError when the text cannot hold exactly n bits."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError, AttributeError):
        raise ValueError("correctness bits are not valid base64") from None
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"correctness bits hold {len(raw)} bytes, expected {(n + 7) // 8} for n={n}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n, bitorder="big").astype(bool)


def mcnemar_compare(a_bits: np.ndarray, b_bits: np.ndarray, *, alpha: float = 0.05) -> dict[str, Any]:
    """Two classifiers' per-example correctness on the same examples, compared by McNemar's exact test.

    ``b``: examples A gets right and B wrong; ``c``: the reverse; ``diff = b_acc - a_acc`` (B minus A).
    """
    a_bits, b_bits = np.asarray(a_bits, dtype=bool), np.asarray(b_bits, dtype=bool)
    if a_bits.shape != b_bits.shape or a_bits.ndim != 1 or a_bits.size == 0:
        raise ValueError(f"need two non-empty bit vectors of one length, got {a_bits.shape} and "
                         f"{b_bits.shape}")
    n = int(a_bits.size)
    a_correct, b_correct = int(a_bits.sum()), int(b_bits.sum())
    b = int((a_bits & ~b_bits).sum())
    c = int((~a_bits & b_bits).sum())
    p = mcnemar_exact_p(b, c)
    return {"n": n, "a_acc": a_correct / n, "b_acc": b_correct / n,
            "a_ci95": rounded_interval(a_correct, n), "b_ci95": rounded_interval(b_correct, n),
            "diff": (b_correct - a_correct) / n, "b": b, "c": c, "p_value": p,
            "significant_at_5pct": bool(p < alpha), "test": "McNemar exact (two-sided, not mid-p)"}


def rounded_interval(correct: int, n: int) -> list[float]:
    """The 95% Wilson interval as a report stores it: ``[lo, hi]`` rounded to 6 decimals."""
    low, high = wilson_interval(correct, n)
    return [round(low, 6), round(high, 6)]


def history_with_intervals(history: list[dict[str, Any]], n_val: int) -> list[dict[str, Any]]:
    """A training history as a report shows it: each validation accuracy with its 95% Wilson interval
    (``val_clean_ci95``, ``val_robust_ci95``) and ``val_n``, the validation images it was measured on."""
    out = []
    for entry in history:
        entry = dict(entry)
        for key in ("val_clean_acc", "val_robust_acc"):
            value = entry.get(key)
            if n_val and isinstance(value, (int, float)) and math.isfinite(value):
                entry[key.replace("_acc", "_ci95")] = rounded_interval(round(value * n_val), n_val)
                entry["val_n"] = n_val
        out.append(entry)
    return out
