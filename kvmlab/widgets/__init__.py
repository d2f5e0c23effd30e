"""Jupyter widgets for a :class:`kvmlab.RestorePool` (ipywidgets).

    >>> from kvmlab.widgets import PoolMonitor, RestoreTimings
    >>> PoolMonitor(pool)        # occupancy, counters, last restore, Warm button
    >>> RestoreTimings(pool)     # live plot of pool.timings()

Model/view split: :class:`PoolModel` (traitlets) holds the pool's state, fed
from the frozen ``pool.stats()`` / ``pool.timings()``; the widgets observe it
and render. Plots come from :mod:`kvmlab.plot`. The widgets only use the
public Python API (never the native binding); they refresh themselves on a
timer thread while displayed (stopped by ``close()``) and on ``refresh()``.
Colours are JupyterLab's CSS variables (:mod:`kvmlab._html`), so the widgets
stay legible on dark themes.
"""

from ._model import PoolModel
from ._monitor import PoolMonitor
from ._timings import RestoreTimings, dashboard

__all__ = ["PoolModel", "PoolMonitor", "RestoreTimings", "dashboard"]
