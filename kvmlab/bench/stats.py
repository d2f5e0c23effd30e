"""The one statistics structure of every benchmark: :class:`Stats` (n, median,
min, max, p50, p90, p99) of a list of figures, and the ratio of two figures."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

__all__ = ["Stats", "STAT_FIELDS", "median", "percentile", "ratio"]

#: The fields of :class:`Stats`, in report order (also the columns of ``Results.summary()``).
STAT_FIELDS = ("n", "median", "min", "max", "p50", "p90", "p99")


def median(values: Sequence[float]) -> float:
    """The midpoint of ``values`` (the mean of the two middle values for an
    even count; NaN when empty): the one median of every benchmark."""
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    assert 0 <= q <= 100, q
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return float(s[k])


@dataclass(frozen=True)
class Stats:
    """Summary of one figure over the repetitions of a run (NaN when empty).
    ``median`` is the midpoint (mean of the two middle values for an even
    count); ``p50``/``p90``/``p99`` are nearest-rank percentiles."""

    n: int
    median: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Stats":
        v = sorted(float(x) for x in values if x is not None and not math.isnan(float(x)))
        if not v:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(v), median(v), v[0], v[-1], percentile(v, 50), percentile(v, 90), percentile(v, 99))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio(a: float | None, b: float | None) -> float:
    """``a / b``, NaN when either is missing or ``b`` is zero."""
    try:
        if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
            return math.nan
        return float(a) / float(b)
    except TypeError:
        return math.nan
