"""Small statistics shared by `run` and `bench`: finite numbers, medians, percentiles, paired speedups.

Pure functions over plain values; never imports torch, never touches files. "Missing" (None, NaN, a string
from a failed run, a bool) is skipped, never replaced by a constant.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable


def number(value: Any) -> float | None:
    """A finite float, or None for anything missing (None, NaN, a string from a failed run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def numbers(values: Iterable[Any]) -> list[float]:
    return [v for v in (number(x) for x in values) if v is not None]


def median(values: Iterable[Any]) -> float | None:
    found = numbers(values)
    return statistics.median(found) if found else None


def percentile(values: Iterable[Any], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default): position (n - 1) * q."""
    found = sorted(numbers(values))
    if not found:
        return None
    position = (len(found) - 1) * q
    lower = math.floor(position)
    upper = min(lower + 1, len(found) - 1)
    return found[lower] + (found[upper] - found[lower]) * (position - lower)


def paired_speedup(reference: dict, measured: dict) -> tuple[float | None, float | None, int]:
    """Median over keys present in both of reference / measured, and of reference - measured.

    reference and measured map a pairing key (a sample id) to one wall time each. Returns
    (speedup, time_saved, n_paired); speedup and time_saved are None when no key is in both.
    """
    paired = [k for k in measured if number(reference.get(k)) is not None and (number(measured[k]) or 0) > 0]
    return (median(reference[k] / measured[k] for k in paired),
            median(reference[k] - measured[k] for k in paired), len(paired))
