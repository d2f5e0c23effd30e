"""``kvmlab bench restore``: how fast a snapshot restore is, pooled and not,
against the floor of what this host allows.

The same file-backed snapshot is restored ``n`` times on each path and
strategy, interleaved (a new random order every iteration; every path timed
only after every pool's background work is done; every path that takes shells
has a pool of its own, used once per iteration, so all shells wait about as
long) so the machine's noise hits all paths alike:

* ``pooled``: :meth:`RestorePool.restore_snapshot` into an idle shell of a settled pool;
* ``native``: the same pooled restore driven from native code (the baseline
  of the Python API's overhead);
* ``unpooled``: :meth:`Vm.restore`, which creates the shell on demand (its
  ``acquire`` phase);
* ``floor``: the bare ioctls and memory operations of a restore into a fresh
  shell made just before (untimed): what the host allows;
* ``floor-idle``: the same into an idle shell of a settled pool, as old as
  the pooled path's (what the host allows a shell that waited);
* ``service``: pooled restore of the ``service`` guest plus its first answer.

Every record has ``call_ns`` (around the Python call; the floors around their
bare native call; ``native`` as timed natively) and, where the core reports
them, the phases ``acquire``/``memory``/``vcpu``/``devices``/``total`` (ns)
and ``first_run_ns`` (the restored VM's next run).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..plot import PHASES  # the core's phases of a restore, in order (said once, there)
from ._native import floors_available, pool_restore, restore_floor
from .harness import (COUNT, DENSE_FRACTION, FLAG, FRACTION, MEMORY_SIZES, REPS, STRATEGY, TEXT, Progress, check_args,
                      make_snapshot, measure)
from .settle import settle
from .results import Part, Results
from .targets import restore_verdicts

if TYPE_CHECKING:
    from ..pool import RestorePool
    from ..snapshot import Snapshot

__all__ = ["PATHS", "PATH_LABELS", "RESTORE_KEYS", "RESTORE_METRICS", "measure_restores", "bench_restore"]

#: Every restore path, in report order, with what it is in words.
PATH_LABELS = {
    "pooled": "pooled restore (RestorePool.restore_snapshot, from Python)",
    "native": "same pooled restore, driven from native code",
    "unpooled": "unpooled restore (Vm.restore: the shell is made on the call)",
    "service": "pooled restore + first answer of the service guest",
    "floor": "floor: bare restore operations into a fresh shell",
    "floor-idle": "floor into an idle pooled shell (as old as the pool's)",
}
PATHS = tuple(PATH_LABELS)
RESTORE_KEYS = ["memory_mib", "density", "guest", "path", "strategy"]
RESTORE_METRICS = ["call_ns", "total_ns", *(f"{p}_ns" for p in PHASES), "first_run_ns"]
STRATEGIES = ("copy", "map")
_TAKES_SHELLS = ("pooled", "native", "floor-idle", "service")


def _record(t: dict[str, int], call_ns: int, acquire: bool = True) -> dict[str, Any]:
    rec: dict[str, Any] = {"call_ns": call_ns, "total_ns": int(t["total_ns"])}
    for p in PHASES:
        rec[f"{p}_ns"] = int(t[f"{p}_ns"]) if acquire or p != "acquire" else None
    return rec


def _pooled(pool: RestorePool, snap: Snapshot, strategy: str, run: bool) -> dict[str, Any]:
    t0 = time.perf_counter_ns()
    rvm = pool.restore_snapshot(snap, strategy)
    call = time.perf_counter_ns() - t0
    try:
        rec = _record(rvm.restore_timing, call)
        rec["hit"] = bool(rvm.restore_timing.get("hit", 0))
        if run:
            rec["first_run_ns"] = rvm.run(timeout_s=120).elapsed_ns
    finally:
        rvm.release()
    return rec


def _unpooled(snap: Snapshot, strategy: str, run: bool) -> dict[str, Any]:
    from .. import Vm

    t0 = time.perf_counter_ns()
    vm = Vm.restore(snap, strategy)
    call = time.perf_counter_ns() - t0
    try:
        rec = _record(vm.restore_timing, call)
        if run:
            rec["first_run_ns"] = vm.run(timeout_s=120).elapsed_ns
    finally:
        vm.close()  # destruction on this thread, untimed
    return rec


def _floor(snap: Snapshot, strategy: str, pool: RestorePool | None = None) -> dict[str, Any]:
    call, times = restore_floor(snap, strategy, pool)
    return _record(times, call, acquire=False)  # the shell was made or taken beforehand, untimed


def _native_pooled(pool: RestorePool, snap: Snapshot, strategy: str) -> dict[str, Any]:
    ns = pool_restore(pool, snap, strategy)
    return {"call_ns": ns}


def _service(pool: RestorePool, svc: Snapshot, strategy: str) -> dict[str, Any]:
    t0 = time.perf_counter_ns()
    rvm = pool.restore_snapshot(svc, strategy)
    try:
        answer = rvm.call(b"ping")
        took = time.perf_counter_ns() - t0
        total = int(rvm.restore_timing["total_ns"])
    finally:
        rvm.release()
    if answer != b"ping":
        raise RuntimeError(f"the restored service guest answered {answer!r}")
    return {"call_ns": took, "total_ns": total}


def measure_restores(snap_path: Path, cell: dict[str, Any], *, paths: Sequence[str], strategies: Sequence[str],
                     n: int, warmup: int, run_first: bool = False, service_path: Path | None = None,
                     progress: Progress | None = None) -> list[dict[str, Any]]:
    """``warmup`` + ``n`` interleaved iterations of every (path, strategy);
    returns the ``n`` measured ones as records (``cell`` fields first)."""
    from .. import PoolConfig, RestorePool, Snapshot

    assert n >= 1 and warmup >= 0, (n, warmup)
    bad = [p for p in paths if p not in PATHS]
    assert not bad, bad
    assert "service" not in paths or service_path is not None
    combos = [(p, s) for p in PATHS if p in paths for s in STRATEGIES if s in strategies]
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        snap = stack.enter_context(Snapshot.load(snap_path))
        svc = stack.enter_context(Snapshot.load(service_path)) if "service" in paths else None  # type: ignore[arg-type]
        pools = {c: stack.enter_context(RestorePool(snap.config, PoolConfig(min_size=1, max_size=2)))
                 for c in combos if c[0] in _TAKES_SHELLS}
        fns: dict[str, Callable[[str], dict[str, Any]]] = {
            "pooled": lambda s: _pooled(pools["pooled", s], snap, s, run_first),
            "native": lambda s: _native_pooled(pools["native", s], snap, s),
            "unpooled": lambda s: _unpooled(snap, s, run_first),
            "service": lambda s: _service(pools["service", s], svc, s),  # type: ignore[arg-type]  # set with "service"
            "floor": lambda s: _floor(snap, s),
            "floor-idle": lambda s: _floor(snap, s, pools["floor-idle", s]),
        }
        for i in range(-warmup, n):
            for path, strategy in random.Random(i).sample(combos, len(combos)):  # a new order each iteration
                # The previous path's background work (a VM being destroyed, a
                # shell being made) is over before any path is timed.
                settle(*pools.values())
                rec = fns[path](strategy)
                if i >= 0:
                    records.append({**cell, "path": path, "strategy": strategy, "i": i, **rec})
                if progress is not None:
                    progress.update(1)
        cell_present = snap.present_pages
    for r in records:
        r["present_pages"] = cell_present
    return records


def bench_restore(memory_mib: Sequence[int] = (64, 256), *, strategies: Sequence[str] = STRATEGIES, n: int = 200,
                  warmup: int = 3, dense: bool = False, dense_fraction: float = DENSE_FRACTION, run_first: bool = True,
                  floor: bool = True, quiet: bool = True, command: str | None = None) -> Results:
    """``kvmlab bench restore`` as a function: the paths pooled, unpooled,
    floor and floor-idle (``floor=False``: no floors) for every memory size,
    strategy and the sparse (and, ``dense``, dense) snapshot."""
    check_args("restore", memory_mib=(memory_mib, MEMORY_SIZES), strategies=(strategies, replace(STRATEGY, many=True)),
               n=(n, REPS), warmup=(warmup, COUNT), dense=(dense, FLAG), dense_fraction=(dense_fraction, FRACTION),
               run_first=(run_first, FLAG), floor=(floor, FLAG), quiet=(quiet, FLAG), command=(command, TEXT))
    paths = ["pooled", "unpooled"] + (["floor", "floor-idle"] if floor and floors_available() else [])
    kinds = ["sparse"] + (["dense"] if dense else [])

    def run(progress: Progress) -> dict[str, Part]:
        records: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-") as tmp:
            for mem in memory_mib:
                for kind in kinds:
                    progress.describe(f"{mem} MiB {kind}")
                    guest, path, _present = make_snapshot(kind, mem, Path(tmp), dense_fraction)
                    records += measure_restores(path, {"memory_mib": mem, "density": kind, "guest": guest},
                                                paths=paths, strategies=strategies, n=n, warmup=warmup,
                                                run_first=run_first, progress=progress)
        return {"restore": Part("restore", RESTORE_KEYS, RESTORE_METRICS, records, config={
            "memory_mib": list(memory_mib), "strategies": list(strategies), "n": n, "warmup": warmup, "dense": dense,
            "dense_fraction": dense_fraction, "run_first": run_first, "paths": paths})}

    res = measure("restore", len(kinds) * len(memory_mib) * len(strategies) * len(paths) * (n + warmup), quiet,
                  command, run)
    if "floor" not in paths:
        res.skipped["floor"] = ("--no-floor" if not floor else
                                "this native core has no benchmark floors (rebuild: pip install -e .)")
    res.verdicts = restore_verdicts(res.parts["restore"].summary())
    return res
