"""Progress bars for long library operations (``fork_many``, the soak, ...).

A bar is ``tqdm.auto``: a widget in notebooks, text on stderr in terminals.
It appears only once the operation has run for :data:`DELAY_S` seconds, so
quick calls stay silent; ``progress=False`` on the operation turns it off.
Updating a bar costs well under a microsecond between redraws: keep updates
out of per-restore hot paths anyway (one per finished item at most).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["DELAY_S", "bar", "check"]

#: Seconds an operation runs before its bar shows.
DELAY_S = 1.0


class _Off:
    """The bar of an operation run with ``progress=False``: does nothing."""

    n = 0

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Off":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def check(progress: object) -> bool:
    """``progress`` itself, once checked to be a bool (ConfigError if not)."""
    if not isinstance(progress, bool):
        raise ConfigError(f"progress must be True or False, got {progress!r}", check="argument_type")
    return progress


def bar(total: float | None, desc: str, unit: str, progress: bool) -> Any:
    """A ``tqdm.auto`` bar (or a do-nothing one when ``progress`` is False).

    Raises:
        ConfigError: ``progress`` is not a bool.
    """
    if not check(progress):
        return _Off()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True)
