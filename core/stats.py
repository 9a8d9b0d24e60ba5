"""Confidence intervals for the accuracies a report and a model card state."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


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
