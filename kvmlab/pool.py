"""RestorePool: warm empty VM shells for fast snapshot restore.

    >>> pool = kvmlab.RestorePool(kvmlab.VmConfig(memory_mib=256), kvmlab.PoolConfig(min_size=2, max_size=8))
    >>> with pool.restore_snapshot(snap) as rvm:   # an idle shell, restored
    ...     rvm.run()
    >>> pool.stats(), pool.timings()

The pool, its worker threads (refill to ``min_size``, destroy released VMs off
the caller's path; past a backlog of 64 released VMs a release destroys its
VM on the caller's thread, which bounds memory and descriptors) and the
per-restore timing ring live in the Zig core
(``zigsrc/pool.zig``); this module is a thin, thread-safe wrapper.
"""

from __future__ import annotations

import _thread
import os
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Callable, Iterator

from . import _ffi
from ._closing import Closing
from .config import PoolConfig, VmConfig, check_buffer, check_int, check_type
from .config import timeout_ns as _wait_ns  # seconds (None: no wait) -> the core's wait_ns
from .errors import ClosedError, ConfigError, PoolExhaustedError, SnapshotError
from .snapshot import STRATEGIES, Snapshot, strategy_code
from ._prepared import _WAIT_SLICE_NS, _PrepareOps
from ._pool_records import STRATEGY_NAMES, PoolStats, RestoreTiming, restore_timing_record, timings_frame
from .vm import _VmHandle, restore_timing_dict

__all__ = [
    "PoolConfig", "PoolStats", "RestoreTiming", "RestorePool", "PooledRestoreVm", "STRATEGY_NAMES", "timings_frame",
]  # fmt: skip

ffi = _ffi.ffi
lib = _ffi.lib

#: The prepared take, looked up once (restore_snapshot's hot path).
_take_prepared = lib.kvmlab_pool_take_prepared
#: kvmlab_restore_flags bits by name (read once: restore_snapshot is a hot path).
_RESTORE_FLAGS = _ffi.enum_values("kvmlab_restore_flags")

def _bytes_view(data: object, what: str) -> memoryview:
    """config.check_buffer, raising SnapshotError (what restores document) with the same check id."""
    try:
        return check_buffer(what, data)
    except ConfigError as e:
        err = SnapshotError(str(e))
        err.check, err.argument = e.check, e.argument  # type: ignore[attr-defined]
        raise err from None



class _Release:
    """The free function of the VMs a pool hands out: gives a VM back to the
    pool. In the child of os.fork() the pool is forgotten (``pool_handle``
    None) and this does nothing: the pool's worker thread does not exist there
    and its lock may have been held at the fork.

    It also keeps the pool's spare VM wrappers: a restore or a take fills one
    (two stores) instead of building it right after the native call, when
    every cache is cold (building one measured ~7 us there). Spares are made
    off that path: when the pool is made and at each release."""

    __slots__ = ("pool_handle", "config", "spares", "times_cells")

    def __init__(self, pool_handle: Any, config: VmConfig) -> None:
        self.pool_handle = pool_handle
        self.config = config
        #: Unfilled PooledRestoreVm wrappers (no handle), each with its own
        #: kvmlab_restore_times cell. list.pop/append are atomic: no lock.
        self.spares: list[PooledRestoreVm] = []
        #: The times cells of wrappers that are gone (nothing else can read
        #: them then): a new spare rarely allocates one (ffi.new ~5 us cold).
        self.times_cells: list[Any] = []
        self.restock()

    def __call__(self, vm_handle: Any) -> None:
        h = self.pool_handle
        if h is not None:
            lib.kvmlab_pool_release(h, vm_handle)
        self.restock()

    def restock(self) -> None:
        """Makes spares up to _SPARE_VMS (racing threads may make one more: harmless)."""
        spares = self.spares
        while len(spares) < _SPARE_VMS:
            spares.append(PooledRestoreVm(self))

    def spare(self) -> PooledRestoreVm:
        """An unfilled wrapper: a spare, or a new one when none is left."""
        try:
            return self.spares.pop()
        except IndexError:
            return PooledRestoreVm(self)


_new_lock = _thread.allocate_lock  # threading.Lock itself, one lookup fewer

#: Spare unfilled VM wrappers a pool keeps (_Release.spares): enough for a
#: burst of restores between releases; past it a restore builds its own.
_SPARE_VMS = 4
#: Spare times cells a pool keeps at most (_Release.times_cells).
_SPARE_TIMES_CELLS = 64


#: The pools of this process, forgotten in the child of os.fork().
_LIVE_POOLS: "weakref.WeakSet[RestorePool]" = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    """os.fork() child: every inherited pool reads as closed and is never
    freed or called natively (its worker thread is not in the child; its
    shells' memory and descriptors go when the child exits). The child makes
    its own pools."""
    for pool in list(_LIVE_POOLS):
        pool._forget()
    _LIVE_POOLS.clear()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


class PooledRestoreVm(_VmHandle):
    """A VM restored by a :class:`RestorePool`. ``release()`` (or leaving the
    ``with`` block) hands it back; the pool destroys it off your thread (on
    it when 64 released VMs already wait to be destroyed)."""

    __slots__ = ("_pool_handle", "_times", "_timing")

    def __init__(self, release: _Release) -> None:
        """An unfilled wrapper of ``release``'s pool (no VM: reads as closed);
        the pool fills it with :meth:`_fill` after a restore or a take."""
        # The core frees the pool only after kvmlab_pool_free (the pool's
        # finalizer) *and* the last release, deciding under its lock, so
        # release needs no guard here. `release` stays valid while this VM is
        # out, even after close() (its pool_handle is None in a fork's child).
        # _VmHandle's part without its __init__ (no keyword arguments, a
        # plain lock; tests/test_pool.py checks every slot is set).
        self._handle, self._free, self._config, self._guest = None, release, release.config, ""
        self._lock, self._decoder, self._reset_timings = _new_lock(), None, None
        self._pool_handle = release
        # The core's kvmlab_restore_times, turned into a dict on first use:
        # the restore call itself only fills the struct (a hot path).
        try:
            self._times = release.times_cells.pop()
        except IndexError:
            self._times = ffi.new("kvmlab_restore_times *")
        self._timing: dict[str, int] | None = None

    def _fill(self, handle: Any, guest: str) -> "PooledRestoreVm":
        self._handle, self._guest = handle, guest
        return self

    @property
    def restore_timing(self) -> dict[str, int]:
        """This restore's record: integer nanoseconds per phase (``acquire_ns``,
        ``memory_ns``, ``vcpu_ns``, ``devices_ns``, ``total_ns``), ``hit``,
        ``strategy`` (``"copy"``, ``"map"``, ``"reuse"`` or ``"prepared"``, as in
        :meth:`RestorePool.timings`), ``mapped``, ``memory_bytes``, ``seq``."""
        if self._timing is None:
            d = restore_timing_dict(self._times)
            d["memory_bytes"] = self.memory_bytes
            self._timing = d
        return self._timing

    def release(self) -> None:
        """Returns this VM's accounting to the pool. Idempotent."""
        self.close()

    def __del__(self) -> None:
        _VmHandle.__del__(self)
        t = getattr(self, "_times", None)  # unset if __init__ never ran
        if t is not None:
            cells = self._pool_handle.times_cells
            if len(cells) < _SPARE_TIMES_CELLS:
                cells.append(t)


class RestorePool(_PrepareOps, Closing):
    """A pool of empty KVM shells of one :class:`VmConfig`; creating it warms
    ``min_size`` shells (so errors surface here).

    A worker thread in the core keeps ``min_size`` shells idle and destroys
    released VMs off the caller's thread (past a backlog of 64, on it). Use it
    as a context manager or call :meth:`close`.

    The shells the worker makes fit the latest restore: after a ``"copy"``
    restore they hold that snapshot's present pages already resident
    (zero-filled, off the caller's path), so the next copy restore only copies
    instead of faulting each page in (an idle shell then holds about the
    snapshot's present memory); a ``"map"`` restore ends this (it replaces
    shell memory). They carry KVM's dirty log only after a ``resettable``
    restore: the log makes a guest's first write to each page cost one more
    fault. A restore that wants the other kind still works as asked.

    Args:
        vm_config: the shape of every shell (default ``VmConfig()``); restored
            snapshots must have this memory size and vCPU count.
        pool_config: the pool's bounds (default ``PoolConfig()``).

    Raises:
        ConfigError: an argument is not a ``VmConfig`` / ``PoolConfig``.
        KvmUnavailableError: /dev/kvm cannot be used (run ``kvmlab doctor``).
    """

    def __init__(self, vm_config: VmConfig | None = None, pool_config: PoolConfig | None = None) -> None:
        vm_config = vm_config or VmConfig()
        pool_config = pool_config or PoolConfig()
        check_type("vm_config", vm_config, VmConfig)
        check_type("pool_config", pool_config, PoolConfig)
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
        # The native handle for the finalizer and the prepared take: close()
        # only closes the core's pool (kvmlab_pool_close), which answers every
        # call until the finalizer frees it, so the take needs no call guard.
        self._native = self._handle
        self._close_done = False
        # Other calls in flight: close() waits for them (a warm() in flight
        # finishes before the core drains the pool).
        self._lock = threading.Lock()  # a plain Lock: _enter/_exit are on the restore hot path
        self._drained = threading.Condition(self._lock)
        self._active = 0
        # The free function of every VM this pool hands out, and the spare VM
        # wrappers a restore fills (made once: restore is a hot path).
        self._release_vm = _Release(self._handle, vm_config)
        self._spares = self._release_vm.spares  # one lookup fewer on the take's path
        # Spare kvmlab_vm ** cells for restore_snapshot (one per concurrent call).
        self._out_cells: list[Any] = []
        # Snapshots prepared with a warmup, by native snapshot address:
        # (snapshot, its handle, warmup). The warmer thread keeps their targets.
        self._warmups: dict[int, tuple[Snapshot, Any, Callable[[Any], object]]] = {}
        # Every prepared snapshot: its target n (what prepared_targets() lists),
        # the core's id of that target and the snapshot's guest name (the
        # take's: restore_snapshot reads no snapshot property on that path).
        self._targets: dict[Snapshot, tuple[int, int, str]] = {}
        self._warmer: threading.Thread | None = None
        #: VMs whose warmup runs now (prepare's thread, the warmer): close() stops their runs.
        self._warming: set[_VmHandle] = set()
        self._finalizer = weakref.finalize(self, lib.kvmlab_pool_free, self._handle)
        _LIVE_POOLS.add(self)

    def _forget(self) -> None:
        """In the child of os.fork(): closed, never freed (see _forget_pools_after_fork)."""
        self._finalizer.detach()
        self._release_vm.pool_handle = None
        self._handle = None
        self._targets = {}  # no prepared take: the pool's lock may have been held at the fork
        self._native = None
        self._close_done = True
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._drained = threading.Condition(self._lock)
        self._active = 0

    # -- call guard -------------------------------------------------------------------

    def _enter(self) -> Any:
        with self._lock:
            h = self._handle
            if h is None:
                raise ClosedError("this RestorePool is closed", check="pool_closed")
            self._active += 1
            return h

    def _exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._handle is None:
                self._drained.notify_all()  # close() is waiting

    @contextmanager
    def _if_open(self) -> Iterator[Any]:
        """The live handle, pinned for the block as by :meth:`_enter`; None
        when the pool is closed (for the queries that never raise)."""
        try:
            h = self._enter()
        except ClosedError:
            yield None
            return
        try:
            yield h
        finally:
            self._exit()

    # -- filling ----------------------------------------------------------------------

    def warm(self, target: int) -> None:
        """Creates shells until at least ``min(target, max_size)`` are idle.

        Args:
            target: idle shells wanted (capped at ``max_size``).

        Raises:
            ConfigError: ``target`` is not a non-negative int.
            ClosedError: the pool is closed.
        """
        check_int("warm target", target, 0, 2**63)
        h = self._enter()
        try:
            _ffi.check(lib.kvmlab_pool_warm(h, min(target, 2**32 - 1)))
        finally:
            self._exit()

    def idle_count(self) -> int:
        """Idle shells now; 0 if the pool is closed. Never raises."""
        with self._if_open() as h:
            return 0 if h is None else int(lib.kvmlab_pool_idle_count(h))

    def stats(self) -> PoolStats:
        """A consistent snapshot of the counters.

        Returns:
            A frozen :class:`PoolStats` (in a notebook: an occupancy bar and the counters).

        Raises:
            ClosedError: the pool is closed.
        """
        h = self._enter()
        try:
            s = ffi.new("kvmlab_pool_stats *")
            _ffi.check(lib.kvmlab_pool_get_stats(h, s))
        finally:
            self._exit()
        d = {f.name: int(getattr(s, f.name)) for f in fields(PoolStats)}
        d["max_in_use"] = d["max_in_use"] or None  # type: ignore[assignment]  # PoolStats: None = unlimited
        return PoolStats(**d)

    def timings(self, last: int | None = None) -> list[RestoreTiming]:
        """Per-restore phase records, oldest first (the core keeps the newest 4096).

        Args:
            last: only the newest ``last`` records (default: all kept).

        Returns:
            :class:`RestoreTiming` records; :func:`timings_frame` makes a DataFrame of them.

        Raises:
            ClosedError: the pool is closed.
        """
        cap = 4096 if last is None else min(check_int("last", last, 0, 2**63), 4096)
        h = self._enter()
        try:
            buf = ffi.new("kvmlab_pool_timing[]", max(cap, 1))
            n = ffi.new("size_t *")
            _ffi.check(lib.kvmlab_pool_timings(h, buf, cap, n))
        finally:
            self._exit()
        return [restore_timing_record(_ffi.as_dict(buf[i], "kvmlab_pool_timing")) for i in range(n[0])]

    # -- restoring ----------------------------------------------------------------------

    def _finish(self, call: Callable[..., int], guest: str, timeout_s: float | None) -> PooledRestoreVm:
        """Runs ``call(handle, out, times, wait_ns)``. A wait for room under
        ``max_in_use`` is done in slices of at most 50 ms, so that ``close()``
        on another thread never waits for a long ``timeout_s`` to expire."""
        out = ffi.new("kvmlab_vm **")
        vm = self._release_vm.spare()
        t = vm._times
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
                    f"(max_in_use={self.pool_config.max_in_use} VMs are in use)",
                    check="pool_wait_timeout",
                )
            raise err
        if waited:
            # Earlier wait slices (our copy of the record; the core's ring,
            # pool.timings(), has the last slice only).
            t.acquire_ns += waited
            t.total_ns += waited
        return vm._fill(out[0], guest)

    def restore(self, memory: Any, vcpu_state: bytes, timeout_s: float | None = None) -> PooledRestoreVm:
        """Restores from raw parts, as the reference API; otherwise as
        :meth:`restore_snapshot`.

        Args:
            memory: a dense buffer of guest memory (e.g. ``snap.memory``).
            vcpu_state: the state blob (``snap.vcpu_state``).
            timeout_s: as for :meth:`restore_snapshot`.

        Returns:
            The restored :class:`PooledRestoreVm`; release it (or use ``with``).

        Raises:
            SnapshotError: the parts are not bytes-like or do not fit the pool's shape.
            PoolExhaustedError: as for :meth:`restore_snapshot` (also IncompatibleError, ClosedError).
        """
        mem = _bytes_view(memory, "memory")
        st = _bytes_view(vcpu_state, "vcpu_state")
        return self._finish(
            lambda h, out, t, wait: lib.kvmlab_pool_restore_parts(
                h, ffi.from_buffer("uint8_t[]", mem), len(mem), ffi.from_buffer("uint8_t[]", st), len(st), wait, out, t
            ),
            "raw",
            timeout_s,
        )

    def restore_from_bytes(self, data: Any, timeout_s: float | None = None) -> PooledRestoreVm:
        """Restores from a full self-describing snapshot (``snap.to_bytes()``);
        otherwise as :meth:`restore_snapshot`.

        Args:
            data: the encoded snapshot.
            timeout_s: as for :meth:`restore_snapshot`.

        Returns:
            The restored :class:`PooledRestoreVm`; release it (or use ``with``).

        Raises:
            SnapshotError: ``data`` is not a valid snapshot.
            PoolExhaustedError: as for :meth:`restore_snapshot` (also IncompatibleError, ClosedError).
        """
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
        (``restore_timing`` strategy ``"reuse"``, no shell or restore needed).

        Args:
            snap: the snapshot (its shape must be the pool's).
            strategy: ``"copy"``, ``"map"`` or ``"auto"``.
            timeout_s: how long to wait for room under ``max_in_use`` (None: fail at once).
            resettable: the VM supports ``reset()``.
            reset_on_release: park the VM for reuse instead of destroying it.

        Returns:
            The restored :class:`PooledRestoreVm`, continuing where ``snap``
                was taken; release it (or use ``with``).

        Raises:
            PoolExhaustedError: ``max_in_use`` VMs are out (and none came back
                within ``timeout_s``).
            IncompatibleError: the snapshot needs CPU features or a shape this
                pool's shells do not have.
            ClosedError: the pool (or snapshot) is closed.
            SnapshotError: ``snap`` is not a Snapshot.
            ConfigError: an unknown ``strategy`` or a bad ``timeout_s``.
        """
        if not isinstance(snap, Snapshot):
            raise SnapshotError(f"restore_snapshot takes a Snapshot, got {type(snap).__name__}", check="argument_type")
        try:
            code = STRATEGIES[strategy]  # strategy_code inline: one frame fewer on the take's path
        except (KeyError, TypeError):
            code = strategy_code(strategy)  # raises ConfigError
        if timeout_s is not None:
            _wait_ns(timeout_s)  # validate before touching the snapshot
        # A prepared VM, whatever the flags (it is resettable and goes back by
        # its target): one native call, no guard (see _native), no hold on
        # the snapshot (its target holds it). A closed pool answers NULL and
        # a closed snapshot is not taken: the path below says so.
        target = self._targets.get(snap)
        if target is not None and snap._handle is not None:
            spares = self._spares
            try:
                vm = spares.pop()  # _Release.spare() inline: one frame fewer on the take's path
            except IndexError:
                vm = PooledRestoreVm(self._release_vm)
            handle = _take_prepared(self._native, target[1], vm._times)
            if handle:
                vm._handle, vm._guest = handle, target[2]  # vm._fill inline: one frame fewer
                return vm
            spares.append(vm)  # none to take: restore below (which says why, if it fails)
        flags = (_RESTORE_FLAGS["resettable"] if resettable else 0) | (
            _RESTORE_FLAGS["reset_on_release"] if reset_on_release else 0
        )
        if timeout_s is not None:
            with snap._use() as sh:
                return self._finish(
                    lambda h, out, t, wait: lib.kvmlab_pool_restore_snapshot(h, sh, code, wait, flags, out, t),
                    snap.guest,
                    timeout_s,
                )
        # The common case: no wait, one native call.
        with snap._use() as sh:
            h = self._enter()
            try:
                return self._out_call(snap.guest, lib.kvmlab_pool_restore_snapshot, h, sh, code, 0, flags)
            finally:
                self._exit()

    def _out_call(self, guest: str, fn: Callable[..., int], *args: Any) -> PooledRestoreVm:
        """``fn(*args, out, times)`` -> a spare wrapper filled with the VM it
        put in out. Inline and lean: it runs right after the restore's ioctls,
        when every cache is cold, so each Python step costs microseconds."""
        outs = self._out_cells
        try:
            out = outs.pop()  # a spare out cell (list.pop is atomic): one allocation fewer
        except IndexError:
            out = ffi.new("kvmlab_vm **")
        vm = self._release_vm.spare()
        rc = fn(*args, out, vm._times)
        handle = out[0]
        outs.append(out)
        if rc:
            self._spares.append(vm)  # unfilled: a spare again
            raise _ffi.error_for(rc)
        return vm._fill(handle, guest)

    # -- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Stops the worker and destroys idle shells and prepared VMs. VMs still
        out stay usable. Idempotent; waits for calls in flight on other threads
        (they finish or raise ClosedError; a restore racing it gets its VM or
        ClosedError), and stops the runs of a warmup in progress (``prepare``
        raises ClosedError). The core's small pool record is freed once this
        object is gone and the last VM released.
        """
        with self._lock:
            if self._close_done:
                return  # closed before (a close that Ctrl-C stopped half-way is finished by the next)
            self._handle = None
            warming = list(self._warming)
        # Outside the pool's lock: closing waits for the warmup's run to stop,
        # and a warmup may call the pool meanwhile.
        for vm in warming:
            vm.close()  # its runs stop now, later ones raise ClosedError; the pool still owns the VM
        with self._lock:
            while self._active:
                self._drained.wait()
        # Closed, not freed: a prepared take racing this still gets an answer
        # (none); the finalizer frees the core's pool once this object is gone.
        lib.kvmlab_pool_close(self._native)
        self._close_done = True

    def __repr__(self) -> str:
        if self.closed:
            return "<RestorePool closed>"
        s = self.stats()
        return (
            f"<RestorePool {self.vm_config.memory_mib} MiB x {self.vm_config.vcpus} vCPU idle={s.idle} "
            f"in_use={s.in_use} max_size={s.max_size} restores={s.restores}>"
        )

    def _repr_html_(self) -> str:
        """Occupancy as a bar, and the counters (``pool.stats()``)."""
        from . import _html

        shape = f"RestorePool {self.vm_config.memory_mib} MiB x {self.vm_config.vcpus} vCPU"
        try:
            return self.stats()._repr_html_(title=shape)
        except ClosedError:
            return _html.box(f"{shape} (closed)", "")
