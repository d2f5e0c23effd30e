"""PoolMonitor: occupancy, counters, the last restore, and Warm on demand."""

from __future__ import annotations

import html
import threading
import time

from typing import Any, Callable, Iterable

import ipywidgets as W

from .. import _html, plot
from .._html import COLOR
from .._pool_records import COUNTERS, EXTRA_COUNTERS, shown_counters
from ..errors import ConfigError
from ..pool import RestorePool
from ..snapshot import Snapshot
from ..units import choose_unit, fmt_time
from ._model import PoolModel, snapshot_label
from ._ticker import AutoRefresh, Ticker


def phase_bar_html(rec: dict) -> str:
    """A restore's phases as a stacked HTML bar with the numbers."""
    if not rec:
        return "<i>no restore yet</i>"
    phases = {p: int(rec.get(f"{p}_ns") or 0) for p in plot.PHASES}
    whole = sum(phases.values()) or 1
    unit = choose_unit([rec.get("total_ns") or whole])
    hit = "hit" if rec.get("hit") else f'<b style="color:{COLOR["fail"]}">miss</b>'
    first = rec.get("first_run_ns")
    first_txt = f", first run {fmt_time(first)}" if first else ""
    segments = [(f"{p}: {fmt_time(v, unit)}", v, plot.PHASE_COLORS[p]) for p, v in phases.items()]
    legend = _html.legend((p, fmt_time(v, unit), plot.PHASE_COLORS[p]) for p, v in phases.items())
    return (
        f'<div class="kvmlab-last-restore">last restore #{rec.get("seq")} ({html.escape(str(rec.get("strategy")))}, {hit}): '
        f"<b>{fmt_time(rec.get('total_ns'), unit)}</b>{first_txt}"
        f'{_html.bar(segments, whole, 480)}<span style="font-size:90%">{legend}</span></div>'
    )


def counters_html(model: PoolModel) -> str:
    cells = "".join(
        f'<td style="padding:0 10px;text-align:center"><div style="font-size:130%"><b>{getattr(model, c)}</b></div>'
        f'<div style="font-size:85%;color:{COLOR["muted"]}">{c.replace("_", " ")}</div></td>'
        for c in shown_counters(model)
    )
    return f'<table class="kvmlab-counters" style="color:{COLOR["text"]}"><tr>{cells}</tr></table>'


class PoolMonitor(AutoRefresh, W.VBox):
    """A live view of a :class:`~kvmlab.RestorePool` with a Warm control.

    Shows idle / in-use / capacity as bars with numbers, the counters of
    ``pool.stats()`` and the phase breakdown of the newest restore. While the
    widget is displayed a timer thread refreshes it every ``interval_s``
    seconds (``start()``/``stop()`` control it; ``close()`` stops it);
    :meth:`refresh` updates it at once.

    **Warm**: the target box (bounded by ``max_size``) and the Warm button
    create idle shells on a worker thread, so the kernel stays responsive;
    the progress bar follows the idle count, and errors land in the status
    line (and :attr:`PoolModel.error`). :meth:`warm` does the same from code.
    With a snapshot chosen in the ``warm`` menu (the pool's prepared ones and
    those passed as ``snapshots``) the button prepares that many VMs of it
    instead (:meth:`RestorePool.prepare`); prepared VMs show per snapshot.

    Args:
        pool: the pool to show (it stays open when the widget closes).
        snapshots: snapshots the Warm control offers to prepare.
        interval_s: seconds between refreshes while displayed.
        autostart: start the refresh timer when the widget is displayed.
        **kwargs: passed to :class:`ipywidgets.VBox`.

    Raises:
        ConfigError: ``pool`` is not a RestorePool.
    """

    def __init__(self, pool: RestorePool, *, snapshots: Iterable[Snapshot] = (), interval_s: float = 1.0,
                 autostart: bool = True, **kwargs: Any) -> None:
        if not isinstance(pool, RestorePool):
            raise ConfigError(f"PoolMonitor takes a RestorePool, got {type(pool).__name__}", check="argument_type")
        self.pool = pool
        self.model = PoolModel()
        self._autostart = autostart
        self._refresh_lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._warm_thread: threading.Thread | None = None
        self._ticker = Ticker(interval_s, self._tick)

        self.header = W.HTML()
        self.idle_bar = W.IntProgress(min=0, max=1, description="idle", bar_style="success")
        self.idle_label = W.Label()
        self.in_use_bar = W.IntProgress(min=0, max=1, description="in use", bar_style="info")
        self.in_use_label = W.Label()
        self.prepared = W.HTML()
        self.warm_what = W.Dropdown(options=[("idle shells", None)], value=None, description="warm",
                                    layout=W.Layout(width="300px"))
        self._offered: list = []
        for snap in snapshots:
            self._offer(snap)
        self.counters = W.HTML()
        self.last_restore = W.HTML()
        self.target = W.BoundedIntText(value=1, min=0, max=1, description="target", layout=W.Layout(width="170px"))
        self.warm_button = W.Button(
            description="Warm", icon="fire", button_style="warning",
            tooltip="create idle shells until `target` are idle (runs off the kernel's thread)",
        )  # fmt: skip
        self.warm_progress = W.IntProgress(
            min=0, max=1, value=0, description="", bar_style="", layout=W.Layout(visibility="hidden")
        )
        self.status = W.HTML()
        self.warm_button.on_click(self._on_warm_click)

        m = self.model
        m.observe(self._render_header, names=["memory_mib", "vcpus", "closed"])
        m.observe(self._render_occupancy, names=["idle", "in_use", "creating", "max_size", "min_size", "max_in_use",
                                                 "prepared"])
        m.observe(self._render_prepared, names=["prepared_by_snapshot"])
        m.observe(self._render_counters, names=list(COUNTERS + EXTRA_COUNTERS))
        m.observe(self._render_last, names=["last_restore"])
        m.observe(self._render_status, names=["status", "error", "warming", "closed"])

        super().__init__(
            [
                self.header,
                W.HBox([self.idle_bar, self.idle_label]),
                W.HBox([self.in_use_bar, self.in_use_label]),
                self.prepared,
                self.counters,
                self.last_restore,
                W.HBox([self.warm_what, self.target, self.warm_button, self.warm_progress]),
                self.status,
            ],
            **kwargs,
        )
        self.add_class("kvmlab-pool-monitor")
        self.refresh()
        self.target.value = self.model.max_size
        self._render_all()

    # -- rendering (model -> view) -------------------------------------------------------

    def _render_all(self) -> None:
        self._render_header()
        self._render_occupancy()
        self._render_prepared()
        self._render_counters()
        self._render_last()
        self._render_status()

    def _render_header(self, change: object = None) -> None:
        m = self.model
        state = f' <span style="color:{COLOR["fail"]}">(closed)</span>' if m.closed else ""
        self.header.value = f"<b>RestorePool</b> {m.memory_mib} MiB &times; {m.vcpus} vCPU{state}"

    def _render_occupancy(self, change: object = None) -> None:
        m = self.model
        cap = max(m.max_size, 1)
        self.idle_bar.max = cap
        self.idle_bar.value = min(m.idle, cap)
        prepared = f", {m.prepared} prepared" if m.prepared else ""
        self.idle_label.value = (f"{m.idle} idle / {m.max_size} capacity (min {m.min_size}), {m.creating} creating"
                                 f"{prepared}")
        limit = m.max_in_use
        self.in_use_bar.max = max(limit or max(m.max_size, m.in_use), 1)
        self.in_use_bar.value = min(m.in_use, self.in_use_bar.max)
        self.in_use_label.value = f"{m.in_use} in use / {limit if limit else 'no'} limit"
        self.target.max = m.max_size
        # The warm progress bar reports the last warm until the pool moves on.
        if not m.warming and self.warm_progress.layout.visibility != "hidden" and m.idle != self.warm_progress.value:
            self.warm_progress.layout.visibility = "hidden"

    def _render_prepared(self, change: object = None) -> None:
        rows = self.model.prepared_by_snapshot
        self.prepared.value = "" if not rows else (
            '<div class="kvmlab-prepared"><b>prepared</b>: ' + "; ".join(
                f"{html.escape(label)}: {r['ready']} ready / {r['target']}" for label, r in rows.items()) + "</div>")
        for snap in self.pool.prepared_targets() if not self.pool.closed else ():
            self._offer(snap)

    def _offer(self, snap: Snapshot) -> None:
        """Adds ``snap`` to the Warm menu (once)."""
        if any(s is snap for s in self._offered):
            return
        self._offered.append(snap)
        self.warm_what.options = [*self.warm_what.options, (f"prepare {snapshot_label(snap)}", snap)]

    def _render_counters(self, change: object = None) -> None:
        self.counters.value = counters_html(self.model)

    def _render_last(self, change: object = None) -> None:
        self.last_restore.value = phase_bar_html(self.model.last_restore)

    def _render_status(self, change: object = None) -> None:
        m = self.model
        self.warm_button.disabled = m.warming or m.closed
        if m.error:
            self.status.value = f'<span style="color:{COLOR["fail"]}"><b>error:</b> {html.escape(m.error)}</span>'
        elif m.closed:
            self.status.value = "<i>the pool is closed</i>"
        else:
            self.status.value = html.escape(m.status)

    # -- refreshing (pool -> model) ---------------------------------------------------------

    def refresh(self) -> bool:
        """Reads the pool now. Returns False once the pool is closed."""
        with self._refresh_lock:
            try:
                return self.model.update_from(self.pool)
            except Exception as e:  # noqa: BLE001 - show it, do not kill the timer
                self.model.error = f"{type(e).__name__}: {e}"
                return True

    # -- warming -----------------------------------------------------------------------------

    def _on_warm_click(self, _button: object) -> None:
        self.warm(self.target.value, snapshot=self.warm_what.value)

    def warm(self, target: int | None = None, snapshot: Snapshot | None = None) -> threading.Thread:
        """Warms the pool to ``target`` idle shells (default: the target box)
        on a worker thread and returns it (``join()`` to wait); with a
        ``snapshot``, prepares ``target`` VMs of it instead. One warm runs
        at a time; a second call while one runs returns the running thread.

        Args:
            target: idle shells (or prepared VMs) wanted (capped at the pool's ``max_size``).
            snapshot: a snapshot to prepare (added to the Warm menu).

        Returns:
            The worker thread; errors show in the status line and ``model.error``.
        """
        with self._warm_lock:
            if self._warm_thread is not None and self._warm_thread.is_alive():
                return self._warm_thread
            target = int(self.target.value if target is None else target)
            m = self.model
            m.error = ""
            m.warm_target = target
            if snapshot is not None:
                self._offer(snapshot)
                self.warm_what.value = snapshot
            m.status = f"warming to {target} idle…" if snapshot is None else f"preparing {target}…"
            m.warming = True
            goal = max(min(target, m.max_size), 1)  # the pool stops at max_size
            self.warm_progress.max = goal
            self.warm_progress.value = min(m.idle, goal)
            self.warm_progress.bar_style = "info"
            self.warm_progress.layout.visibility = "visible"
            worker = self._warm_worker if snapshot is None else self._prepare_worker
            args = (target,) if snapshot is None else (target, snapshot)
            t = threading.Thread(target=worker, args=args, name="kvmlab-pool-warm", daemon=True)
            self._warm_thread = t
            t.start()
            return t

    def wait_warm(self, timeout_s: float | None = 30.0) -> None:
        """Waits for a running warm to finish."""
        t = self._warm_thread
        if t is not None:
            t.join(timeout_s)

    def _warm_worker(self, target: int) -> None:
        def work() -> str:
            # One shell at a time, so the progress bar moves.
            m = self.model
            start = min(self.pool.idle_count(), target)
            for k in range(start + 1, min(target, m.max_size) + 1):
                self.pool.warm(k)
                self.refresh()
                self.warm_progress.value = min(self.model.idle, self.warm_progress.max)
            self.pool.warm(target)  # the final word (also raises if closed)
            self.refresh()
            self.warm_progress.value = min(m.idle, self.warm_progress.max)
            return f"warmed to {min(target, m.max_size)}: {m.idle} idle"

        self._run_worker(work)

    def _prepare_worker(self, target: int, snap: Snapshot) -> None:
        def work() -> str:
            # Keep the warmup it was prepared with: every prepared VM ran it.
            self.pool.prepare(snap, target, warmup=self.pool._warmup_of(snap))
            self.refresh()
            ready = self.pool.prepared_count(snap)
            self.warm_progress.value = min(ready, self.warm_progress.max)
            return f"prepared {snapshot_label(snap)}: {ready} ready"

        self._run_worker(work)

    def _run_worker(self, work: Callable[[], str]) -> None:
        """Runs ``work()`` (it returns what was done, in words) on the warm
        thread: its time in the status line, or its error in ``model.error``."""
        m = self.model
        t0 = time.perf_counter()
        try:
            done = work()
            ms = (time.perf_counter() - t0) * 1e3
            self.warm_progress.bar_style = "success"
            m.status = f"{time.strftime('%H:%M:%S')} {done} in {ms:.1f} ms"
        except Exception as e:  # noqa: BLE001 - shown in the widget, kept in model.error
            self.warm_progress.bar_style = "danger"
            m.status = ""
            m.error = f"{type(e).__name__}: {e}"
            self.refresh()
        finally:
            m.warming = False

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the timer and closes the widget (the pool stays open)."""
        self._close_parts(("header", "idle_bar", "idle_label", "in_use_bar", "in_use_label", "prepared", "warm_what",
                           "counters", "last_restore", "target", "warm_button", "warm_progress", "status"))  # fmt: skip
        for w in getattr(self, "children", ()):
            w.close()
        super().close()
