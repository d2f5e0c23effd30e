"""The pool's records: :class:`PoolStats` (its counters, one consistent
read) and :class:`RestoreTiming` (one restore's phases), as frozen
dataclasses built from the core's structs; :func:`timings_frame` turns timings
into a DataFrame. :mod:`kvmlab.pool` re-exports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable

from . import _ffi

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PoolStats", "RestoreTiming", "STRATEGY_NAMES", "timings_frame"]

#: PoolStats fields that count events, in the order displays show them.
COUNTERS = ("restores", "hits", "misses", "failures", "created", "destroyed", "releases", "pending_destroy")
#: Counters of features not every pool uses (reset on release, prepare): shown once non-zero.
EXTRA_COUNTERS = ("parked", "prepared", "reuses", "resets")


def shown_counters(stats: Any) -> tuple[str, ...]:
    """The counters a display of ``stats`` (a PoolStats, or anything with its
    fields, e.g. the widgets' PoolModel) shows, in order."""
    return COUNTERS + tuple(c for c in EXTRA_COUNTERS if getattr(stats, c))


#: ``kvmlab_pool_timing.strategy`` -> name (``kvmlab_strategy``, read from the header).
STRATEGY_NAMES = _ffi.enum_names("kvmlab_strategy")


@dataclass(frozen=True)
class PoolStats:
    """A frozen view of the pool's counters (one consistent read).

    Attributes:
        idle: empty shells ready now.
        in_use: restored VMs handed out and not released.
        creating: shells being made by the worker.
        hits: restores that took an idle shell; ``misses`` made one on the spot.
        failures: restores that failed (the shell is destroyed).
        created: shells made so far; ``destroyed`` shells or VMs destroyed.
        pending_destroy: released VMs waiting for the worker to destroy them.
        parked: VMs kept for reuse (``reset_on_release``) or prepared;
            ``reuses``/``resets`` count them.
        prepared: VMs of prepared snapshots ready now (:meth:`RestorePool.prepare`).
    """

    idle: int
    in_use: int
    max_size: int
    min_size: int
    max_in_use: int | None
    creating: int
    created: int
    destroyed: int
    hits: int
    misses: int
    failures: int
    restores: int
    releases: int
    pending_destroy: int
    parked: int = 0
    reuses: int = 0
    resets: int = 0
    prepared: int = 0

    def __repr__(self) -> str:
        limit = f"/{self.max_in_use}" if self.max_in_use else ""
        return (
            f"PoolStats(idle={self.idle}/{self.max_size}, in_use={self.in_use}{limit}, creating={self.creating}, "
            f"restores={self.restores} (hits {self.hits}, misses {self.misses}), failures={self.failures}, "
            f"created={self.created}, destroyed={self.destroyed})"
        )

    def _repr_html_(self, title: str = "PoolStats") -> str:
        from . import _html

        capacity = max(self.max_size, self.idle + self.in_use + self.creating, 1)
        parts = [("in use", self.in_use, "brand"), ("idle", self.idle, "ok"), ("creating", self.creating, "warn")]
        if self.prepared:
            parts.append(("prepared", self.prepared, "ok"))
        occupancy = (
            f'<div class="kvmlab-occupancy">{self.idle} idle, {self.in_use} in use, {self.creating} creating; '
            f"capacity {self.max_size} (min {self.min_size}), in use limit {self.max_in_use or 'none'}</div>"
        )
        legend = _html.legend((name, str(v), role) for name, v, role in parts)
        counters = [(c.replace("_", " "), getattr(self, c)) for c in shown_counters(self)]
        body = _html.bar(parts, capacity) + occupancy + legend + _html.table(counters)
        return _html.box(title, body, "kvmlab-pool-stats")


@dataclass(frozen=True)
class RestoreTiming:
    """Integer nanoseconds per phase of one pooled restore. ``first_run_ns``:
    the VM's first native run after it (``run()`` or ``call()``; a run a
    signal interrupted counts up to the signal), None until it ran; the core
    records it."""

    seq: int
    acquire_ns: int
    memory_ns: int
    vcpu_ns: int
    devices_ns: int
    total_ns: int
    first_run_ns: int | None
    memory_bytes: int
    hit: bool
    strategy: str


def restore_timing_record(d: dict[str, int]) -> RestoreTiming:
    """A ``kvmlab_pool_timing`` (as a dict) as a :class:`RestoreTiming`."""
    # The core's ints as they are, but for the fields converted here.
    converted: dict[str, Any] = {
        "first_run_ns": d["first_run_ns"] or None, "hit": bool(d["hit"]), "strategy": STRATEGY_NAMES.get(d["strategy"], "?"),
    }  # fmt: skip
    return RestoreTiming(**{**d, **converted})


def timings_frame(records: Iterable[RestoreTiming]) -> pd.DataFrame:
    """``pool.timings()`` as a pandas DataFrame (one row per restore).

    Args:
        records: :class:`RestoreTiming` records.

    Returns:
        A DataFrame with one column per :class:`RestoreTiming` field.
    """
    import pandas as pd

    rows = [asdict(r) for r in records]
    return pd.DataFrame(rows, columns=[f.name for f in fields(RestoreTiming)])
