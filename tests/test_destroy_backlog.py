"""The pool's release-time destroy backlog is bounded (zigsrc/pool.zig,
max_dead_backlog = 64): when its reapers fall behind, release() destroys the
VM on the caller's thread instead of queueing it, so memory and descriptors
held by released VMs stay bounded."""

from __future__ import annotations

import time

import pytest

from conftest import CFG_MIN as CFG
from conftest import reapers_held
from kvmlab import PoolConfig, RestorePool, Vm

pytestmark = pytest.mark.kvm

#: zigsrc/pool.zig: max_dead_backlog.
MAX_DEAD_BACKLOG = 64


@pytest.fixture(scope="module")
def small_snap():
    vm = Vm.boot("counter", CFG, args={"steps": 4, "checkpoint_at": 2})
    vm.run()
    snap = vm.snapshot()
    vm.close()
    yield snap
    snap.close()


def test_release_past_a_backlog_of_64_destroys_on_the_callers_thread(small_snap):
    """160 VMs released back to back while the reapers are held (as when they
    fall behind: each destroy waits ~11 ms on kvm_pvm): the queue grows to 64,
    then every further release destroys its VM on the caller's thread (the
    caller pays), so VMs waiting to be destroyed never exceed the bound. Let
    go, the reapers drain the queue."""
    n = 160
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        vms = [pool.restore_snapshot(small_snap) for _ in range(n)]
        with reapers_held(pool):
            before = pool.stats()
            pending = []
            for vm in vms:
                vm.release()
                pending.append(pool.stats().pending_destroy)
            held = pool.stats()
        assert pending == [min(i + 1, MAX_DEAD_BACKLOG) for i in range(n)]
        assert held.destroyed - before.destroyed == n - MAX_DEAD_BACKLOG  # destroyed inline
        deadline = time.monotonic() + 30
        while pool.stats().pending_destroy and time.monotonic() < deadline:
            time.sleep(0.05)
        s = pool.stats()
        assert s.pending_destroy == 0 and s.in_use == 0 and s.releases == n
        assert s.destroyed - before.destroyed == n
