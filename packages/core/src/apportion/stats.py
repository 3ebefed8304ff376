"""Uncertainty of measured accuracies. Torch-free.

A benchmark's accuracy over ``n`` samples is a proportion; its 95% interval is the Wilson
score interval (Wilson, 1927), which stays inside [0, 1] and behaves at 0 of n and n of n,
where the normal approximation collapses. Scores in [0, 1] that are not 0/1 (partial credit)
are summed as fractional successes. Two configs are told apart only when their intervals do
not overlap (:func:`separated`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of ``successes`` out of ``n``; (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes <= 0 else low), (1.0 if successes >= n else high)


def accuracy_interval(scores: Iterable[float], z: float = Z95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of per-sample scores in [0, 1], with the Wilson interval."""
    values = [float(s) for s in scores]
    n = len(values)
    if n == 0:
        return float("nan"), 0.0, 1.0, 0
    mean = sum(values) / n
    low, high = wilson(sum(values), n, z)
    return mean, low, high, n


def separated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals (low, high) do not overlap: only then is one config better."""
    return a[1] < b[0] or b[1] < a[0]
