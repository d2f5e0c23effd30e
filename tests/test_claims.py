"""Documented claims that had no test (issue 17 item 15): fork_many VMs share
the snapshot file's pages, a reset puts back only the pages written since
(exact counts), and the console-write port's limits (over 64 KiB, outside
guest memory)."""

from __future__ import annotations

import re

import pytest

from conftest import CFG
from kvmlab import GuestCrashError, Snapshot, Vm, fork_many

pytestmark = pytest.mark.kvm


# -- fork_many shares the file's pages ---------------------------------------------------


def file_mappings(path) -> list[dict[str, int]]:
    """/proc/self/smaps entries (kB fields) of the mappings of ``path``."""
    out: list[dict[str, int]] = []
    keep = False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            keep = line.rstrip("\n").endswith(" " + str(path))
            if keep:
                out.append({})
        elif keep and line.rstrip().endswith(" kB"):
            key, _, value = line.partition(":")
            out[-1][key] = int(value.split()[0])
    return out


def test_fork_many_vms_share_the_files_pages(service_file):
    n = 8
    with Snapshot.load(service_file) as snap, fork_many(snap, n, progress=False) as vms:
        for i, vm in enumerate(vms):
            assert vm.call(b"vm %d" % i) == b"vm %d" % i  # every VM touched its pages
        guest = [m for m in file_mappings(service_file) if m["Size"] == CFG.memory_bytes >> 10]
        assert len(guest) == n  # each VM's memory is a mapping of the file
        for m in guest:
            # Pages read are the page cache's, shared by all; only pages a
            # guest wrote became private (anonymous) copies.
            assert m["Shared_Clean"] > 0 and m["Private_Clean"] == 0, m
            assert m["Private_Dirty"] == m["Anonymous"] < m["Rss"], m
        rss, pss = sum(m["Rss"] for m in guest), sum(m["Pss"] for m in guest)
        assert pss * 2 < rss, (pss, rss)  # proportional share: the shared pages count once


# -- reset puts back exactly the pages written since ------------------------------------

# Writes one byte to 3 pages (0x900000, 0x901000, 0x905000), checkpoints (tag 7), repeats.
# Snapshot after the first pass: the page tables' accessed/dirty bits are set by then,
# so a later pass writes exactly these 3 pages.
THREE_PAGES = bytes.fromhex(
    "c6042500009000" "01"  # mov byte [0x900000], 1
    "c6042500109000" "01"  # mov byte [0x901000], 1
    "c6042500509000" "01"  # mov byte [0x905000], 1
    "66ba0105"  # mov dx, 0x501
    "b807000000"  # mov eax, 7
    "ef"  # out dx, eax (checkpoint)
    "ebdc"  # jmp to the first write
)


@pytest.fixture(scope="module")
def three_pages(tmp_path_factory):
    with Vm.boot(THREE_PAGES, CFG) as vm:
        r = vm.run()
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", 7)
        snap = vm.snapshot()
    path = snap.save(tmp_path_factory.mktemp("three") / "three.kvmsnap")
    yield snap, path
    snap.close()


@pytest.mark.parametrize("strategy,mode", [("copy", "copy"), ("map", "copy"), ("map", "drop")])
def test_reset_puts_back_exactly_the_pages_written(three_pages, strategy, mode):
    snap, path = three_pages
    with Snapshot.load(path) as fs:
        src = fs if strategy == "map" else snap
        with Vm.restore(src, strategy, resettable=True) as vm:
            assert vm.reset(mode).dirty_pages == 0  # nothing written since the restore
            for _ in range(3):
                assert vm.run().checkpoint_tag == 7
                assert vm.reset(mode).dirty_pages == 3  # the guest's three pages, nothing else
            vm.write_memory(0xA00000, b"y" * 5000)  # two pages
            vm.write_memory(0xA00010, b"z")  # the same page again
            vm.write_memory(0x900800, b"w")  # a page the guest writes too
            assert vm.run().checkpoint_tag == 7
            assert vm.reset(mode).dirty_pages == 5
            assert vm.read_memory(0, vm.memory_bytes) == bytes(snap.memory)


# -- the console-write port ---------------------------------------------------------------

# Console write (port 0x502) of the descriptor at 0x400000, forever.
WRITE_FOREVER = bytes.fromhex("66ba0205" "b800004000" "ef" "ebfd")


@pytest.mark.parametrize(
    "addr,length,check",
    [
        (0x500000, 65537, "console_write"),  # over the 64 KiB of one write
        (CFG.memory_bytes - 100, 200, "console_write"),  # crosses the end of memory
        (CFG.memory_bytes, 1, "console_write"),  # starts past it
        (2**64 - 8, 16, "console_write"),  # wraps around
        (0x500000, 2**64 - 1, "console_write"),
    ],
    ids=["65537-bytes", "crosses-end", "past-end", "wraps", "huge-length"],
)
def test_console_writes_over_64k_or_outside_memory_crash_the_guest(addr, length, check):
    with Vm.boot(WRITE_FOREVER, CFG) as vm:
        vm.write_memory(0x400000, addr.to_bytes(8, "little") + length.to_bytes(8, "little"))
        with pytest.raises(GuestCrashError) as e:
            vm.run(timeout_s=5)
        assert e.value.check == check


def test_console_write_of_exactly_64k_at_the_end_of_memory():
    with Vm.boot(WRITE_FOREVER, CFG) as vm:
        end = CFG.memory_bytes - 65536
        vm.write_memory(end, b"e" * 65536)
        vm.write_memory(0x400000, end.to_bytes(8, "little") + (65536).to_bytes(8, "little"))
        r = vm.run(timeout_s=0.2)
        assert r.reason == "timeout" and len(r.console) >= 65536 and set(r.console) == {"e"}


# -- descriptors per VM (docs/security.md, fork_many's fd limit) -------------------------


@pytest.mark.parametrize("strategy", ["copy", "map"])
def test_each_vm_holds_one_plus_vcpus_descriptors(service_file, strategy):
    from conftest import fd_count

    with Snapshot.load(service_file) as snap:
        Vm.restore(snap, strategy).close()  # /dev/kvm and the like, opened once per process
        before = fd_count()
        vms = [Vm.restore(snap, strategy) for _ in range(3)]
        assert fd_count() - before == 3 * (1 + snap.vcpus)
        for vm in vms:
            vm.close()
        assert fd_count() == before
