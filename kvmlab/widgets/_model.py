"""PoolModel: a RestorePool's state as traitlets."""

from __future__ import annotations

import dataclasses
from typing import Any

import traitlets

from ..pool import PoolStats, RestorePool, RestoreTiming
from ..snapshot import Snapshot

#: The PoolStats fields mirrored as traits (tests/test_widgets.py checks that
#: each has its trait).
STATS_FIELDS = tuple(f.name for f in dataclasses.fields(PoolStats))


def snapshot_label(snap: Snapshot) -> str:
    """How the widgets name a snapshot: its guest, size and a short id."""
    return f"{snap.guest} {snap.config.memory_mib} MiB #{id(snap) % 0xFFFF:04x}"


class PoolModel(traitlets.HasTraits):
    """The state a pool widget shows. Update it with :meth:`update` (from
    ``pool.stats()`` and the newest ``pool.timings()`` record) or
    :meth:`update_from` (reads the pool); observe the traits to render."""

    # occupancy
    idle = traitlets.Int(0)
    in_use = traitlets.Int(0)
    creating = traitlets.Int(0)
    max_size = traitlets.Int(1)
    min_size = traitlets.Int(0)
    max_in_use = traitlets.Int(None, allow_none=True)
    # counters
    hits = traitlets.Int(0)
    misses = traitlets.Int(0)
    created = traitlets.Int(0)
    destroyed = traitlets.Int(0)
    failures = traitlets.Int(0)
    restores = traitlets.Int(0)
    releases = traitlets.Int(0)
    pending_destroy = traitlets.Int(0)
    parked = traitlets.Int(0)
    reuses = traitlets.Int(0)
    resets = traitlets.Int(0)
    prepared = traitlets.Int(0)
    #: per prepared snapshot (its label): {"ready": n, "target": n}
    prepared_by_snapshot = traitlets.Dict()
    # the newest restore: RestoreTiming fields (ns), or {} before the first
    last_restore = traitlets.Dict()
    # shape
    memory_mib = traitlets.Int(0)
    vcpus = traitlets.Int(0)
    # lifecycle of the widget's own actions
    closed = traitlets.Bool(False)
    warming = traitlets.Bool(False)
    warm_target = traitlets.Int(0)
    #: "" or the last error, as "ExceptionType: message"
    error = traitlets.Unicode("")
    #: a one-line human status ("warmed to 4 idle in 2.1 ms", ...)
    status = traitlets.Unicode("")

    def update(self, stats: PoolStats, last: RestoreTiming | None = None) -> None:
        """Copies ``stats`` (and ``last``, if given) into the traits; observers
        fire once per changed trait, after all are set."""
        with self.hold_trait_notifications():
            for name in STATS_FIELDS:
                setattr(self, name, getattr(stats, name))
            if last is not None:
                d = dataclasses.asdict(last)  # every RestoreTiming field, as the record names them
                if d != self.last_restore:
                    self.last_restore = d

    def update_from(self, pool: RestorePool) -> bool:
        """Reads ``pool`` (stats, and the newest timing when restores changed).
        Returns False (and sets :attr:`closed`) if the pool is closed."""
        from ..errors import ClosedError

        if pool.closed:
            self.closed = True
            return False
        try:
            stats = pool.stats()
            last = None
            # The newest record also changes after a restore (its first run's time).
            if stats.restores:
                recs = pool.timings(last=1)
                last = recs[-1] if recs else None
        except ClosedError:
            self.closed = True
            return False
        self.memory_mib = pool.vm_config.memory_mib
        self.vcpus = pool.vm_config.vcpus
        self.update(stats, last)
        by_snap = {snapshot_label(snap): {"ready": pool.prepared_count(snap), "target": n}
                   for snap, n in pool.prepared_targets().items()}
        if by_snap != self.prepared_by_snapshot:
            self.prepared_by_snapshot = by_snap
        return True

    def snapshot(self) -> dict[str, Any]:
        """The traits as a plain dict."""
        return {name: getattr(self, name) for name in self.trait_names()}
