"""``kvmlab demo``: the main job end to end, in a few seconds.

Boots the ``service`` guest to the point where it waits for a request,
snapshots it to a file, warms a :class:`~kvmlab.RestorePool`, then restores the
snapshot ``n`` times per path (unpooled ``Vm.restore`` and pooled
``restore_snapshot``, interleaved) and sends each restored VM one request
(``call(b"ping")``). It reports p50/p99 of the restore and of restore -> first
answer per path, and the pool's counters.

    >>> result = kvmlab.demo.run_demo(n=50)
    >>> print(result.to_text())
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import VmConfig
from .errors import GuestError
from .pool import PoolConfig, PoolStats, RestorePool
from .snapshot import Snapshot
from .units import fmt_size, fmt_time, fmt_ratio
from .vm import Vm

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["run_demo", "DemoResult", "PATHS", "REQUEST"]

#: The request every restored VM answers (the service guest echoes it).
REQUEST = b"ping"
#: The restore paths, in the order they are shown.
PATHS = ("unpooled", "pooled")
#: What each path calls, for the table.
PATH_CALLS = {"unpooled": "Vm.restore", "pooled": "pool.restore_snapshot"}
#: Bounds of ``n`` (restores per path): enough for a p99, few enough for seconds.
MAX_N = 2000


@dataclass
class DemoResult:
    """What :func:`run_demo` measured. Times are integer nanoseconds."""

    n: int
    memory_mib: int
    boot_ns: int
    snapshot_ns: int
    warm_ns: int
    warm_idle: int
    present_pages: int
    #: path -> restore times, one per restore.
    restore_ns: dict[str, list[int]] = field(default_factory=dict)
    #: path -> restore -> first answer times, one per restore.
    answer_ns: dict[str, list[int]] = field(default_factory=dict)
    pool_stats: PoolStats | None = None

    def summary(self) -> pd.DataFrame:
        """p50/p99 of restore and restore -> first answer per path (a DataFrame)."""
        import numpy as np
        import pandas as pd

        rows = []
        for path in PATHS:
            r, a = self.restore_ns[path], self.answer_ns[path]
            rows.append(
                {
                    "path": path,
                    "call": PATH_CALLS[path],
                    "restore_p50_ns": float(np.percentile(r, 50)),
                    "restore_p99_ns": float(np.percentile(r, 99)),
                    "answer_p50_ns": float(np.percentile(a, 50)),
                    "answer_p99_ns": float(np.percentile(a, 99)),
                }
            )
        return pd.DataFrame(rows).set_index("path")

    def to_text(self) -> str:
        """The report ``kvmlab demo`` prints (80 columns)."""
        s = self.summary()
        shown = s[[]].copy()
        shown.index = [f"{p} ({PATH_CALLS[p]})" for p in s.index]
        for col, src in (("restore p50", "restore_p50_ns"), ("restore p99", "restore_p99_ns"),
                         ("answer p50", "answer_p50_ns"), ("answer p99", "answer_p99_ns")):  # fmt: skip
            shown[col] = [fmt_time(v) for v in s[src]]
        st = self.pool_stats
        counters = [
            "pool      " + ", ".join(f"{c} {getattr(st, c)}" for c in ("restores", "hits", "misses", "failures")),
            "          " + ", ".join(f"shells {c} {getattr(st, c)}" for c in ("created", "destroyed")),
        ] if st else []  # fmt: skip
        speedup = s.loc["unpooled", "restore_p50_ns"] / s.loc["pooled", "restore_p50_ns"]
        lines = [
            f"guest     service, {self.memory_mib} MiB, 1 vCPU: booted to its request loop in {fmt_time(self.boot_ns)}",
            f"snapshot  {self.present_pages} pages present ({fmt_size(self.present_pages * 4096)}), "
            f"captured, saved and loaded in {fmt_time(self.snapshot_ns)}",
            f"pool      warmed to {self.warm_idle} idle shells in {fmt_time(self.warm_ns)}",
            "",
            f"{self.n} restores per path; answer = restore -> first answer to call({REQUEST!r}):",
            "",
            shown.to_string(index_names=False),
            "",
            *counters,
            f"restore p50, unpooled / pooled: {fmt_ratio(speedup)}",
        ]
        return "\n".join(lines)


def _one(path: str, snap: Snapshot, pool: RestorePool) -> tuple[int, int]:
    """One restore on ``path`` and one request: (restore ns, restore -> answer ns)."""
    t0 = time.perf_counter_ns()
    vm = Vm.restore(snap) if path == "unpooled" else pool.restore_snapshot(snap)
    t1 = time.perf_counter_ns()
    with vm:
        answer = vm.call(REQUEST)
        t2 = time.perf_counter_ns()
    if answer != REQUEST:
        raise GuestError(f"the restored service answered {answer!r} to {REQUEST!r}; the snapshot is not the service guest")
    return t1 - t0, t2 - t0


def run_demo(n: int = 100, memory_mib: int = 64, pool_size: int = 8) -> DemoResult:
    """Runs the demo (see the module docstring) and returns what it measured.

    Args:
        n: restores per path (1 .. 2000).
        memory_mib: guest memory of the service VM.
        pool_size: shells the pool keeps warm (its ``min_size`` and ``max_size``).

    Returns:
        A :class:`DemoResult`; ``to_text()`` is what ``kvmlab demo`` prints.

    Raises:
        ConfigError: ``n`` or a size is out of range.
        KvmlabError: KVM is unusable here (run ``kvmlab doctor``).
    """
    from .errors import ConfigError

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ConfigError(f"n must be an int in 1 .. {MAX_N}, got {n!r}")
    cfg = VmConfig(memory_mib=memory_mib)
    with tempfile.TemporaryDirectory(prefix="kvmlab-demo-") as tmp:
        t0 = time.perf_counter_ns()
        with Vm.boot("service", cfg) as svc:
            svc.run()  # to the service checkpoint: waiting for a request
            t1 = time.perf_counter_ns()
            path = svc.snapshot().save(Path(tmp) / "service.kvmsnap")
        with Snapshot.load(path) as snap:  # file-backed: restores map it copy-on-write
            t2 = time.perf_counter_ns()
            with RestorePool(cfg, PoolConfig(min_size=pool_size, max_size=pool_size)) as pool:
                pool.warm(pool_size)
                t3 = time.perf_counter_ns()
                res = DemoResult(n, memory_mib, t1 - t0, t2 - t1, t3 - t2, pool.idle_count(), snap.present_pages)
                for p in PATHS:
                    res.restore_ns[p], res.answer_ns[p] = [], []
                for i in range(n):
                    # Alternate which path goes first, so neither always runs
                    # right after the other's teardown.
                    for p in PATHS if i % 2 == 0 else PATHS[::-1]:
                        r, a = _one(p, snap, pool)
                        res.restore_ns[p].append(r)
                        res.answer_ns[p].append(a)
                res.pool_stats = pool.stats()
    return res
