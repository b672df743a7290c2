"""Fair comparisons on a shared, drifting machine: run order, spread, and verdicts.

Two rules every A-vs-B benchmark here follows:

- order: neither side always runs first. :func:`abba` alternates the order of each pair
  (A B, B A, A B, ...), so a machine that speeds up or slows down over the run (load from
  others, caches, thermal) hits both sides alike instead of favouring the second one.
- noise: a difference is only called a difference when it is larger than the run-to-run
  spread measured in the same run (:func:`spread_pct`); otherwise the verdict is
  ``within noise``. A target is ``met`` or ``MISSED`` only when the whole noise band is on
  one side of it.

Pure functions, no timing: tests/bench/test_fairness.py checks them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
WITHIN_NOISE = "within noise"


def abba(first: T, second: T, pairs: int) -> list[tuple[T, T]]:
    """``pairs`` run orders: (first, second), (second, first), (first, second), ...

    An even ``pairs`` gives each side the first slot equally often."""
    return [(first, second) if i % 2 == 0 else (second, first) for i in range(pairs)]


def spread_pct(values: Sequence[float]) -> float:
    """Run-to-run spread: (max - min) / median, in percent (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / med if med else float("inf")


def diff_pct(a: Sequence[float], b: Sequence[float]) -> float:
    """How much larger A's median is than B's, in percent of B's median."""
    return 100.0 * (statistics.median(a) / statistics.median(b) - 1.0)


def noise_pct(a: Sequence[float], b: Sequence[float]) -> float:
    """The larger of the two sides' spreads: the noise a difference must exceed."""
    return max(spread_pct(a), spread_pct(b))


def verdict(diff: float, spread: float, above: str = "faster", below: str = "slower") -> str:
    """``within noise`` when ``|diff| <= spread``; otherwise ``above`` (diff > 0) or ``below``.

    ``diff`` and ``spread`` share a unit (percent, say); a zero spread (one run per side)
    means no noise was measured, so any nonzero difference gets a direction."""
    if abs(diff) <= spread:
        return WITHIN_NOISE
    return above if diff > 0 else below


def range_verdict(lo: float, hi: float, limit: float, higher_is_better: bool) -> str:
    """``met`` / ``MISSED`` when the whole band ``[lo, hi]`` is on one side of ``limit``,
    else ``within noise of the target``."""
    all_good, some_good = (lo >= limit, hi >= limit) if higher_is_better else (
        hi <= limit, lo <= limit)
    if all_good:
        return "met"
    if not some_good:
        return "MISSED"
    return f"{WITHIN_NOISE} of the target"


def target_verdict(value: float, spread: float, limit: float,
                   higher_is_better: bool = False) -> str:
    """:func:`range_verdict` of ``value`` +- ``spread`` (same unit as ``limit``)."""
    return range_verdict(value - spread, value + spread, limit, higher_is_better)
