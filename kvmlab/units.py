"""The one formatter of times, sizes and ratios (CLI, widgets, plots, benchmark
reports): short human figures from integer nanoseconds and bytes.

    >>> fmt_time(83_456)
    '83.5 µs'
    >>> fmt_size(3 << 20)
    '3.0 MiB'
    >>> fmt_ratio(1.234)
    '1.23x'

Missing values (None, NaN) print as ``MISSING``. This module imports nothing
from kvmlab, so every other module can import it.
"""

from __future__ import annotations

import math
from typing import Iterable

__all__ = ["TIME_UNITS", "MISSING", "choose_unit", "fmt_time", "fmt_size", "fmt_ratio", "fmt_range", "is_missing"]

#: (name, nanoseconds per unit), smallest first.
TIME_UNITS = (("ns", 1.0), ("µs", 1e3), ("ms", 1e6), ("s", 1e9))
#: How a missing figure prints.
MISSING = "–"
_SIZE_UNITS = (("GiB", 30), ("MiB", 20), ("KiB", 10))


def is_missing(x: object) -> bool:
    """True for None, NaN and anything that is not a number."""
    try:
        return x is None or math.isnan(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True


def choose_unit(values_ns: Iterable[float | None]) -> tuple[str, float]:
    """(unit, nanoseconds per unit) that reads best for ``values_ns``: the
    largest of ns/µs/ms/s under which the median is at least 1 (µs if empty)."""
    vals = sorted(float(v) for v in values_ns if not is_missing(v))  # type: ignore[arg-type]
    if not vals:
        return "µs", 1e3
    mid = vals[len(vals) // 2]
    unit = TIME_UNITS[0]
    for u in TIME_UNITS:
        if mid >= u[1]:
            unit = u
    return unit


def fmt_time(ns: float | None, unit: tuple[str, float] | None = None) -> str:
    """Nanoseconds as ``"83.5 µs"``, ``"1.73 ms"``, ``"2.1 s"``: three
    significant digits, in ``unit`` when given, else the unit that fits."""
    if is_missing(ns):
        return MISSING
    name, scale = unit or choose_unit([ns])
    v = float(ns) / scale  # type: ignore[arg-type]
    if unit is None and _rounds_to_1000(v) and (name, scale) != TIME_UNITS[-1]:
        # 999.6 µs reads as "1 ms", not "1e+03 µs".
        name, scale = TIME_UNITS[TIME_UNITS.index((name, scale)) + 1]
        v = float(ns) / scale  # type: ignore[arg-type]
    if abs(v) >= 1000 or _rounds_to_1000(v):
        return f"{v:,.0f} {name}"
    text = f"{v:.3g}"
    if "e" in text:  # a tiny figure in a given unit: positional, never 5e-06
        text = f"{float(text):f}".rstrip("0").rstrip(".") or "0"
    return f"{text} {name}"


def _rounds_to_1000(v: float) -> bool:
    """Three significant digits of ``v`` reach 1000 (999.6 -> 1e+03)."""
    return abs(float(f"{v:.3g}")) >= 1000


def fmt_range(median: float | None, lo: float | None, hi: float | None) -> str:
    """``"83.5 µs (80.1 µs–95.2 µs)"``: a median with its min–max."""
    if is_missing(median):
        return MISSING
    return f"{fmt_time(median)} ({fmt_time(lo)}–{fmt_time(hi)})"


def fmt_size(nbytes: float | None) -> str:
    """Bytes as ``"1.5 MiB"`` (binary units, one decimal) or ``"512 B"``."""
    if is_missing(nbytes):
        return MISSING
    n = float(nbytes)  # type: ignore[arg-type]
    for name, shift in _SIZE_UNITS:
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {name}"
    return f"{n:.0f} B"


def fmt_ratio(x: float | None) -> str:
    """``"1.23x"``; from 1000 on without decimals (``"1,234x"``)."""
    if is_missing(x):
        return MISSING
    v = float(x)  # type: ignore[arg-type]
    return f"{v:,.2f}x" if abs(v) < 1000 else f"{v:,.0f}x"
