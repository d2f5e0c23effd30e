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
"""

from __future__ import annotations

import functools
import io
import math
import os
import socket
from dataclasses import asdict, is_dataclass
from typing import Any, Sequence

from .units import choose_unit, is_missing

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

#: The phases of a restore, in order (columns ``<phase>_ns``).
PHASES = ("acquire", "memory", "vcpu", "devices")
PHASE_COLORS = {"acquire": "#8c8c8c", "memory": "#1f77b4", "vcpu": "#ff7f0e", "devices": "#2ca02c"}
#: Phases of a reset (:class:`kvmlab.vm.ResetTiming`) and their colours.
RESET_PHASES = ("log", "memory", "vcpu", "devices")
RESET_PHASE_COLORS = {**PHASE_COLORS, "log": "#9467bd"}
MISS_COLOR = "#d62728"



# -- data ----------------------------------------------------------------------------


def frame(data: Any):
    """``data`` (see the module doc) as a new DataFrame with at least
    ``total_ns``, ``strategy``, ``hit``, ``mode`` and ``memory_mib`` columns."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        df = data.copy()
    else:
        rows = []
        for r in data if data is not None else ():
            if is_dataclass(r) and not isinstance(r, type):
                rows.append(asdict(r))
            elif isinstance(r, dict):
                rows.append(dict(r))
            else:
                raise TypeError(f"timing records must be RestoreTiming or dicts, got {type(r).__name__}")
        df = pd.DataFrame(rows)
    if "total_ns" not in df.columns:
        if len(df) and all(f"{p}_ns" in df.columns for p in PHASES):
            df["total_ns"] = sum(df[f"{p}_ns"] for p in PHASES)
        elif len(df):
            raise ValueError("timing data needs a total_ns column (or the four <phase>_ns columns)")
        else:
            df["total_ns"] = pd.Series(dtype="int64")
    for p in PHASES:
        if f"{p}_ns" not in df.columns:
            df[f"{p}_ns"] = 0
    if "strategy" not in df.columns:
        df["strategy"] = "?"
    if "hit" not in df.columns:
        df["hit"] = True
    df["hit"] = df["hit"].astype(bool)
    if "mode" not in df.columns:
        df["mode"] = "pooled"
    if "memory_mib" not in df.columns:
        if "memory_bytes" in df.columns:
            df["memory_mib"] = (df["memory_bytes"] // (1 << 20)).astype("int64")
        else:
            df["memory_mib"] = 0
    return df.reset_index(drop=True)


@functools.lru_cache(maxsize=1)
def host_label() -> str:
    """``"<hostname>, <CPU model>, <n> CPUs"`` of this machine (for titles)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = " ".join(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for junk in ("(R)", "(TM)", " CPU", " Processor"):
        cpu = cpu.replace(junk, "")
    parts = [socket.gethostname(), cpu or "unknown CPU", f"{os.cpu_count() or '?'} CPUs"]
    return ", ".join(parts)


def _groups(df, by: Sequence[str] | str | None, sep: str = " "):
    """[(label, sub-frame)] per group of the ``by`` columns that vary."""
    if by is None:
        by = []
    elif isinstance(by, str):
        by = [by]
    by = [c for c in by if c in df.columns]
    if not by or df.empty:
        return [("all", df)]
    # Label by the columns that vary; with none varying, by the first one.
    by = [c for c in by if df[c].nunique() > 1] or by[:1]
    out = []
    for key, sub in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        out.append((sep.join(_fmt_key(c, k) for c, k in zip(by, key)), sub))
    return out


def _fmt_key(col: str, value: Any) -> str:
    if col == "memory_mib":
        return f"{value} MiB"
    return str(value)


# -- figures -----------------------------------------------------------------------------


def _new_figure(ax, size=(7.0, 4.2)):
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _title(fig, ax, what: str, title: str | None, own_figure: bool) -> None:
    text = title or what
    if own_figure:
        fig.suptitle(f"{text}\non {host_label()}", fontsize=10)
    else:
        ax.set_title(text, fontsize=9)


def _log_axis(axis) -> None:
    """Plain-number tick labels (``0.2``, ``600``, ``1000``) on a log axis;
    minor ticks are labelled when the axis spans few decades."""
    from matplotlib import ticker

    class _Plain(ticker.LogFormatter):
        def __call__(self, x, pos=None):
            # LogFormatter decides which ticks get a label; print those plainly.
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _empty(ax, msg: str = "no restores yet") -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def latency_distribution(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "mode"),
    kind: str = "ecdf",
    value: str = "total_ns",
    title: str | None = None,
    ax=None,
):
    """Distribution of restore latency per group (default: strategy x pooled/
    unpooled) on a log time axis. ``kind="ecdf"`` draws one step line per group
    (y = fraction of restores at most x); ``kind="hist"`` log-spaced histograms.
    """
    if kind not in ("ecdf", "hist"):
        raise ValueError(f"kind={kind!r}: use 'ecdf' or 'hist'")
    import numpy as np

    df = frame(data)
    fig, ax0 = _new_figure(ax)
    _title(fig, ax0, f"Restore latency ({value.removesuffix('_ns')}), distribution", title, ax is None)
    if df.empty:
        _empty(ax0)
        return fig
    unit, scale = choose_unit(df[value])
    vals_all = df[value].to_numpy(dtype=float) / scale
    lo, hi = max(vals_all.min(), 1e-9), max(vals_all.max(), 1e-9)
    bins = np.geomspace(lo / 1.05, hi * 1.05, 40) if hi > lo else np.geomspace(lo / 2, lo * 2, 10)
    for label, sub in _groups(df, by):
        x = np.sort(sub[value].to_numpy(dtype=float) / scale)
        med = float(np.median(x))
        lab = f"{label} (n={len(x)}, median {med:.3g} {unit})"
        if kind == "ecdf":
            y = np.arange(1, len(x) + 1) / len(x)
            ax0.step(x, y, where="post", label=lab)
        else:
            ax0.hist(x, bins=bins, histtype="step", linewidth=1.5, label=lab)
    ax0.set_xscale("log")
    _log_axis(ax0.xaxis)
    ax0.set_xlabel(f"restore time ({unit}, log scale)")
    ax0.set_ylabel("fraction of restores ≤ x" if kind == "ecdf" else "restores")
    if kind == "ecdf":
        ax0.set_ylim(0, 1.02)
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=8)
    return fig


def phase_breakdown(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "memory_mib", "mode"),
    stat: str = "median",
    title: str | None = None,
    ax=None,
):
    """Stacked bars: the ``stat`` (median or mean) of each restore phase
    (acquire, memory, vcpu, devices) per group (default: strategy x memory
    size x pooled/unpooled). One :class:`BarContainer` per phase."""
    if stat not in ("median", "mean"):
        raise ValueError(f"stat={stat!r}: use 'median' or 'mean'")
    import numpy as np

    df = frame(data)
    fig, ax0 = _new_figure(ax, size=(7.5, 4.2))
    _title(fig, ax0, f"Restore phases ({stat} per phase)", title, ax is None)
    if df.empty:
        _empty(ax0)
        return fig
    groups = _groups(df, by, sep="\n")
    per_phase = {
        p: np.array([getattr(sub[f"{p}_ns"].astype(float), stat)() for _, sub in groups]) for p in PHASES
    }
    totals = sum(per_phase.values())
    unit, scale = choose_unit(totals)
    xs = np.arange(len(groups))
    bottom = np.zeros(len(groups))
    for p in PHASES:
        h = per_phase[p] / scale
        ax0.bar(xs, h, bottom=bottom, label=p, color=PHASE_COLORS[p], width=0.65)
        bottom = bottom + h
    for x, top in zip(xs, bottom):
        ax0.annotate(f"{top:.3g}", (x, top), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                     textcoords="offset points")  # fmt: skip
    ax0.set_xticks(xs, [label for label, _ in groups], fontsize=7)
    ax0.set_ylabel(f"time ({unit})")
    ax0.margins(y=0.12)
    ax0.legend(fontsize=8, title="phase", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax0.grid(True, axis="y", alpha=0.3)
    return fig


def latency_over_time(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "mode", "memory_mib"),
    value: str = "total_ns",
    title: str | None = None,
    log: bool = True,
    ax=None,
):
    """Latency of each restore in order (x = restore index: ``seq`` when
    present), one line per group; pool misses (``hit`` false: the pool had no
    idle shell and made one on the caller's path) are marked with red crosses."""
    import numpy as np

    df = frame(data)
    fig, ax0 = _new_figure(ax)
    _title(fig, ax0, "Restore latency over time", title, ax is None)
    if df.empty:
        _empty(ax0)
        return fig
    if "seq" not in df.columns:
        df["seq"] = np.arange(len(df))
    unit, scale = choose_unit(df[value])
    for label, sub in _groups(df, by):
        x = sub["seq"].to_numpy(dtype=float)
        y = sub[value].to_numpy(dtype=float) / scale
        # Break the line where a block of other groups' restores came in between
        # (but not for groups that simply alternate).
        d = np.diff(x)
        gaps = np.flatnonzero(d > 3 * np.median(d)) + 1 if len(d) else np.array([], dtype=int)
        x, y = np.insert(x, gaps, np.nan), np.insert(y, gaps, np.nan)
        ax0.plot(x, y, marker=".", markersize=3, linewidth=0.8, label=label)
    miss = df[~df["hit"] & (df["mode"] == "pooled")]
    ax0.scatter(miss["seq"], miss[value] / scale, marker="x", color=MISS_COLOR, zorder=3, s=30,
                label=f"pool miss ({len(miss)})")  # fmt: skip
    if log:
        ax0.set_yscale("log")
        _log_axis(ax0.yaxis)
    ax0.set_xlabel("restore index")
    ax0.set_ylabel(f"restore time ({unit}{', log scale' if log else ''})")
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=8)
    return fig


def latency_vs_memory(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "mode"),
    value: str = "total_ns",
    title: str | None = None,
    ax=None,
):
    """Median restore latency against guest memory size, one line per group
    (default: strategy x pooled/unpooled), with the interquartile range as error
    bars; log time axis."""
    import numpy as np

    df = frame(data)
    fig, ax0 = _new_figure(ax)
    _title(fig, ax0, "Restore latency vs guest memory size", title, ax is None)
    if df.empty:
        _empty(ax0)
        return fig
    unit, scale = choose_unit(df[value])
    sizes = sorted(df["memory_mib"].unique())
    for label, sub in _groups(df, by):
        g = sub.groupby("memory_mib")[value]
        q = g.quantile([0.25, 0.5, 0.75]).unstack() / scale
        mem = q.index.to_numpy()
        med = q[0.5].to_numpy()
        err = np.vstack([med - q[0.25].to_numpy(), q[0.75].to_numpy() - med])
        ax0.errorbar(mem, med, yerr=err, marker="o", capsize=3, label=label)
    ax0.set_xscale("log", base=2)
    ax0.set_xticks(sizes, [str(s) for s in sizes])
    ax0.minorticks_off()
    ax0.set_yscale("log")
    _log_axis(ax0.yaxis)
    ax0.set_xlabel("guest memory (MiB, log scale)")
    ax0.set_ylabel(f"median restore time ({unit}, log scale; bars: IQR)")
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=8)
    return fig


def restore_overview(data: Any, *, title: str | None = None):
    """Two panels for a live view: latency over time (misses marked) and the
    per-phase breakdown by strategy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    latency_over_time(data, ax=left, by=("strategy",))
    phase_breakdown(data, ax=right, by=("strategy",))
    n = len(frame(data))
    fig.suptitle(f"{title or 'Pool restores'} ({n} shown)\non {host_label()}", fontsize=10)
    return fig


# -- benchmark summaries (kvmlab bench all) -----------------------------------------------
#
# These take the summarized figures of ``kvmlab.bench.report`` (every
# figure a median with min and max, in ns) rather than raw timing records.


def benchmark_bars(
    rows: Sequence[dict],
    *,
    panel: str = "case",
    label: str = "label",
    title: str | None = None,
    ncols: int = 2,
):
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
            ax.annotate(f"{med:.3g}", (med, y), xytext=(3, -9), textcoords="offset points", fontsize=6)
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


def reset_vs_floor(rows: Sequence[dict], *, title: str | None = None, ax=None):
    """Reset time against dirty pages K (log-log): one line per reset
    configuration (median, min–max band) and the floor measured on the same
    VMs (dashed). ``rows``: ``kvmlab.bench.report.reset_rows(...)``."""
    import numpy as np

    fig, ax0 = _new_figure(ax, size=(7.5, 4.4))
    _title(fig, ax0, "Dirty-page reset vs its floor (same run)", title, ax is None)
    if not rows:
        _empty(ax0, "no resets")
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
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    _log_axis(ax0.xaxis)
    _log_axis(ax0.yaxis)
    ax0.set_xlabel("pages written per run (K, log scale)")
    ax0.set_ylabel(f"reset time ({unit}, log scale)")
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=7, ncol=2)
    return fig


def cycle_crossover(rows: Sequence[dict], *, crossover: float | None = None, title: str | None = None, ax=None):
    """Time per run+reset cycle against guest work N (log-log) for kvmlab and
    unicorn (median, min–max band), with the ``crossover`` N marked.
    ``rows``: dicts with ``iterations`` and ``kvmlab`` / ``unicorn`` stats
    (``kvmlab.bench.report.cycle_rows``)."""
    import numpy as np

    fig, ax0 = _new_figure(ax, size=(7.0, 4.2))
    _title(fig, ax0, "Run + reset cycle: kvmlab vs unicorn", title, ax is None)
    if not rows:
        _empty(ax0, "no cycles")
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
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    _log_axis(ax0.yaxis)
    ax0.set_xlabel("loop iterations N per run (log scale)")
    ax0.set_ylabel(f"time per run+reset ({unit}, log scale)")
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=8)
    return fig


def fork_density(rows: Sequence[dict], *, title: str | None = None):
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
        left.annotate(f"{m:.3g}", (xi, m), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
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


def floor_vs_shell_age(rows: Sequence[dict], *, title: str | None = None, ax=None):
    """Restore floor against how long the shell waited before it (symlog x):
    median total with its min–max band, and the memory and vCPU phases.
    ``rows``: ``kvmlab.bench.report.age_rows(...)``."""
    import numpy as np

    fig, ax0 = _new_figure(ax, size=(7.0, 4.2))
    _title(fig, ax0, "Restore floor vs shell age (same run)", title, ax is None)
    if not rows:
        _empty(ax0, "no restores")
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
    ax0.set_xlabel("shell age before the restore (ms, symlog)")
    ax0.set_ylabel(f"time ({unit})")
    ax0.set_ylim(bottom=0)
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=8)
    return fig


def _records(data: Any, needed: Sequence[str], aliases: dict[str, str] | None = None):
    """``data`` (records, dicts or a DataFrame) as a DataFrame with the
    ``needed`` columns (``aliases``: other column name -> needed name)."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        df = data.copy()
    else:
        df = pd.DataFrame([asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in data or ()])
    for other, name in (aliases or {}).items():
        if name not in df.columns and other in df.columns:
            df[name] = df[other]
    missing = [c for c in needed if c not in df.columns]
    if len(df) and missing:
        raise ValueError(f"the data needs the columns {', '.join(missing)}; it has {', '.join(map(str, df.columns))}")
    return df


def _records_figure(data: Any, needed: Sequence[str], what: str, title: str | None, ax, empty: str,
                    aliases: dict[str, str] | None = None):  # fmt: skip
    """(the data as a DataFrame, the figure, its Axes), titled; an empty
    figure saying ``empty`` when there is no data."""
    df = _records(data, needed, aliases)
    fig, ax0 = _new_figure(ax)
    _title(fig, ax0, what, title, ax is None)
    if df.empty:
        _empty(ax0, empty)
    return df, fig, ax0


def _median_line(ax, df, x: str, y: str, scale: float, color: str, label: str, by: str | None = None) -> None:
    """Every point faintly, the medians per ``by`` (default: per x) as a line."""
    ax.scatter(df[x], df[y] / scale, s=10, alpha=0.35, color=color, linewidths=0)
    if by is not None and by not in df.columns:
        raise ValueError(f"by={by!r} is not a column of the data ({', '.join(map(str, df.columns))})")
    med = df[[x, y]].groupby(df[by or x].to_numpy()).median().sort_values(x)
    ax.plot(med[x], med[y] / scale, marker="o", color=color, label=label)


def reset_vs_dirty_pages(data: Any, *, by: str | None = None, title: str | None = None, ax=None):
    """Reset time against the pages each reset put back (log-log): every reset
    as a point, the medians as a line.

    Args:
        data: :class:`~kvmlab.vm.ResetTiming` records (``vm.reset_timings()``),
            :class:`~kvmlab.vm.LoopResult` records (``vm.reset_loop(...)``), or
            dicts / a DataFrame with ``dirty_pages`` and ``total_ns`` (or ``reset_ns``).
        by: a column naming each run's setting (e.g. the pages the guest was
            told to write): one median point per value, at its median page
            count. Default: one per distinct ``dirty_pages``.
        title: the figure's title.
        ax: draw into this Axes instead of a new figure.

    Returns:
        The matplotlib Figure.
    """
    df, fig, ax0 = _records_figure(data, ("dirty_pages", "total_ns"), "Reset time vs dirty pages", title, ax,
                                   "no resets yet", {"reset_ns": "total_ns"})  # fmt: skip
    if df.empty:
        return fig
    unit, scale = choose_unit(df["total_ns"])
    df = df.assign(dirty_pages=df["dirty_pages"].clip(lower=1))  # log axis: a reset of 0 pages sits at 1
    _median_line(ax0, df, "dirty_pages", "total_ns", scale, PHASE_COLORS["memory"], "reset (median)", by)
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    _log_axis(ax0.xaxis)
    _log_axis(ax0.yaxis)
    ax0.set_xlabel("dirty pages put back (log scale)")
    ax0.set_ylabel(f"reset time ({unit}, log scale)")
    ax0.grid(True, which="both", alpha=0.3)
    ax0.legend(fontsize=8)
    return fig


def fork_ready_vs_n(data: Any, *, title: str | None = None, ax=None):
    """``fork_many`` ready time against n: every run as a point, the median
    per n as a line, and the median time per VM on a second axis.

    Args:
        data: ``ForkSet.stats`` records (:class:`~kvmlab.fork.ForkStats`) or
            dicts / a DataFrame with ``n`` and ``ready_ns``.
        title: the figure's title.
        ax: draw into this Axes instead of a new figure.

    Returns:
        The matplotlib Figure.
    """
    df, fig, ax0 = _records_figure(data, ("n", "ready_ns"), "fork_many: time until n VMs are ready", title, ax, "no forks yet")
    if df.empty:
        return fig
    unit, scale = choose_unit(df["ready_ns"])
    _median_line(ax0, df, "n", "ready_ns", scale, PHASE_COLORS["memory"], "all n ready (median)")
    ax0.set_xlabel("n (VMs)")
    ax0.set_ylabel(f"ready time ({unit})")
    ax0.set_ylim(bottom=0)
    ax0.grid(True, alpha=0.3)
    per_vm = (df["ready_ns"] / df["n"]).groupby(df["n"], sort=True).median()
    vm_unit, vm_scale = choose_unit(per_vm)
    ax1 = ax0.twinx()
    ax1.plot(per_vm.index, per_vm.values / vm_scale, linestyle="--", marker=".", color=PHASE_COLORS["vcpu"], label="per VM (median)")
    ax1.set_ylabel(f"per VM ({vm_unit})")
    ax1.set_ylim(bottom=0)
    lines = ax0.get_legend_handles_labels()
    more = ax1.get_legend_handles_labels()
    ax0.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    return fig


def to_png(fig, dpi: int = 96) -> bytes:
    """The figure rendered as PNG bytes (Agg; no pyplot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
