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
PATHS = ("unpooled", "pooled", "prepared")
#: What each path calls, for the table (prepared: the prepared pool's).
PATH_CALLS = {"unpooled": "Vm.restore", "pooled": "pool.restore_snapshot", "prepared": "after pool.prepare"}
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
    #: The prepared pool: how long ``prepare`` took and its counters.
    prepare_ns: int = 0
    prepared_n: int = 0
    prepared_stats: PoolStats | None = None

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
        speedup = s.loc["unpooled", "restore_p50_ns"] / s.loc["pooled", "restore_p50_ns"]
        answer_speedup = s.loc["pooled", "answer_p50_ns"] / s.loc["prepared", "answer_p50_ns"]
        lines = [
            f"guest     service, {self.memory_mib} MiB, 1 vCPU: booted to its request loop in {fmt_time(self.boot_ns)}",
            f"snapshot  {self.present_pages} pages present ({fmt_size(self.present_pages * 4096)}), "
            f"captured, saved and loaded in {fmt_time(self.snapshot_ns)}",
            f"pool      warmed to {self.warm_idle} idle shells in {fmt_time(self.warm_ns)}",
            f"prepared  {self.prepared_n} VMs restored, warmed by call({REQUEST!r}) and reset "
            f"in {fmt_time(self.prepare_ns)}",
            "",
            f"{self.n} restores per path; answer = restore -> first answer to call({REQUEST!r}):",
            "",
            shown.to_string(index_names=False),
            "",
            *_counters("pool", self.pool_stats, (
                tuple((c, c) for c in ("restores", "hits", "misses", "failures")),
                (("shells created", "created"), ("shells destroyed", "destroyed")),
            )),
            *_counters("prepared", self.prepared_stats, (
                (("restores", "restores"), ("failures", "failures")),
                (("VMs prepared", "prepared"), ("resets", "resets")),
            )),
            f"restore p50, unpooled / pooled: {fmt_ratio(speedup)}",
            f"restore -> answer p50, pooled / prepared: {fmt_ratio(answer_speedup)}",
        ]
        return "\n".join(lines)


def _counters(label: str, st: PoolStats | None, lines: tuple[tuple[tuple[str, str], ...], ...]) -> list[str]:
    """A pool's counters: one line per tuple of (shown name, ``PoolStats`` field)."""
    if st is None:
        return []
    return [
        f"{label if i == 0 else '':<10}" + ", ".join(f"{name} {getattr(st, attr)}" for name, attr in line)
        for i, line in enumerate(lines)
    ]


def _one(path: str, snap: Snapshot, pools: dict[str, RestorePool]) -> tuple[int, int]:
    """One restore on ``path`` and one request: (restore ns, restore -> answer ns)."""
    t0 = time.perf_counter_ns()
    vm = Vm.restore(snap) if path == "unpooled" else pools[path].restore_snapshot(snap)
    t1 = time.perf_counter_ns()
    with vm:
        answer = vm.call(REQUEST)
        t2 = time.perf_counter_ns()
    if answer != REQUEST:
        raise GuestError(f"the restored service answered {answer!r} to {REQUEST!r}; the snapshot is not the service guest", check="service_answer")
    return t1 - t0, t2 - t0


def run_demo(n: int = 100, memory_mib: int = 64, pool_size: int = 8) -> DemoResult:
    """Runs the demo (see the module docstring) and returns what it measured.

    Args:
        n: restores per path (1 .. 2000).
        memory_mib: guest memory of the service VM.
        pool_size: shells the shell pool keeps warm (its ``min_size`` and
            ``max_size``), and VMs the second pool keeps prepared.

    Returns:
        A :class:`DemoResult`; ``to_text()`` is what ``kvmlab demo`` prints.

    Raises:
        ConfigError: ``n`` or a size is out of range.
        KvmlabError: KVM is unusable here (run ``kvmlab doctor``).
    """
    from .errors import ConfigError

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ConfigError(f"n must be an int in 1 .. {MAX_N}, got {n!r}", check="argument_range")
    cfg = VmConfig(memory_mib=memory_mib)
    with tempfile.TemporaryDirectory(prefix="kvmlab-demo-") as tmp:
        t0 = time.perf_counter_ns()
        with Vm.boot("service", cfg) as svc:
            svc.run()  # to the service checkpoint: waiting for a request
            t1 = time.perf_counter_ns()
            path = svc.snapshot().save(Path(tmp) / "service.kvmsnap")
        with Snapshot.load(path) as snap:  # file-backed: restores map it copy-on-write
            t2 = time.perf_counter_ns()
            pcfg = PoolConfig(min_size=pool_size, max_size=pool_size)
            # Two pools: restore_snapshot of a prepared snapshot takes a
            # prepared VM, so the shell path needs a pool without one.
            with RestorePool(cfg, pcfg) as pool, RestorePool(cfg, PoolConfig(max_size=pool_size)) as ppool:
                pool.warm(pool_size)
                t3 = time.perf_counter_ns()
                res = DemoResult(n, memory_mib, t1 - t0, t2 - t1, t3 - t2, pool.idle_count(), snap.present_pages)
                ppool.prepare(snap, pool_size, warmup=lambda vm: vm.call(REQUEST))
                res.prepare_ns, res.prepared_n = time.perf_counter_ns() - t3, ppool.prepared_count(snap)
                _measure(res, snap, {"pooled": pool, "prepared": ppool})
                res.pool_stats, res.prepared_stats = pool.stats(), ppool.stats()
    return res


def _measure(res: DemoResult, snap: Snapshot, pools: dict[str, RestorePool]) -> None:
    """``res.n`` restores and requests per path, into ``res``."""
    for p in PATHS:
        res.restore_ns[p], res.answer_ns[p] = [], []
    for i in range(res.n):
        # Rotate which path goes first, so none always runs right after
        # another's teardown.
        k = i % len(PATHS)
        for p in PATHS[k:] + PATHS[:k]:
            r, a = _one(p, snap, pools)
            res.restore_ns[p].append(r)
            res.answer_ns[p].append(a)
