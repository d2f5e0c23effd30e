"""Fork density (issue 14 item 6): VMs restored without resettable get a shell
without a dirty log (no dirty bitmap in the kernel), and still become
resettable later; fork_many reports the kernel's per-VM memory beside PSS and
MemAvailable. No figure is checked: the machine is shared."""

from __future__ import annotations

import pytest

from conftest import CFG
from kvmlab import Snapshot, Vm, fork_many
from kvmlab.fork import memory_usage

pytestmark = pytest.mark.kvm


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


#: Programs the PIT (channel 0, mode 2), checkpoints (the snapshot), then
#: reads the channel's status back and exits with its mode bits (0x34).
PIT_GUEST = bytes.fromhex(
    "b034e643" "b010e640" "b027e640"  # out 0x43,0x34; out 0x40,0x10; out 0x40,0x27
    "66ba0105" "b801000000" "ef"  # checkpoint 1
    "b0e2e643" "e440" "0fb6c0" "83e03f"  # read-back status of channel 0; movzx eax,al; and eax,0x3f
    "66ba0005" "ef" "ebfe"  # exit(eax)
)


def test_restore_shells_get_a_pit_only_when_the_snapshot_used_one(tmp_path):
    from kvmlab import PoolConfig, RestorePool

    with Vm.boot(PIT_GUEST, CFG) as vm:
        assert vm.run(timeout_s=10).checkpoint_tag == 1
        snap = vm.snapshot()
        original = vm.run(timeout_s=10)
    assert (original.reason, original.exit_code) == ("exit", 0x34)
    path = snap.save(tmp_path / "pit.kvmsnap")
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool, Snapshot.load(path) as fs:
        for s, strategy in ((snap, "copy"), (fs, "map")):
            with pool.restore_snapshot(s, strategy) as rvm:  # a shell without PIT gets one, with the state
                assert rvm.run(timeout_s=10).exit_code == 0x34
        with fork_many(fs, 2, progress=False) as vms:
            assert [v.run(timeout_s=10).exit_code for v in vms] == [0x34, 0x34]
    snap.close()


def test_a_vm_without_pit_snapshots_and_restores_exactly(service_snap):
    from kvmlab import PoolConfig, RestorePool

    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        with pool.restore_snapshot(service_snap) as rvm:  # no PIT: the service guest never used it
            assert rvm.call(b"one") == b"one"
            again = rvm.snapshot()  # records the state of a PIT never programmed
        with again, Vm.restore(again) as vm, Vm.restore(service_snap) as fresh:
            assert vm.call(b"two", op="reverse") == fresh.call(b"two", op="reverse")
            assert vm.registers(0) == fresh.registers(0)
