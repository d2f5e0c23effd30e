"""A daemon thread calling a function every few seconds until stopped."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable


class Ticker:
    def __init__(self, interval_s: float, fn: Callable[[], object], name: str = "kvmlab-widget-refresh") -> None:
        if not interval_s > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._fn = fn
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def start(self) -> None:
        with self._lock:
            if self.running:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(self._stop,), name=self._name, daemon=True)
            self._thread.start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                if self._fn() is False:
                    return
            except Exception:  # noqa: BLE001 - the callback shows its own errors; never kill the loop
                pass

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stop.set()
            t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)


class AutoRefresh:
    """Mixin for widgets that refresh themselves while displayed: needs
    ``self.pool``, ``self._ticker`` (a :class:`Ticker` calling ``self._tick``),
    ``self._autostart`` and a ``refresh() -> bool`` (False stops the timer)."""

    pool: Any
    _ticker: Ticker
    _autostart: bool

    if TYPE_CHECKING:

        def refresh(self) -> bool: ...

    def _tick(self) -> bool:
        return self.refresh()

    def start(self) -> None:
        """Starts the refresh timer (done automatically when displayed)."""
        if not self.pool.closed:
            self._ticker.start()

    def stop(self) -> None:
        """Stops the refresh timer."""
        self._ticker.stop()

    @property
    def auto_refreshing(self) -> bool:
        return self._ticker.running

    def _close_parts(self, names: Iterable[str]) -> None:
        """For close(): stops the timer and closes the named child widgets.
        Any may be absent: Widget.__del__ calls close() after a failed __init__."""
        ticker = getattr(self, "_ticker", None)
        if ticker is not None:
            ticker.stop()
        for name in names:
            w = getattr(self, name, None)
            if w is not None:
                w.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        if self._autostart:
            self.start()
        return super()._repr_mimebundle_(**kwargs)  # type: ignore[misc]  # the widget class after this mixin has it
