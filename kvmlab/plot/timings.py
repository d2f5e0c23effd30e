"""Figures of timing records kvmlab returns: restores (``pool.timings()``,
``restore_timing``), resets (``vm.reset_timings()``, ``reset_loop``) and
``fork_many`` (``ForkSet.stats``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, cast

from ..units import choose_unit, fmt_time
from ._base import MISS_COLOR, PHASE_COLORS, PHASES, _finish, _groups
from ._base import _median_line, _records_figure, _start, frame, host_label

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

def latency_distribution(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "mode"),
    kind: str = "ecdf",
    value: str = "total_ns",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Distribution of restore latency per group (default: strategy x pooled/
    unpooled) on a log time axis. ``kind="ecdf"`` draws one step line per group
    (y = fraction of restores at most x); ``kind="hist"`` log-spaced histograms.
    """
    if kind not in ("ecdf", "hist"):
        raise ValueError(f"kind={kind!r}: use 'ecdf' or 'hist'")
    import numpy as np

    df = frame(data)
    fig, ax0 = _start(ax, f"Restore latency ({value.removesuffix('_ns')}), distribution", title, df.empty)
    if df.empty:
        return fig
    unit, scale = choose_unit(df[value])
    vals_all = df[value].to_numpy(dtype=float) / scale
    lo, hi = max(vals_all.min(), 1e-9), max(vals_all.max(), 1e-9)
    bins = np.geomspace(lo / 1.05, hi * 1.05, 40) if hi > lo else np.geomspace(lo / 2, lo * 2, 10)
    for label, sub in _groups(df, by):
        x = np.sort(sub[value].to_numpy(dtype=float) / scale)
        med = float(np.median(x))
        lab = f"{label} (n={len(x)}, median {fmt_time(med * scale)})"
        if kind == "ecdf":
            y = np.arange(1, len(x) + 1) / len(x)
            ax0.step(x, y, where="post", label=lab)
        else:
            ax0.hist(x, bins=bins, histtype="step", linewidth=1.5, label=lab)
    if kind == "ecdf":
        ax0.set_ylim(0, 1.02)
    _finish(ax0, f"restore time ({unit}, log scale)", "fraction of restores ≤ x" if kind == "ecdf" else "restores",
            xlog=True)  # fmt: skip
    return fig


def phase_breakdown(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "memory_mib", "mode"),
    stat: str = "median",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Stacked bars: the ``stat`` (median or mean) of each restore phase
    (acquire, memory, vcpu, devices) per group (default: strategy x memory
    size x pooled/unpooled). One :class:`BarContainer` per phase."""
    if stat not in ("median", "mean"):
        raise ValueError(f"stat={stat!r}: use 'median' or 'mean'")
    import numpy as np

    df = frame(data)
    fig, ax0 = _start(ax, f"Restore phases ({stat} per phase)", title, df.empty, size=(7.5, 4.2))
    if df.empty:
        return fig
    groups = _groups(df, by, sep="\n")
    per_phase = {
        p: np.array([getattr(sub[f"{p}_ns"].astype(float), stat)() for _, sub in groups]) for p in PHASES
    }
    totals: np.ndarray = sum(per_phase.values())  # type: ignore[assignment]  # never the 0 start: PHASES is not empty
    unit, scale = choose_unit(totals)
    xs = np.arange(len(groups))
    bottom = np.zeros(len(groups))
    for p in PHASES:
        h = per_phase[p] / scale
        ax0.bar(xs, h, bottom=bottom, label=p, color=PHASE_COLORS[p], width=0.65)
        bottom = bottom + h
    for x, top in zip(xs, bottom):
        ax0.annotate(fmt_time(top * scale), (x, top), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
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
    ax: Axes | None = None,
) -> Figure:
    """Latency of each restore in order (x = restore index: ``seq`` when
    present), one line per group; pool misses (``hit`` false: the pool had no
    idle shell and made one on the caller's path) are marked with red crosses."""
    import numpy as np

    df = frame(data)
    fig, ax0 = _start(ax, "Restore latency over time", title, df.empty)
    if df.empty:
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
    _finish(ax0, "restore index", f"restore time ({unit}{', log scale' if log else ''})", ylog=log)
    return fig


def latency_vs_memory(
    data: Any,
    *,
    by: Sequence[str] | str | None = ("strategy", "mode"),
    value: str = "total_ns",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Median restore latency against guest memory size, one line per group
    (default: strategy x pooled/unpooled), with the interquartile range as error
    bars; log time axis."""
    import numpy as np

    df = frame(data)
    fig, ax0 = _start(ax, "Restore latency vs guest memory size", title, df.empty)
    if df.empty:
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
    _finish(ax0, "guest memory (MiB, log scale)", f"median restore time ({unit}, log scale; bars: IQR)", ylog=True)
    return fig


def restore_overview(data: Any, *, title: str | None = None) -> Figure:
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


def reset_vs_dirty_pages(data: Any, *, by: str | None = None, title: str | None = None,
                         ax: Axes | None = None) -> Figure:
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
    _finish(ax0, "dirty pages put back (log scale)", f"reset time ({unit}, log scale)", xlog=True, ylog=True)
    return fig


def fork_ready_vs_n(data: Any, *, title: str | None = None, ax: Axes | None = None) -> Figure:
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
