"""What every figure of :mod:`kvmlab.plot` shares: the phases and their
colours, timing data as a DataFrame, a new figure with its title, log axes."""

from __future__ import annotations

import functools
import io
import os
import socket
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Sequence, cast

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

#: The phases of a restore, in order (columns ``<phase>_ns``).
PHASES = ("acquire", "memory", "vcpu", "devices")
PHASE_COLORS = {"acquire": "#8c8c8c", "memory": "#1f77b4", "vcpu": "#ff7f0e", "devices": "#2ca02c"}
#: Phases of a reset (:class:`kvmlab.vm.ResetTiming`) and their colours.
RESET_PHASES = ("log", "memory", "vcpu", "devices")
RESET_PHASE_COLORS = {**PHASE_COLORS, "log": "#9467bd"}
MISS_COLOR = "#d62728"


def frame(data: Any) -> pd.DataFrame:
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


def _groups(df: pd.DataFrame, by: Sequence[str] | str | None, sep: str = " ") -> list[tuple[str, pd.DataFrame]]:
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


def _new_figure(ax: Axes | None, size: tuple[float, float] = (7.0, 4.2)) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    if ax is not None:
        return cast("Figure", ax.figure), ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _title(fig: Figure, ax: Axes, what: str, title: str | None, own_figure: bool) -> None:
    text = title or what
    if own_figure:
        fig.suptitle(f"{text}\non {host_label()}", fontsize=10)
    else:
        ax.set_title(text, fontsize=9)


def _log_axis(axis: Axis) -> None:
    """Plain-number tick labels (``0.2``, ``600``, ``1000``) on a log axis;
    minor ticks are labelled when the axis spans few decades."""
    from matplotlib import ticker

    class _Plain(ticker.LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            # LogFormatter decides which ticks get a label; print those plainly.
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _empty(ax: Axes, msg: str = "no restores yet") -> None:
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _records(data: Any, needed: Sequence[str], aliases: dict[str, str] | None = None) -> pd.DataFrame:
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


def _start(ax: Any, what: str, title: str | None, no_data: bool, empty: str = "no restores yet",
           size: tuple[float, float] = (7.0, 4.2)) -> tuple[Any, Any]:  # fmt: skip
    """(the figure, its Axes): a new figure, or ``ax`` and its figure, titled;
    with ``no_data`` the Axes says ``empty`` (the caller returns the figure)."""
    fig, ax0 = _new_figure(ax, size)
    _title(fig, ax0, what, title, ax is None)
    if no_data:
        _empty(ax0, empty)
    return fig, ax0


def _finish(ax: Any, xlabel: str, ylabel: str, *, xlog: bool = False, ylog: bool = False, **legend: Any) -> None:
    """Log axes with plain tick labels, the axis labels, a grid on major and
    minor ticks and the legend (``legend``: its keywords; font size 8)."""
    if xlog:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
    if ylog:
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**{"fontsize": 8, **legend})


def _records_figure(data: Any, needed: Sequence[str], what: str, title: str | None, ax: Axes | None, empty: str,
                    aliases: dict[str, str] | None = None) -> tuple[pd.DataFrame, Figure, Axes]:  # fmt: skip
    """(the data as a DataFrame, the figure, its Axes), as :func:`_start` makes them."""
    df = _records(data, needed, aliases)
    fig, ax0 = _start(ax, what, title, df.empty, empty)
    return df, fig, ax0


def _median_line(ax: Axes, df: pd.DataFrame, x: str, y: str, scale: float, color: str, label: str, by: str | None = None) -> None:
    """Every point faintly, the medians per ``by`` (default: per x) as a line."""
    ax.scatter(df[x], df[y] / scale, s=10, alpha=0.35, color=color, linewidths=0)
    if by is not None and by not in df.columns:
        raise ValueError(f"by={by!r} is not a column of the data ({', '.join(map(str, df.columns))})")
    med = df[[x, y]].groupby(df[by or x].to_numpy()).median().sort_values(x)
    ax.plot(med[x], med[y] / scale, marker="o", color=color, label=label)


def to_png(fig: Figure, dpi: int = 96) -> bytes:
    """The figure rendered as PNG bytes (Agg; no pyplot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
