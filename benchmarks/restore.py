"""The kvmlab restore rows of ``kvmlab bench all`` and unicorn's restore of the
same snapshot.

For one case (guest memory size x sparse/dense), every path restores the same
file-backed snapshot ``n`` times, interleaved (a new random order every
iteration, each path timed only once every pool's background work is done;
every path that takes shells has a pool of its own) so the machine's noise
hits all paths alike:

* ``pooled-copy`` / ``pooled-map``: ``RestorePool.restore_snapshot`` from
  Python into an idle shell of a settled pool, timed around the Python call;
* ``native-copy`` / ``native-map``: the same pooled restore driven from native
  code (``kvmlab_bench_pool_restores``, count 1 per call): the baseline of the
  Python API overhead;
* ``unpooled-copy`` / ``unpooled-map``: ``Vm.restore`` (shell made on demand);
* ``floor-copy`` / ``floor-map``: ``kvmlab_bench_restore_floor``, the bare
  ioctls and memory operations into a fresh shell made beforehand (untimed);
* ``floor-idle-copy`` / ``floor-idle-map``: the same into an idle shell of a
  second settled pool, as old as the pooled paths' shells (the like-for-like
  floor of a pooled restore; ``kvmlab.bench.floor_restore``);
* ``service-copy`` / ``service-map``: pooled restore of the ``service`` guest
  (same size and density) plus its first answer, ``rvm.call(b"ping")``.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Any, Callable

from kvmlab.bench import _wait_settled, floor_restore, settle, stats

__all__ = ["KVMLAB_PATHS", "measure_case", "unicorn_restore"]

KVMLAB_PATHS = (
    "pooled-copy", "pooled-map", "native-copy", "native-map", "unpooled-copy", "unpooled-map",
    "floor-copy", "floor-map", "floor-idle-copy", "floor-idle-map", "service-copy", "service-map",
)


def _pooled(pool, snap, strategy: str) -> tuple[int, int]:
    _wait_settled(pool)
    t0 = time.perf_counter_ns()
    rvm = pool.restore_snapshot(snap, strategy)
    took = time.perf_counter_ns() - t0
    core = rvm.restore_timing["total_ns"]
    rvm.release()
    return took, core


def _native(pool, snap, strategy: str) -> tuple[int, int]:
    from kvmlab import _ffi
    from kvmlab.snapshot import strategy_code

    out = _ffi.ffi.new("uint64_t[]", 1)
    _wait_settled(pool)  # the same quiet pool as the Python path (the native loop only waits for an idle shell)
    h = pool._enter()
    try:
        with snap._use() as sh:
            _ffi.check(_ffi.testing.kvmlab_bench_pool_restores(h, sh, strategy_code(strategy), 1, out))
    finally:
        pool._exit()
    return int(out[0]), int(out[0])


def _unpooled(snap, strategy: str) -> tuple[int, int]:
    from kvmlab import Vm

    t0 = time.perf_counter_ns()
    vm = Vm.restore(snap, strategy)
    took = time.perf_counter_ns() - t0
    core = vm.restore_timing["total_ns"]
    vm.close()  # teardown on this thread, untimed
    return took, core


def _floor(snap, strategy: str, pool=None) -> tuple[int, int]:
    call, times = floor_restore(snap, strategy, pool)
    return call, times["total_ns"]


def _service(pool, snap, strategy: str) -> tuple[int, int]:
    _wait_settled(pool)
    t0 = time.perf_counter_ns()
    rvm = pool.restore_snapshot(snap, strategy)
    try:
        answer = rvm.call(b"ping")
        took = time.perf_counter_ns() - t0
    finally:
        rvm.release()
    if answer != b"ping":
        raise RuntimeError(f"the restored service guest answered {answer!r}")
    return took, took


def measure_case(snap_path: Path, service_path: Path, n: int, warmup: int, paths, progress) -> dict[str, dict[str, Any]]:
    """``warmup`` + ``n`` interleaved iterations of ``paths`` (a subset of
    :data:`KVMLAB_PATHS`); returns per path the stats of the time figure (ns)
    and of the core's own total (``core``)."""
    from kvmlab import PoolConfig, RestorePool, Snapshot

    out: dict[str, dict[str, list[int]]] = {p: {"t": [], "core": []} for p in paths}
    with Snapshot.load(snap_path) as snap, Snapshot.load(service_path) as svc:
        order = [p for p in KVMLAB_PATHS if p in paths]
        with contextlib.ExitStack() as stack:
            # Every path that takes shells has a pool of its own, used once per
            # iteration, so all their shells wait about as long.
            pool = {p: stack.enter_context(RestorePool(snap.config, PoolConfig(min_size=1, max_size=2)))
                    for p in order if not p.startswith(("unpooled", "floor-copy", "floor-map"))}
            fns: dict[str, Callable[[], tuple[int, int]]] = {
                "pooled-copy": lambda: _pooled(pool["pooled-copy"], snap, "copy"),
                "pooled-map": lambda: _pooled(pool["pooled-map"], snap, "map"),
                "native-copy": lambda: _native(pool["native-copy"], snap, "copy"),
                "native-map": lambda: _native(pool["native-map"], snap, "map"),
                "unpooled-copy": lambda: _unpooled(snap, "copy"),
                "unpooled-map": lambda: _unpooled(snap, "map"),
                "floor-copy": lambda: _floor(snap, "copy"),
                "floor-map": lambda: _floor(snap, "map"),
                "floor-idle-copy": lambda: _floor(snap, "copy", pool["floor-idle-copy"]),
                "floor-idle-map": lambda: _floor(snap, "map", pool["floor-idle-map"]),
                "service-copy": lambda: _service(pool["service-copy"], svc, "copy"),
                "service-map": lambda: _service(pool["service-map"], svc, "map"),
            }
            for i in range(-warmup, n):
                rng = random.Random(i)  # a new order every iteration, the same in every run
                for p in rng.sample(order, len(order)):
                    # The previous path's background work (a VM being destroyed,
                    # a shell being made) is over before any path is timed.
                    settle(*pool.values())
                    t, core = fns[p]()
                    if i >= 0:
                        out[p]["t"].append(t)
                        out[p]["core"].append(core)
                    progress.update(1)
            present = snap.present_pages
    res = {p: dict(stats(v["t"]), core=stats(v["core"])) for p, v in out.items()}
    res["_present_pages"] = present  # type: ignore[assignment]
    return res


def unicorn_restore(snap_path: Path, n: int, progress=None) -> dict[str, Any]:
    """unicorn's restore of the same snapshot: a ``Uc`` (UC_MODE_64) with the
    snapshot's memory size mapped; each restore is ``context_restore`` plus
    ``mem_write`` of the snapshot's present (non-zero) pages, contiguous runs
    written with one call each, from Python (buffers prepared beforehand,
    untimed). Returns stats (ns) and what was written."""
    import numpy as np
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as X

    from kvmlab import Snapshot, Vm

    with Snapshot.load(snap_path) as snap:
        size = snap.memory_bytes
        mem = np.frombuffer(snap.memory, dtype=np.uint64).reshape(-1, 512)
        present = np.flatnonzero(mem.any(axis=1))
        runs: list[tuple[int, bytes]] = []
        if len(present):
            breaks = np.flatnonzero(np.diff(present) != 1) + 1
            for chunk in np.split(present, breaks):
                a, b = int(chunk[0]), int(chunk[-1]) + 1
                runs.append((a * 4096, bytes(snap.memory[a * 4096:b * 4096])))
        del mem
        with Vm.restore(snap, "map") as vm:
            regs = vm.registers()
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, size)
    names = {"rax": X.UC_X86_REG_RAX, "rbx": X.UC_X86_REG_RBX, "rcx": X.UC_X86_REG_RCX, "rdx": X.UC_X86_REG_RDX,
             "rsi": X.UC_X86_REG_RSI, "rdi": X.UC_X86_REG_RDI, "rsp": X.UC_X86_REG_RSP, "rbp": X.UC_X86_REG_RBP,
             "r8": X.UC_X86_REG_R8, "r9": X.UC_X86_REG_R9, "r10": X.UC_X86_REG_R10, "r11": X.UC_X86_REG_R11,
             "r12": X.UC_X86_REG_R12, "r13": X.UC_X86_REG_R13, "r14": X.UC_X86_REG_R14, "r15": X.UC_X86_REG_R15,
             "rip": X.UC_X86_REG_RIP}
    for name, reg in names.items():
        uc.reg_write(reg, regs[name])
    ctx = uc.context_save()
    for addr, data in runs:  # fault the host memory in once, like a warm kvmlab shell
        uc.mem_write(addr, data)
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        uc.context_restore(ctx)
        for addr, data in runs:
            uc.mem_write(addr, data)
        times.append(time.perf_counter_ns() - t0)
        if progress is not None:
            progress.update(1)
    return dict(stats(times), pages=int(len(present)), writes=len(runs))
