"""Waiting until a pool's background work is done, before anything is timed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..pool import RestorePool

__all__ = ["SETTLE_TIMEOUT_S", "wait_settled", "settle"]

SETTLE_TIMEOUT_S = 60.0


def wait_settled(pool: RestorePool, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Waits until ``pool`` has an idle shell and no background work (shells
    being made, VMs being destroyed). After ``timeout_s`` it returns anyway:
    the measurement goes on and its record says whether it was a pool hit."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = pool.stats()
        if s.idle >= min(1, s.min_size) and s.creating == 0 and s.pending_destroy == 0:
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.0005)


def settle(*pools: RestorePool, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """:func:`wait_settled` for every pool."""
    for pool in pools:
        wait_settled(pool, timeout_s)
