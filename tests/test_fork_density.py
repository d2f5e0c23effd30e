"""Fork density (issue 14 item 6): VMs restored without resettable get a shell
without a dirty log (no dirty bitmap in the kernel), and still become
resettable later; fork_many reports the kernel's per-VM memory beside PSS and
MemAvailable. No figure is checked: the machine is shared."""

from __future__ import annotations

from conftest import CFG
from kvmlab import Snapshot, Vm, fork_many
from kvmlab.fork import memory_usage


def test_memory_usage_reads_the_kernel_counters():
    m = memory_usage()
    assert m["kernel_bytes"] > 0 and m["available_bytes"] > 0 and m["pss_bytes"] > 0


def test_a_vm_restored_without_reset_becomes_resettable_later(service_snap):
    image = bytes(service_snap.memory)
    with Vm.restore(service_snap) as vm:  # a shell without dirty log
        assert vm.call(b"before") == b"before"
        vm._enable_reset(service_snap)  # turns the dirty log on (a slot change)
        assert vm.call(b"x" * 3000, op="reverse") == (b"x" * 3000)[::-1]
        vm.write_memory(0x500000, b"host")
        vm.reset()
        assert vm.read_memory(0, CFG.memory_bytes) == image


def test_fork_many_reports_kernel_memory_and_resettable_forks_reset(service_file):
    with Snapshot.load(service_file) as fs:
        with fork_many(fs, 3, progress=False) as vms:
            assert vms.stats.kernel_bytes_per_vm == vms.stats.kernel_delta_bytes / 3
            assert [vm.call(b"ping") for vm in vms] == [b"ping"] * 3
        with fork_many(fs, 2, resettable=True, progress=False) as vms:
            for vm in vms:
                vm.call(b"dirty")
                vm.reset()
                assert vm.read_memory(0x4000, 4096) == bytes(fs.memory[0x4000:0x5000])
