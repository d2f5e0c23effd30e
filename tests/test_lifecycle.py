"""Resource lifetime: no file descriptors leak over many VMs."""

import gc
import time

import pytest

from conftest import CFG_MIN as CFG
from conftest import EXIT7, fd_count
from kvmlab import GuestError, Vm, VmConfig

pytestmark = pytest.mark.kvm

CYCLES = 1000


def warm_up():
    # The core opens /dev/kvm once per process; do that before counting.
    with Vm.boot(EXIT7, CFG) as vm:
        vm.run()
    gc.collect()


@pytest.mark.slow
def test_boot_close_cycles_leak_no_fds():
    warm_up()
    before = fd_count()
    t0 = time.monotonic()
    for i in range(CYCLES):
        vm = Vm.boot(EXIT7, CFG)
        if i % 10 == 0:
            assert vm.run().exit_code == 7
        vm.close()
    elapsed = time.monotonic() - t0
    assert fd_count() == before
    # Each destroy waits ~10-25 ms for irqchip teardown on kvm_pvm.
    assert elapsed < 60, f"{CYCLES} boot/close cycles took {elapsed:.1f} s"


def test_dropped_vm_is_freed_by_finalizer():
    warm_up()
    before = fd_count()
    for _ in range(5):
        vm = Vm.boot(EXIT7, VmConfig(memory_mib=8, vcpus=2))
        vm.run()
        del vm
    gc.collect()
    assert fd_count() == before


def test_failed_boot_leaks_nothing(tmp_path):
    warm_up()
    before = fd_count()
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF\x02\x01" + bytes(58))
    for _ in range(5):
        with pytest.raises(GuestError):
            Vm.boot(bad, CFG)
    gc.collect()
    assert fd_count() == before
