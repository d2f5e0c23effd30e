"""``with obj:`` for every kvmlab object that owns native resources."""

from __future__ import annotations

from typing import Self


class Closing:
    """Mixin: ``with obj:`` closes ``obj`` on the way out, whatever happened
    inside. The class defines ``close()`` (idempotent)."""

    __slots__ = ()

    def close(self) -> None:  # pragma: no cover - every user defines it
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
