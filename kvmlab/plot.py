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
from typing import Any, Iterable, Sequence

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
]

#: The phases of a restore, in order (columns ``<phase>_ns``).
PHASES = ("acquire", "memory", "vcpu", "devices")
PHASE_COLORS = {"acquire": "#8c8c8c", "memory": "#1f77b4", "vcpu": "#ff7f0e", "devices": "#2ca02c"}
MISS_COLOR = "#d62728"

_UNITS = (("ns", 1.0), ("µs", 1e3), ("ms", 1e6), ("s", 1e9))


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


def choose_unit(values_ns: Iterable[float]) -> tuple[str, float]:
    """(unit, nanoseconds per unit) that reads best for ``values_ns``: the
    largest of ns/µs/ms/s under which the median is at least 1."""
    vals = sorted(float(v) for v in values_ns if v is not None and not math.isnan(float(v)))
    if not vals:
        return "µs", 1e3
    mid = vals[len(vals) // 2]
    unit = _UNITS[0]
    for u in _UNITS:
        if mid >= u[1]:
            unit = u
    return unit


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


def to_png(fig, dpi: int = 96) -> bytes:
    """The figure rendered as PNG bytes (Agg; no pyplot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
