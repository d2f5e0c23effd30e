"""Every native benchmark call (the ``kvmlab_bench_*`` floors) goes through
this module and nowhere else: the floors live in the benchmark export group
of the core, and only this module knows where to find them (:func:`_bench_lib`)
and which private handles of the public objects they take.

The floors are the bare ioctls and memory operations of a restore or reset,
timed natively (the phases) and around the bare native call (``call_ns``):
what the host allows, the baseline of the targets.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .settle import wait_settled

if TYPE_CHECKING:
    from ..pool import RestorePool
    from ..snapshot import Snapshot
    from ..vm import Vm

__all__ = ["floors_available", "reset_floor_available", "abi_version", "restore_floor", "pool_restore",
           "reset_floor", "kvm_memslots", "idle_shell_resident_pages"]

_RESTORE_FLOORS = ("kvmlab_bench_restore_floor", "kvmlab_bench_pool_take_shell", "kvmlab_bench_pool_restores")
_RESET_FLOOR = "kvmlab_bench_reset_floor"


def _ffi() -> ModuleType:
    from .. import _ffi as f

    return f


def _bench_lib() -> Any:
    """The ``kvmlab_bench_*`` functions: the core's testing export group
    (``kvmlab_testing.h``), a lib object of its own (``_ffi.testing``)."""
    return _ffi().testing


def _has(names: tuple[str, ...]) -> bool:
    lib = _bench_lib()
    try:
        for name in names:
            getattr(lib, name)
    except AttributeError:
        return False
    return True


def floors_available() -> bool:
    """True when the core exports the restore floors (a build without the
    benchmark export group does not)."""
    return _has(_RESTORE_FLOORS)


def reset_floor_available() -> bool:
    return _has((_RESET_FLOOR,))


def abi_version() -> int:
    return int(_ffi().lib.kvmlab_abi_version())


def _strategy(strategy: str) -> int:
    from ..snapshot import strategy_code

    return strategy_code(strategy)


def restore_floor(snap: Snapshot, strategy: str, pool: RestorePool | None = None,
                  age_s: float = 0.0) -> tuple[int, dict[str, int]]:
    """The restore floor of ``snap`` (``kvmlab_bench_restore_floor``) into an
    empty shell: an idle shell of ``pool`` (a settled pool of the snapshot's
    shape, like a pooled restore gets) or, without ``pool``, a fresh shell
    made just before (that first waits ``age_s``). Getting and freeing the
    shell are untimed. Returns (ns around the bare native call, the core's
    phase ns).

    Why both: the same ioctls cost more in a shell that has waited in a pool
    than in one made a moment ago (its kernel structures have gone cold:
    ``kvmlab bench age``)."""
    f = _ffi()
    ffi, lib, blib = f.ffi, f.lib, _bench_lib()
    out = ffi.new("kvmlab_vm **")  # NULL until a shell is made or taken
    t = ffi.new("kvmlab_restore_times *")
    if pool is not None:
        wait_settled(pool)
    ph = None  # the pool's handle once _enter() returned (then _exit() is owed)
    # The try opens before the shell exists: a Ctrl-C or failure at any step
    # after (the busy-wait lasts up to 10 s) frees it (checked by out[0]).
    try:
        if pool is not None:
            ph = pool._enter()
        if pool is None:
            c = ffi.new("kvmlab_vm_config *", {"memory_bytes": snap.memory_bytes, "vcpus": snap.vcpus})
            f.check(lib.kvmlab_vm_new(c, out))
            # Busy-wait, not sleep: an idle CPU would cool this thread's caches
            # too, and only the shell's waiting is to be measured.
            end = time.perf_counter() + age_s
            while time.perf_counter() < end:
                pass
        else:
            f.check(blib.kvmlab_bench_pool_take_shell(ph, out))
        with snap._use() as sh:
            t0 = time.perf_counter_ns()
            rc = blib.kvmlab_bench_restore_floor(out[0], sh, _strategy(strategy), t)
            call = time.perf_counter_ns() - t0
            f.check(rc)
    finally:
        try:
            if out[0] != ffi.NULL:
                if pool is None:
                    lib.kvmlab_vm_free(out[0])
                else:
                    lib.kvmlab_pool_release(ph, out[0])
        finally:
            if ph is not None:
                pool._exit()  # type: ignore[union-attr]  # ph is set only with a pool
    return call, f.as_dict(t, "kvmlab_restore_times")


def pool_restore(pool: RestorePool, snap: Snapshot, strategy: str) -> int:
    """One pooled restore of ``snap`` driven from native code
    (``kvmlab_bench_pool_restores``, count 1), the baseline of the Python API's
    overhead; ns measured natively."""
    f = _ffi()
    out = f.ffi.new("uint64_t[]", 1)
    wait_settled(pool)  # the same quiet pool as the Python path
    h = pool._enter()
    try:
        with snap._use() as sh:
            f.check(_bench_lib().kvmlab_bench_pool_restores(h, sh, _strategy(strategy), 1, out))
    finally:
        pool._exit()
    return int(out[0])


def idle_shell_resident_pages(pool: RestorePool) -> int:
    """Pages of guest memory resident in an idle shell of ``pool``, once the
    pool is settled: the pages the pool populated for its next copy restore
    (zigsrc/fit.zig). The shell is taken, counted with mincore and released
    (destroyed: the pool makes another, so settle before the next count)."""
    f = _ffi()
    out = f.ffi.new("kvmlab_vm **")
    n = f.ffi.new("uint64_t *")
    wait_settled(pool)
    h = pool._enter()
    try:
        f.check(_bench_lib().kvmlab_bench_pool_take_shell(h, out))
        try:
            f.check(_bench_lib().kvmlab_bench_resident_pages(out[0], n))
        finally:
            f.lib.kvmlab_pool_release(h, out[0])
    finally:
        pool._exit()
    return int(n[0])


def reset_floor(vm: Vm) -> dict[str, int]:
    """``kvmlab_bench_reset_floor`` on ``vm`` (resettable, stopped after a run):
    the bare dirty-log read, page copies and vCPU/VM state ioctls. Returns the
    core's phases and ``call_ns`` (around the bare native call).

    The floor is the core's reset.floor, the bare operations a reset runs
    after its checks (it leaves the VM reset); a caller that resets the VM
    once more, untimed, afterwards finds no dirty page."""
    f = _ffi()
    out = f.ffi.new("kvmlab_reset_times *")
    with vm._lock:
        h = vm._live()
        t0 = time.perf_counter_ns()
        rc = _bench_lib().kvmlab_bench_reset_floor(h, out)
        call = time.perf_counter_ns() - t0
        f.check(rc)
    t = f.as_dict(out, "kvmlab_reset_times")
    t["call_ns"] = call
    return t


def kvm_memslots() -> int | None:
    """KVM memory slots per VM on this host (None if the core cannot say)."""
    f = _ffi()
    try:
        info = f.ffi.new("kvmlab_host_info *")
        f.check(f.lib.kvmlab_host_info_get(info))
        return int(info.nr_memslots)
    except Exception:  # noqa: BLE001 - a figure for the report, not a requirement
        return None

