"""kvmlab.units: the one formatter of times, sizes and ratios (no KVM)."""

from __future__ import annotations

import pytest

from kvmlab.units import MISSING, fmt_ratio, fmt_size, fmt_time


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (83_456, "83.5 µs"),
        (1_734_000, "1.73 ms"),
        (2_100_000_000, "2.1 s"),
        (999_400, "999 µs"),
        (999_600, "1 ms"),  # three digits of 999.6 µs round to 1000: the next unit, never "1e+03 µs"
        (999.7, "1 µs"),
        (999_960_000_000, "1,000 s"),  # no unit above seconds
        (12_345e9, "12,345 s"),
        (5, "5 ns"),
        (None, MISSING),
        (float("nan"), MISSING),
    ],
)
def test_fmt_time(ns, text):
    assert fmt_time(ns) == text


def test_fmt_time_in_a_given_unit_never_prints_an_exponent():
    assert fmt_time(5, ("ms", 1e6)) == "0.000005 ms"
    assert fmt_time(999_700, ("µs", 1e3)) == "1,000 µs"
    assert fmt_time(83_456, ("ms", 1e6)) == "0.0835 ms"


def test_fmt_size_and_ratio():
    assert fmt_size(3 << 20) == "3.0 MiB"
    assert fmt_size(512) == "512 B"
    assert fmt_ratio(1.234) == "1.23x"
    assert fmt_ratio(1234.4) == "1,234x"
    assert fmt_ratio(None) == MISSING
