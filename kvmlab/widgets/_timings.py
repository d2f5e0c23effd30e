"""RestoreTimings: a live matplotlib view of ``pool.timings()``."""

from __future__ import annotations

import base64
import html
import threading
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as W

from .. import plot
from .._html import COLOR
from ..errors import ClosedError, ConfigError
from ..pool import RestorePool
from ._ticker import AutoRefresh, Ticker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..pool import RestoreTiming
    from ._monitor import PoolMonitor


class RestoreTimings(AutoRefresh, W.VBox):
    """A figure of the pool's newest ``last`` restores, re-rendered when new
    restores happened: by default :func:`kvmlab.plot.restore_overview`
    (latency over time with pool misses marked, and the per-phase breakdown).
    ``plot_fn`` may be any function of a list of :class:`~kvmlab.RestoreTiming`
    returning a Figure (e.g. ``kvmlab.plot.latency_distribution``).

    The figure goes into an :class:`ipywidgets.Output` as a PNG; :attr:`figure`
    and :attr:`records` hold the latest figure and data. It refreshes every
    ``interval_s`` seconds while displayed (``close()`` stops that) and on
    :meth:`refresh`.

    Args:
        pool: the pool whose ``timings()`` to plot.
        last: how many of the newest restores to plot.
        interval_s: seconds between refreshes while displayed.
        plot_fn: records -> Figure (default :func:`kvmlab.plot.restore_overview`).
        autostart: start the refresh timer when the widget is displayed.
        dpi: resolution of the PNG.
        **kwargs: passed to :class:`ipywidgets.VBox`.

    Raises:
        ConfigError: ``pool`` is not a RestorePool.
    """

    def __init__(
        self,
        pool: RestorePool,
        *,
        last: int = 500,
        interval_s: float = 2.0,
        plot_fn: Callable[[list[RestoreTiming]], Figure] | None = None,
        autostart: bool = True,
        dpi: int = 80,
        **kwargs: Any,
    ) -> None:
        if not isinstance(pool, RestorePool):
            raise ConfigError(f"RestoreTimings takes a RestorePool, got {type(pool).__name__}", check="argument_type")
        self.pool = pool
        self.last = last
        self.plot_fn = plot_fn or plot.restore_overview
        self.dpi = dpi
        #: The last figure drawn (None before the first).
        self.figure: Figure | None = None
        self.records: list = []
        self.renders = 0
        self._seen: int | None = None
        self._autostart = autostart
        self._lock = threading.Lock()
        self._ticker = Ticker(interval_s, self._tick, name="kvmlab-timings-refresh")
        self.caption = W.HTML()
        self.output = W.Output()
        super().__init__([self.caption, self.output], **kwargs)
        self.add_class("kvmlab-restore-timings")
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> bool:
        """Re-renders if restores happened since the last render (or ``force``).
        Returns False once the pool is closed."""
        with self._lock:
            try:
                restores = self.pool.stats().restores
                if not force and restores == self._seen:
                    return True
                records = self.pool.timings(last=self.last)
            except ClosedError:
                self.caption.value = "<i>the pool is closed</i>"
                return False
            except Exception as e:  # noqa: BLE001 - shown in the widget
                self.caption.value = f'<span style="color:{COLOR["fail"]}">{html.escape(f"{type(e).__name__}: {e}")}</span>'
                return True
            self._seen = restores
            self.records = records
            try:
                fig = self.plot_fn(records)
                png = plot.to_png(fig, dpi=self.dpi)
            except Exception as e:  # noqa: BLE001
                self.caption.value = f'<span style="color:{COLOR["fail"]}">plot failed: {html.escape(f"{type(e).__name__}: {e}")}</span>'
                return True
            self.figure = fig
            self.renders += 1
            misses = sum(1 for r in records if not r.hit)
            self.caption.value = (
                f"<b>restore timings</b>: {restores} restores so far, the newest {len(records)} shown"
                f"{f', {misses} pool misses' if misses else ''}"
            )
            # Set the Output's outputs directly: works from any thread and without a frontend.
            self.output.outputs = (
                {
                    "output_type": "display_data",
                    "data": {
                        "image/png": base64.b64encode(png).decode("ascii"),
                        "text/plain": f"<Figure: {len(records)} restores>",
                    },
                    "metadata": {},
                },
            )
            return True

    def close(self) -> None:
        """Stops the timer and closes the widget (the pool stays open)."""
        self._close_parts(("caption", "output"))
        super().close()


class _Dashboard(W.VBox):
    def __init__(self, monitor: PoolMonitor, timings: RestoreTimings) -> None:
        self.monitor = monitor
        self.timings = timings
        super().__init__([monitor, timings])

    def refresh(self) -> None:
        self.monitor.refresh()
        self.timings.refresh()

    def close(self) -> None:
        self.monitor.close()
        self.timings.close()
        super().close()


def dashboard(pool: RestorePool, **kwargs: Any) -> W.VBox:
    """A :class:`PoolMonitor` above a :class:`RestoreTimings` for ``pool``
    (``.monitor``, ``.timings``; ``close()`` closes both)."""
    from ._monitor import PoolMonitor

    return _Dashboard(PoolMonitor(pool, **kwargs), RestoreTimings(pool))
