"""Fault injection: every step of shell creation can fail; nothing leaks and
pools roll their accounting back. Uses the core's test switch
kvmlab_fault_inject (no mocks: real KVM objects are created and freed)."""

from __future__ import annotations

import time

import pytest

import kvmlab
from kvmlab import KvmError, PoolConfig, RestorePool, Vm, VmConfig, _ffi

from conftest import EXIT7, FAULT_SITE, fd_count

pytestmark = pytest.mark.kvm

SITES = [name for name in FAULT_SITE if name != "none"]
CFG = VmConfig(memory_mib=16, vcpus=2)
def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture(autouse=True)
def _disarm():
    yield
    _ffi.testing.kvmlab_fault_inject(FAULT_SITE["none"], 0)


def inject(site: str, after: int = 0) -> None:
    _ffi.check(_ffi.testing.kvmlab_fault_inject(FAULT_SITE[site], after))


@pytest.mark.parametrize("site", SITES)
def test_each_shell_step_failing_leaks_nothing(site):
    Vm.boot(EXIT7, CFG).close()  # warm caches (host CPUID, ...)
    fds, maps = fd_count(), _maps()
    # For per-vCPU steps, also fail on the second vCPU (after one success).
    for after in ([0, 1] if site in ("vcpu", "vcpu_mmap", "cpuid") else [0]):
        inject(site, after)
        with pytest.raises(KvmError) as e:
            Vm.boot(EXIT7, CFG)
        assert e.value.check == "fault_injected"
        assert f"'{site}'" in str(e.value)  # which step failed: the message is the only place that says it
    assert fd_count() == fds
    assert _maps() <= maps
    with Vm.boot(EXIT7, CFG) as vm:  # and the next one works
        assert vm.run().exit_code == 7


def test_pool_rolls_back_when_shell_creation_fails():
    vm = Vm.boot("counter", CFG, args={"steps": 3, "checkpoint_at": 1})
    vm.run()
    snap = vm.snapshot()
    vm.close()
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool:
        inject("irqchip")
        with pytest.raises(KvmError) as e:
            pool.restore_snapshot(snap)
        assert e.value.check == "fault_injected"
        s = pool.stats()
        assert (s.in_use, s.failures, s.restores, s.misses) == (0, 1, 0, 1)
        with pool.restore_snapshot(snap) as rvm:  # the pool still works
            assert rvm.run_until_exit().exit_code == 0
        s = pool.stats()
        assert s.restores == 1 and s.failures == 1
        # warm() reports the failure instead of hiding it.
        inject("vcpu")
        with pytest.raises(KvmError):
            pool.warm(2)
        pool.warm(2)
        assert pool.idle_count() == 2
    snap.close()
