"""The pool's release-time destroy backlog is bounded (zigsrc/pool.zig,
max_dead_backlog = 64): when its reapers fall behind, release() destroys the
VM on the caller's thread instead of queueing it, so memory and descriptors
held by released VMs stay bounded."""

from __future__ import annotations

import time

import pytest

from conftest import CFG_MIN as CFG
from kvmlab import PoolConfig, RestorePool, Vm

pytestmark = pytest.mark.kvm

#: zigsrc/pool.zig: max_dead_backlog and reaper_count.
MAX_DEAD_BACKLOG = 64
REAPERS = 4


@pytest.fixture(scope="module")
def small_snap():
    vm = Vm.boot("counter", CFG, args={"steps": 4, "checkpoint_at": 2})
    vm.run()
    snap = vm.snapshot()
    vm.close()
    yield snap
    snap.close()


def test_release_past_a_backlog_of_64_destroys_on_the_callers_thread(small_snap):
    """160 VMs released back to back: each destroy waits ~11 ms on kvm_pvm and
    4 reapers cannot keep up, so without the bound ~150 would wait queued.
    With it, VMs waiting or being destroyed never exceed 64 queued + the 4
    reapers' + this thread's, and the releases past the bound are the slow
    ones (the caller pays)."""
    n = 160
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        vms = [pool.restore_snapshot(small_snap) for _ in range(n)]
        pending = []
        release_s = []
        for vm in vms:
            t0 = time.perf_counter()
            vm.release()
            release_s.append(time.perf_counter() - t0)
            pending.append(pool.stats().pending_destroy)
        assert max(pending) >= MAX_DEAD_BACKLOG - REAPERS, pending  # the backlog was reached: the bound mattered
        assert max(pending) <= MAX_DEAD_BACKLOG + REAPERS + 1, pending
        # Inline destroys: once the queue is full, every few releases waits
        # for a whole destroy (~10+ ms here; a queued release takes ~10 us).
        full_at = pending.index(max(pending))
        inline = [t for t in release_s[full_at:] if t > 0.005]
        assert len(inline) >= 5, (full_at, release_s)
        deadline = time.monotonic() + 30
        while pool.stats().pending_destroy and time.monotonic() < deadline:
            time.sleep(0.05)
        s = pool.stats()
        assert s.pending_destroy == 0 and s.in_use == 0 and s.releases == n
