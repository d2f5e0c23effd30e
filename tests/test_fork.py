"""fork_many: many map restores of one snapshot file, sharing its pages."""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import threading
import time
import traceback

import pytest

import kvmlab
from kvmlab import ConfigError, Snapshot, fork_many
from kvmlab.fork import memory_usage

from conftest import fault_injected, fd_count

pytestmark = pytest.mark.kvm


def test_fork_many_gives_independent_vms_sharing_the_file(service_file):
    digest = hashlib.sha256(service_file.read_bytes()).hexdigest()
    fds = fd_count()
    with Snapshot.load(service_file) as snap:
        with fork_many(snap, 20) as vms:
            assert len(vms) == 20
            assert vms.stats.n == 20 and vms.ready_ns > 0
            # Every VM answers, and writes in one are not seen by another.
            for i, vm in enumerate(vms):
                assert vm.call(f"vm {i}".encode()) == f"vm {i}".encode()
            vms[0].write_memory(0x900000, b"only in vm 0")
            assert vms[1].read_memory(0x900000, 12) == bytes(12)
            assert vms[0].read_memory(0x900000, 12) == b"only in vm 0"
    assert hashlib.sha256(service_file.read_bytes()).hexdigest() == digest
    assert fd_count() <= fds


def test_fork_many_needs_a_file_backed_snapshot(service_file):
    with Snapshot.load(service_file) as fs:
        data = fs.to_bytes()
    with Snapshot.from_bytes(data) as mem_snap:
        with pytest.raises(ConfigError) as e:
            fork_many(mem_snap, 2)
        assert e.value.check == "strategy_needs_file"
    with Snapshot.load(service_file) as fs:
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ConfigError):
                fork_many(fs, bad)


# -- the native path (zigsrc/fork.zig): one call, all or nothing, stoppable -----------------



def _maps(path) -> int:
    """Mappings a VM holds: its guest memory (the snapshot file, privately)
    and its vCPUs' kvm_run (thread stacks come and go with glibc's cache)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if str(path) in line or "kvm-vcpu" in line)


def test_fork_many_on_each_thread_count_gives_n_distinct_vms_that_answer(service_file):
    with Snapshot.load(service_file) as snap:
        base = _maps(service_file)
        for threads in (1, 2, 5):
            with fork_many(snap, 13, threads=threads, progress=False) as vms:
                assert len(vms) == 13 and vms.threads == threads
                assert _maps(service_file) >= base + 2 * 13  # guest memory and kvm_run of each
                assert 0 < vms.stats.vm_fds_ns and 0 < vms.stats.machines_ns
                assert vms.stats.vm_fds_ns + vms.stats.machines_ns <= vms.ready_ns
                assert len({int(kvmlab._ffi.ffi.cast("uintptr_t", vm._handle)) for vm in vms}) == 13
                assert [vm.call(b"n%d" % i) for i, vm in enumerate(vms)] == [b"n%d" % i for i in range(13)]


@pytest.mark.parametrize("site,after", [("create_vm", 7), ("irqchip", 5), ("vcpu", 9), ("cpuid", 0)])
def test_a_failure_mid_way_frees_every_vm_made(service_file, site, after):
    with Snapshot.load(service_file) as snap:
        for attempt in range(2):  # the first one warms caches (host CPUID)
            fds, maps = fd_count(), _maps(service_file)
            with fault_injected(site, after), pytest.raises(kvmlab.KvmError) as e:
                fork_many(snap, 20, threads=2, progress=False)
            assert e.value.check == "fault_injected"
        assert fd_count() <= fds and _maps(service_file) <= maps
        with fork_many(snap, 3, progress=False) as vms:  # and the next call works
            assert [vm.call(b"ok") for vm in vms] == [b"ok"] * 3


def test_ctrl_c_stops_fork_many_and_frees_what_it_made(service_file):
    with Snapshot.load(service_file) as snap:
        for attempt in range(2):
            fds, maps = fd_count(), _maps(service_file)
            t0 = time.monotonic()
            # 2,000 VMs take far longer than 20 ms here (KVM_CREATE_VM alone is ~0.1 ms).
            # The timer starts inside the block: under load it may fire before fork_many begins.
            with pytest.raises(KeyboardInterrupt):
                threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGINT)).start()
                fork_many(snap, 2000, progress=False)
            assert time.monotonic() - t0 < 60
        assert fd_count() <= fds and _maps(service_file) <= maps
        with fork_many(snap, 2, progress=False) as vms:  # and the next call works
            assert [vm.call(b"ok") for vm in vms] == [b"ok"] * 2


def test_ctrl_c_at_any_moment_of_fork_many_frees_everything(service_file):
    """Ctrl-C may land anywhere: before the native call, inside Thread.start()
    (where nobody knows whether the helper runs), during the core's work, or
    after it returned (while the VMs are wrapped, identities set, memory
    measured). Each time every VM, descriptor, mapping and thread is freed
    before KeyboardInterrupt leaves fork_many. (Before, a Ctrl-C inside
    Thread.start() left the helper making every VM, unseen.)"""
    n = 300
    with Snapshot.load(service_file) as snap:
        t0 = time.monotonic()
        fork_many(snap, n, progress=False).close()  # warms up, and measures the call
        took_s = time.monotonic() - t0
        fds, maps, threads = fd_count(), _maps(service_file), threading.active_count()
        inside = 0
        for k in range(12):
            timer = threading.Timer(took_s * k / 10, os.kill, (os.getpid(), signal.SIGINT))
            with pytest.raises(KeyboardInterrupt) as e:
                timer.start()
                vms = fork_many(snap, n, progress=False)
                try:
                    time.sleep(took_s + 30)  # it returned first: the signal lands here
                finally:
                    vms.close()
            timer.join()  # it sent the signal: its thread is not one fork_many left behind
            inside += any(f.name == "_fork_native" for f in traceback.extract_tb(e.value.__traceback__))
            assert fd_count() <= fds and _maps(service_file) <= maps, k
            assert threading.active_count() <= threads, k
        assert inside >= 1  # some signals did land during the core's work


def test_the_core_stop_flag_keeps_nothing_and_bad_counts_have_ids(service_file):
    ffi, lib = kvmlab._ffi.ffi, kvmlab._ffi.lib
    with Snapshot.load(service_file) as snap, snap._use() as sh:
        out = ffi.new("kvmlab_vm *[]", 4)
        stop, done, count = ffi.new("uint32_t *", 1), ffi.new("uint64_t *"), ffi.new("uint32_t *", 99)
        fds = fd_count()
        assert lib.kvmlab_fork_many(sh, 4, 2, 0, stop, done, out, count, ffi.NULL) == 0
        assert (count[0], done[0], list(out)) == (0, 0, [ffi.NULL] * 4)
        assert fd_count() == fds
        stop[0] = 0
        for n, threads, check in ((0, 1, "fork_count"), (100_001, 1, "fork_count"), (2, 0, "fork_threads"), (2, 65, "fork_threads")):
            rc = lib.kvmlab_fork_many(sh, n, threads, 0, stop, done, out, count, ffi.NULL)
            assert kvmlab._ffi.error_for(rc).check == check
        with pytest.raises(ConfigError):
            fork_many(snap, 2, threads=0)


def _touched(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    for off in range(0, size, mmap.PAGESIZE):
        m[off] = 1
    return m


def test_available_memory_counts_the_free_pages_of_the_per_cpu_lists():
    """Freed pages wait in per-CPU lists that MemAvailable leaves out, and the
    next allocations take them from there: right after a large free (closing
    VMs), MemAvailable barely moves. memory_usage counts those lists, so an
    allocation right after a free shows in full. Best of 3: another process
    may free memory at the same moment."""
    size = 128 << 20
    drops = []
    for _ in range(3):
        _touched(size).close()  # fills this CPU's list
        before = memory_usage()["available_bytes"]
        m = _touched(size)
        drops.append(before - memory_usage()["available_bytes"])
        m.close()
    assert max(drops) >= size * 3 // 4, drops
