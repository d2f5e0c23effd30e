"""RestorePool: warm empty VM shells for fast snapshot restore.

    >>> pool = kvmlab.RestorePool(kvmlab.VmConfig(memory_mib=256), kvmlab.PoolConfig(min_size=2, max_size=8))
    >>> with pool.restore_snapshot(snap) as rvm:   # an idle shell, restored
    ...     rvm.run()
    >>> pool.stats(), pool.timings()

The pool, its worker thread (refill to ``min_size``, destroy released VMs off
the caller's path) and the per-restore timing ring live in the Zig core
(``zigsrc/pool.zig``); this module is a thin, thread-safe wrapper.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import weakref
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

from . import _ffi
from .config import VmConfig
from .errors import ClosedError, ConfigError, PoolExhaustedError, SnapshotError
from .snapshot import Snapshot, strategy_code
from .vm import RunResult, _VmHandle

__all__ = ["PoolConfig", "PoolStats", "RestoreTiming", "RestorePool", "PooledRestoreVm", "timings_frame"]

ffi = _ffi.ffi
lib = _ffi.lib

#: ``kvmlab_pool_timing.strategy`` -> name (``kvmlab_strategy``, read from the header).
STRATEGY_NAMES = _ffi.enum_names("kvmlab_strategy")

#: The core's limit on ``PoolConfig.max_size`` (``max_pool_size`` in zigsrc/pool.zig).
MAX_POOL_SIZE = 256

#: A restore waiting for room under ``max_in_use`` waits in the core for at most
#: this long at a time, so ``close()`` on another thread is never held up longer.
_WAIT_SLICE_NS = 50_000_000


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"PoolConfig {name} must be an int, got {v!r}")
    if v < lo:
        raise ConfigError(f"PoolConfig {name}={v} must be >= {lo}")
    return v


@dataclass(frozen=True)
class PoolConfig:
    """Pool bounds. ``max_size`` caps idle shells; ``max_in_use`` (None =
    unlimited) caps VMs handed out at once."""

    min_size: int = 1
    max_size: int = 4
    max_in_use: int | None = None

    def __post_init__(self) -> None:
        _int("min_size", self.min_size, 0)
        _int("max_size", self.max_size, 0)
        if self.max_size == 0:
            raise ConfigError("PoolConfig max_size must be at least 1")
        if self.max_size > MAX_POOL_SIZE:
            raise ConfigError(f"PoolConfig max_size={self.max_size} is over the limit of {MAX_POOL_SIZE}")
        if self.min_size > self.max_size:
            raise ConfigError(f"PoolConfig min_size={self.min_size} is larger than max_size={self.max_size}")
        if self.max_in_use is not None:
            _int("max_in_use", self.max_in_use, 1)


@dataclass(frozen=True)
class PoolStats:
    """A frozen view of the pool's counters (one consistent read)."""

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


@dataclass(frozen=True)
class RestoreTiming:
    """Integer nanoseconds per phase of one pooled restore."""

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


def timings_frame(records: Iterable[RestoreTiming]):
    """``pool.timings()`` as a pandas DataFrame (one row per restore)."""
    import pandas as pd

    rows = [asdict(r) for r in records]
    return pd.DataFrame(rows, columns=[f.name for f in fields(RestoreTiming)])


def _bytes_view(data: object, what: str) -> memoryview:
    try:
        return memoryview(data).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise SnapshotError(f"{what} must be bytes-like (bytes, bytearray, memoryview), got {type(data).__name__}") from None


def _wait_ns(timeout_s: float | None) -> int:
    if timeout_s is None:
        return 0
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0 or math.isnan(timeout_s):
        raise ConfigError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    return max(1, int(min(timeout_s, 1e9) * 1e9))




class PooledRestoreVm(_VmHandle):
    """A VM restored by a :class:`RestorePool`. ``release()`` (or leaving the
    ``with`` block) hands it back; the pool destroys it off your thread."""

    __slots__ = ("_pool_handle", "_first_run_pending", "_times", "_timing")

    def __init__(self, handle: Any, pool: "RestorePool", guest: str, times: Any) -> None:
        # The core frees the pool only after close() *and* the last release,
        # deciding under its lock, so release needs no guard here.
        _VmHandle.__init__(self, handle, pool.vm_config, guest, pool._release_vm)
        # The raw pool handle (valid while this VM is out, even after close()).
        self._pool_handle = pool._release_vm.args[0]
        self._first_run_pending = True
        # The core's kvmlab_restore_times, turned into a dict on first use:
        # the restore call itself only keeps the struct (a hot path).
        self._times = times
        self._timing: dict[str, int] | None = None

    @property
    def restore_timing(self) -> dict[str, int]:
        """This restore's record: integer nanoseconds per phase (``acquire_ns``,
        ``memory_ns``, ``vcpu_ns``, ``devices_ns``, ``total_ns``), ``hit``,
        ``strategy``, ``mapped``, ``memory_bytes``, ``seq``."""
        if self._timing is None:
            self._timing = _ffi.as_dict(self._times, "kvmlab_restore_times")
        return self._timing

    def _after_run(self, h: Any, result: RunResult) -> None:
        if self._first_run_pending:
            self._first_run_pending = False
            # Under the VM's lock with the VM not yet released: the pool is
            # still allocated (the last release after close() frees it).
            lib.kvmlab_pool_note_first_run(self._pool_handle, self._times.seq, result.elapsed_ns)

    def release(self) -> None:
        """Returns this VM's accounting to the pool. Idempotent."""
        self.close()


class RestorePool:
    """A pool of empty KVM shells of one :class:`VmConfig`; creating it warms
    ``min_size`` shells (so errors surface here)."""

    def __init__(self, vm_config: VmConfig | None = None, pool_config: PoolConfig | None = None) -> None:
        vm_config = vm_config or VmConfig()
        pool_config = pool_config or PoolConfig()
        if not isinstance(vm_config, VmConfig):
            raise ConfigError(f"vm_config must be a VmConfig, got {type(vm_config).__name__}")
        if not isinstance(pool_config, PoolConfig):
            raise ConfigError(f"pool_config must be a PoolConfig, got {type(pool_config).__name__}")
        self.vm_config = vm_config
        self.pool_config = pool_config
        c = ffi.new(
            "kvmlab_pool_config *",
            {
                "memory_bytes": vm_config.memory_bytes,
                "vcpus": vm_config.vcpus,
                "min_size": pool_config.min_size,
                "max_size": pool_config.max_size,
                "max_in_use": pool_config.max_in_use or 0,
            },
        )
        out = ffi.new("kvmlab_pool **")
        _ffi.check(lib.kvmlab_pool_new(c, out))
        self._handle = out[0]
        # Calls in flight: close() waits for them, so no native call ever sees
        # a freed pool.
        self._lock = threading.Lock()  # a plain Lock: _enter/_exit are on the restore hot path
        self._drained = threading.Condition(self._lock)
        self._active = 0
        # The free function of every VM this pool hands out (made once: restore
        # is a hot path).
        self._release_vm = functools.partial(lib.kvmlab_pool_release, self._handle)
        self._finalizer = weakref.finalize(self, lib.kvmlab_pool_free, self._handle)

    # -- call guard -------------------------------------------------------------------

    def _enter(self) -> Any:
        with self._lock:
            h = self._handle
            if h is None:
                raise ClosedError("this RestorePool is closed")
            self._active += 1
            return h

    def _exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._handle is None:
                self._drained.notify_all()  # close() is waiting

    # -- filling ----------------------------------------------------------------------

    def warm(self, target: int) -> None:
        """Creates shells until at least ``min(target, max_size)`` are idle."""
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ConfigError(f"warm target must be a non-negative int, got {target!r}")
        h = self._enter()
        try:
            _ffi.check(lib.kvmlab_pool_warm(h, min(target, 2**32 - 1)))
        finally:
            self._exit()

    def idle_count(self) -> int:
        """Idle shells now; 0 if the pool is closed. Never raises."""
        try:
            h = self._enter()
        except ClosedError:
            return 0
        try:
            return int(lib.kvmlab_pool_idle_count(h))
        finally:
            self._exit()

    def stats(self) -> PoolStats:
        """A consistent snapshot of the counters."""
        h = self._enter()
        try:
            s = ffi.new("kvmlab_pool_stats *")
            _ffi.check(lib.kvmlab_pool_get_stats(h, s))
        finally:
            self._exit()
        d = {f.name: int(getattr(s, f.name)) for f in fields(PoolStats)}
        d["max_in_use"] = d["max_in_use"] or None
        return PoolStats(**d)

    def timings(self, last: int | None = None) -> list[RestoreTiming]:
        """Per-restore phase records, oldest first (the core keeps the newest 4096)."""
        cap = 4096 if last is None else max(0, min(int(last), 4096))
        h = self._enter()
        try:
            buf = ffi.new("kvmlab_pool_timing[]", max(cap, 1))
            n = ffi.new("size_t *")
            _ffi.check(lib.kvmlab_pool_timings(h, buf, cap, n))
        finally:
            self._exit()
        return [
            RestoreTiming(
                seq=int(t.seq),
                acquire_ns=int(t.acquire_ns),
                memory_ns=int(t.memory_ns),
                vcpu_ns=int(t.vcpu_ns),
                devices_ns=int(t.devices_ns),
                total_ns=int(t.total_ns),
                first_run_ns=int(t.first_run_ns) or None,
                memory_bytes=int(t.memory_bytes),
                hit=bool(t.hit),
                strategy=STRATEGY_NAMES.get(int(t.strategy), "?"),
            )
            for t in (buf[i] for i in range(n[0]))
        ]

    # -- restoring ----------------------------------------------------------------------

    def _finish(self, call, guest: str, timeout_s: float | None) -> PooledRestoreVm:
        """Runs ``call(handle, out, times, wait_ns)``. A wait for room under
        ``max_in_use`` is done in slices of at most 50 ms, so that ``close()``
        on another thread never waits for a long ``timeout_s`` to expire."""
        out = ffi.new("kvmlab_vm **")
        t = ffi.new("kvmlab_restore_times *")
        wait_ns = _wait_ns(timeout_s)
        deadline = time.monotonic_ns() + wait_ns
        waited = 0
        while True:
            h = self._enter()
            try:
                left = deadline - time.monotonic_ns()
                this_wait = 0 if wait_ns == 0 else max(1, min(left, _WAIT_SLICE_NS))
                t0 = time.monotonic_ns()
                rc = int(call(h, out, t, this_wait))
                err = None if rc == 0 else _ffi.error_for(rc)
            finally:
                self._exit()
            if err is None:
                break
            if isinstance(err, PoolExhaustedError) and wait_ns and time.monotonic_ns() < deadline:
                waited += time.monotonic_ns() - t0
                continue
            if isinstance(err, PoolExhaustedError) and wait_ns:
                raise PoolExhaustedError(
                    f"no VM was released within timeout_s={timeout_s} "
                    f"(max_in_use={self.pool_config.max_in_use} VMs are in use)"
                )
            raise err
        if waited:
            # Earlier wait slices (our copy of the record; the core's ring,
            # pool.timings(), has the last slice only).
            t.acquire_ns += waited
            t.total_ns += waited
        return PooledRestoreVm(out[0], self, guest, t)

    def restore(self, memory, vcpu_state: bytes, timeout_s: float | None = None) -> PooledRestoreVm:
        """Restores from raw parts, as the reference API: ``memory`` is a dense
        buffer of guest memory (e.g. ``snap.memory``), ``vcpu_state`` the state
        blob (``snap.vcpu_state``). ``timeout_s`` waits for room under ``max_in_use``."""
        mem = _bytes_view(memory, "memory")
        st = _bytes_view(vcpu_state, "vcpu_state")
        return self._finish(
            lambda h, out, t, wait: lib.kvmlab_pool_restore_parts(
                h, ffi.from_buffer("uint8_t[]", mem), len(mem), ffi.from_buffer("uint8_t[]", st), len(st), wait, out, t
            ),
            "raw",
            timeout_s,
        )

    def restore_from_bytes(self, data, timeout_s: float | None = None) -> PooledRestoreVm:
        """Restores from a full self-describing snapshot (``snap.to_bytes()``)."""
        view = _bytes_view(data, "data")
        return self._finish(
            lambda h, out, t, wait: lib.kvmlab_pool_restore_bytes(
                h, ffi.from_buffer("uint8_t[]", view), len(view), wait, out, t
            ),
            "bytes",
            timeout_s,
        )

    def restore_snapshot(
        self,
        snap: Snapshot,
        strategy: str = "auto",
        timeout_s: float | None = None,
        *,
        resettable: bool = False,
        reset_on_release: bool = False,
    ) -> PooledRestoreVm:
        """Restores a :class:`Snapshot`. ``strategy``: ``"copy"`` (into the shell's
        memory), ``"map"`` (copy-on-write mapping of a loaded file, O(1) in memory
        size) or ``"auto"`` (map when the snapshot is file-backed).

        ``resettable=True``: the VM supports :meth:`~PooledRestoreVm.reset`.
        ``reset_on_release=True``: releasing the VM does not destroy it; the
        pool's worker resets it to ``snap`` and keeps it, and the next
        ``restore_snapshot(snap, reset_on_release=True)`` takes it back
        (``restore_timing`` strategy ``"reuse"``, no shell or restore needed)."""
        if not isinstance(snap, Snapshot):
            raise SnapshotError(f"restore_snapshot takes a Snapshot, got {type(snap).__name__}")
        code = strategy_code(strategy)
        flags = (1 if resettable else 0) | (2 if reset_on_release else 0)
        if timeout_s is not None:
            _wait_ns(timeout_s)  # validate before touching the snapshot
            with snap._use() as sh:
                return self._finish(
                    lambda h, out, t, wait: lib.kvmlab_pool_restore_snapshot(h, sh, code, wait, flags, out, t),
                    snap.guest,
                    timeout_s,
                )
        # The common case inline (no wait, one native call): every Python frame
        # here costs microseconds, since the caches are cold after the ioctls.
        out = ffi.new("kvmlab_vm **")
        t = ffi.new("kvmlab_restore_times *")
        with snap._use() as sh:
            h = self._enter()
            try:
                rc = lib.kvmlab_pool_restore_snapshot(h, sh, code, 0, flags, out, t)
            finally:
                self._exit()
        if rc:
            raise _ffi.error_for(rc)
        return PooledRestoreVm(out[0], self, snap.guest, t)

    # -- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Stops the worker and destroys idle shells. VMs still out stay usable;
        releasing the last one frees the pool. Idempotent; waits for calls in
        flight on other threads (they finish or raise ClosedError)."""
        with self._lock:
            if self._handle is None:
                return
            self._handle = None
            while self._active:
                self._drained.wait()
        self._finalizer()

    def __enter__(self) -> "RestorePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<RestorePool closed>"
        s = self.stats()
        return (
            f"<RestorePool {self.vm_config.memory_mib} MiB x {self.vm_config.vcpus} vCPU idle={s.idle} "
            f"in_use={s.in_use} max_size={s.max_size} restores={s.restores}>"
        )
