"""95% intervals of the figures the demo and the benchmarks report, in one place.

A share of ``n`` items gets the Wilson score interval (it stays inside [0, 1] and above zero width at 0% and 100%,
where the normal interval collapses); a mean gets the normal interval of the mean (1.96 standard errors).
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.96  # the normal quantile of a two-sided 95% interval


def wilson_interval(share: float, n: int) -> tuple[float, float]:
    """``(low, high)`` of the 95% Wilson score interval of a share observed over ``n`` items (``(0, 1)`` for none)."""
    if n <= 0:
        return 0.0, 1.0
    z2 = Z95 * Z95
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_half_width(share: float, n: int) -> float:
    """Half the width of :func:`wilson_interval`."""
    low, high = wilson_interval(share, n)
    return (high - low) / 2


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its 95% normal interval (sample standard deviation; zero width
    for fewer than two values)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    half = Z95 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, mean - half, mean + half
