"""Figures of benchmark summaries (``kvmlab bench all``): they take the
summarized figures of :mod:`kvmlab.bench.report` (every figure a median with
min and max, in ns) rather than raw timing records."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from ..units import choose_unit, fmt_time, is_missing
from ._base import PHASE_COLORS, _empty, _finish, _log_axis, _start, host_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

def benchmark_bars(
    rows: Sequence[dict],
    *,
    panel: str = "case",
    label: str = "label",
    title: str | None = None,
    ncols: int = 2,
) -> Figure:
    """Horizontal bars of the median of each row with min–max whiskers, on a
    log time axis; one panel per distinct ``row[panel]`` (e.g. "256 MiB
    dense"), one bar per ``row[label]``. Rows need ``median_ns``, ``min_ns``,
    ``max_ns``; a row whose median is missing (a skipped peer) is shown as a
    note with its ``skipped`` text."""
    import numpy as np
    from matplotlib.figure import Figure

    panels: list[str] = []
    for r in rows:
        if r[panel] not in panels:
            panels.append(r[panel])
    if not panels:
        fig = Figure(figsize=(7.0, 3.0), layout="constrained")
        _empty(fig.add_subplot(), "no results")
        return fig
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    per = max(len([r for r in rows if r[panel] == p]) for p in panels)
    fig = Figure(figsize=(6.0 * ncols, 0.8 + 0.32 * per * nrows + 0.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    vals = [float(r["median_ns"]) for r in rows if not is_missing(r.get("median_ns"))]
    unit, scale = choose_unit(vals or [1e3])
    for ax, name in zip(axes, panels):
        sub = [r for r in rows if r[panel] == name]
        ys = np.arange(len(sub))[::-1]
        for y, r in zip(ys, sub):
            if is_missing(r.get("median_ns")):
                ax.text(0.02, y, f"{r[label]}: {r.get('skipped') or 'not measured'}"[:90], va="center",
                        fontsize=7, color="gray", transform=ax.get_yaxis_transform())
                continue
            med = float(r["median_ns"]) / scale
            lo, hi = float(r["min_ns"]) / scale, float(r["max_ns"]) / scale
            color = r.get("color") or "#1f77b4"
            ax.barh(y, med, color=color, height=0.6)
            ax.errorbar(med, y, xerr=[[max(med - lo, 0)], [max(hi - med, 0)]], fmt="none", ecolor="black",
                        capsize=2, linewidth=0.8)
            ax.annotate(fmt_time(float(r["median_ns"])), (med, y), xytext=(3, -9), textcoords="offset points", fontsize=6)
        ax.set_yticks(ys, [str(r[label]) for r in sub], fontsize=7)
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel(f"time ({unit}, log scale); bar = median, whiskers = min–max", fontsize=7)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title or 'Benchmarks'}\non {host_label()}", fontsize=10)
    return fig


def reset_vs_floor(rows: Sequence[dict[str, Any]], *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Reset time against dirty pages K (log-log): one line per reset
    configuration (median, min–max band) and the floor measured on the same
    VMs (dashed). ``rows``: ``kvmlab.bench.report.reset_rows(...)``."""
    import numpy as np

    fig, ax0 = _start(ax, "Dirty-page reset vs its floor (same run)", title, not rows, "no resets", size=(7.5, 4.4))
    if not rows:
        return fig
    vals = [r["reset"]["median"] for r in rows] + [r["floor"]["median"] for r in rows]
    unit, scale = choose_unit(vals)
    configs: list[str] = []
    for r in rows:
        if r["config"] not in configs:
            configs.append(r["config"])
    for c in configs:
        sub = sorted((r for r in rows if r["config"] == c), key=lambda r: r["dirty_pages_target"])
        k = np.array([r["dirty_pages_target"] for r in sub], dtype=float)
        med = np.array([r["reset"]["median"] for r in sub]) / scale
        lo = np.array([r["reset"]["min"] for r in sub]) / scale
        hi = np.array([r["reset"]["max"] for r in sub]) / scale
        (line,) = ax0.plot(k, med, marker="o", label=f"reset {c}")
        ax0.fill_between(k, lo, hi, color=line.get_color(), alpha=0.12)
        fl = np.array([r["floor"]["median"] for r in sub]) / scale
        ax0.plot(k, fl, linestyle="--", marker=".", color=line.get_color(), alpha=0.7, label=f"floor ({c})")
    _finish(ax0, "pages written per run (K, log scale)", f"reset time ({unit}, log scale)", xlog=True, ylog=True,
            fontsize=7, ncol=2)  # fmt: skip
    return fig


def cycle_crossover(rows: Sequence[dict[str, Any]], *, crossover: float | None = None, title: str | None = None,
                    ax: Axes | None = None) -> Figure:
    """Time per run+reset cycle against guest work N (log-log) for kvmlab and
    unicorn (median, min–max band), with the ``crossover`` N marked.
    ``rows``: dicts with ``iterations`` and ``kvmlab`` / ``unicorn`` stats
    (``kvmlab.bench.report.cycle_rows``)."""
    import numpy as np

    fig, ax0 = _start(ax, "Run + reset cycle: kvmlab vs unicorn", title, not rows, "no cycles")
    if not rows:
        return fig
    vals = [r["kvmlab"]["median"] for r in rows] + [r["unicorn"]["median"] for r in rows if r.get("unicorn")]
    unit, scale = choose_unit(vals)
    n = np.array([r["iterations"] for r in rows], dtype=float)
    series = [("kvmlab (reset_loop)", "kvmlab", "#1f77b4")]
    if all(r.get("unicorn") for r in rows):
        series.append(("unicorn (from Python)", "unicorn", "#d62728"))
    for name, key, color in series:
        med = np.array([r[key]["median"] for r in rows]) / scale
        lo = np.array([r[key]["min"] for r in rows]) / scale
        hi = np.array([r[key]["max"] for r in rows]) / scale
        ax0.plot(n, med, marker="o", color=color, label=name)
        ax0.fill_between(n, lo, hi, color=color, alpha=0.07)
    if len(series) == 2 and crossover:
        ax0.axvline(crossover, color="gray", linestyle=":", linewidth=1)
        ax0.annotate(f"crossover N≈{crossover:,.0f}", (crossover, ax0.get_ylim()[1]), xytext=(4, -12),
                     textcoords="offset points", fontsize=7, color="gray")
    ax0.set_xscale("log")  # N's ticks as powers of ten
    _finish(ax0, "loop iterations N per run (log scale)", f"time per run+reset ({unit}, log scale)", ylog=True)
    return fig


def fork_density(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> Figure:
    """Two panels for ``kvmlab.bench.report.fork_rows(...)``: wall time until
    n VMs are ready (median, min–max) and host memory per VM (PSS growth and
    MemAvailable drop per VM)."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    ok = [r for r in rows if r["ready"]["n"]]
    fig.suptitle(f"{title or 'Fork density (fork_many)'}\non {host_label()}", fontsize=10)
    if not ok:
        _empty(left, "no fork sets")
        _empty(right, "no fork sets")
        return fig
    x = np.arange(len(ok))
    labels = [f"n={r['n']}" for r in ok]
    unit, scale = choose_unit([r["ready"]["median"] for r in ok])
    med = np.array([r["ready"]["median"] for r in ok]) / scale
    lo = np.array([r["ready"]["min"] for r in ok]) / scale
    hi = np.array([r["ready"]["max"] for r in ok]) / scale
    left.bar(x, med, color="#1f77b4", width=0.6)
    left.errorbar(x, med, yerr=[med - lo, hi - med], fmt="none", ecolor="black", capsize=3)
    for xi, m in zip(x, med):
        left.annotate(fmt_time(m * scale), (xi, m), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    left.set_xticks(x, labels)
    left.set_ylabel(f"time until all n ready ({unit})")
    left.set_title("ready time", fontsize=9)
    left.grid(True, axis="y", alpha=0.3)
    w = 0.38
    pss = np.array([r["pss_per_vm"]["median"] for r in ok]) / 1024
    host = np.array([r["host_per_vm"]["median"] for r in ok]) / 1024
    right.bar(x - w / 2, pss, width=w, label="PSS growth / n")
    right.bar(x + w / 2, host, width=w, label="MemAvailable drop / n")
    right.set_xticks(x, labels)
    right.set_ylabel("KiB per VM")
    right.set_title("host memory per VM", fontsize=9)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(fontsize=8)
    return fig


def floor_vs_shell_age(rows: Sequence[dict[str, Any]], *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Restore floor against how long the shell waited before it (symlog x):
    median total with its min–max band, and the memory and vCPU phases.
    ``rows``: ``kvmlab.bench.report.age_rows(...)``."""
    import numpy as np

    fig, ax0 = _start(ax, "Restore floor vs shell age (same run)", title, not rows, "no restores")
    if not rows:
        return fig
    rows = sorted(rows, key=lambda r: r["age_ms"])
    unit, scale = choose_unit([r["total"]["max"] for r in rows])
    age = np.array([r["age_ms"] for r in rows], dtype=float)
    med = np.array([r["total"]["median"] for r in rows]) / scale
    (line,) = ax0.plot(age, med, marker="o", color="#7f7f7f", label="floor total (median)")
    ax0.fill_between(age, np.array([r["total"]["min"] for r in rows]) / scale,
                     np.array([r["total"]["max"] for r in rows]) / scale, color=line.get_color(), alpha=0.12, label="min–max")
    for phase in ("memory", "vcpu"):
        ax0.plot(age, np.array([r[phase]["median"] for r in rows]) / scale, marker=".", linestyle="--",
                 color=PHASE_COLORS[phase], label=f"{phase} (median)")
    ax0.set_xscale("symlog", linthresh=1.0)
    ax0.set_ylim(bottom=0)
    _finish(ax0, "shell age before the restore (ms, symlog)", f"time ({unit})")
    return fig
