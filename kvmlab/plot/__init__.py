"""Plots of restore timings (matplotlib, no pyplot).

Every function takes data and returns a :class:`matplotlib.figure.Figure`
built with the object-oriented API (no pyplot global state, safe under the
Agg backend and from threads). Data is any of:

* a list of :class:`kvmlab.RestoreTiming` (``pool.timings()``);
* a pandas DataFrame with those columns (``kvmlab.timings_frame(...)``), plus
  optional ``mode`` (``"pooled"`` / ``"unpooled"``) and ``memory_mib``;
* a list of dicts with the same keys (e.g. rows built from ``Vm.restore(...).restore_timing``).

    >>> fig = kvmlab.plot.latency_distribution(pool.timings())
    >>> fig.savefig("latency.png")          # or just `fig` as a notebook cell's last line

Times are stored in integer nanoseconds; the axes use µs or ms, whichever
reads best for the data. Titles say what was measured and where (host, CPU).

Layout: ``_base`` (phases, colours, the data frame, figure and axes helpers),
``timings`` (figures of the records kvmlab returns), ``bench`` (figures of
benchmark summaries). Import the functions from ``kvmlab.plot``.
"""

from __future__ import annotations

from ..units import choose_unit
# The colours and reset phases are for the widgets and records (kvmlab.run), beside the public functions.
from ._base import MISS_COLOR, PHASE_COLORS, PHASES, RESET_PHASE_COLORS, RESET_PHASES, frame, host_label, to_png  # noqa: F401
from .bench import benchmark_bars, cycle_crossover, floor_vs_shell_age, fork_density, reset_vs_floor
from .timings import (
    fork_ready_vs_n,
    latency_distribution,
    latency_over_time,
    latency_vs_memory,
    phase_breakdown,
    reset_vs_dirty_pages,
    restore_overview,
)

__all__ = [
    "PHASES",
    "frame",
    "choose_unit",
    "host_label",
    "latency_distribution",
    "phase_breakdown",
    "latency_over_time",
    "latency_vs_memory",
    "restore_overview",
    "to_png",
    "benchmark_bars",
    "reset_vs_floor",
    "cycle_crossover",
    "fork_density",
    "floor_vs_shell_age",
    "reset_vs_dirty_pages",
    "fork_ready_vs_n",
]
