"""Misbehaving guests, a snapshot file truncated under a map restore, and
address-space limits: each gives a clear error or result, never a crash, and
the pool keeps working."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import CFG
import kvmlab
from kvmlab import GuestCrashError, PoolConfig, RestorePool, Vm, VmConfig

pytestmark = pytest.mark.kvm


# Raw guests (flat images at 0x100000, CPL3).
MMIO_WRITE = bytes.fromhex("48b80000000001000000" "c60001" "ebfe")  # mov rax, 1<<32; mov byte [rax], 1
UNKNOWN_PORT = bytes.fromhex("66ba3412" "b001" "ee" "ebfe")  # mov dx, 0x1234; mov al, 1; out dx, al
UNKNOWN_PORT_IN = bytes.fromhex("66ba7000" "ec" "ebfe")  # mov dx, 0x70; in al, dx
BAD_CONSOLE_DESC = bytes.fromhex("66ba0205" "b8f0ffffff" "ef" "ebfe")  # console write, descriptor at 0xfffffff0


@pytest.fixture
def good(counter_snap):
    return counter_snap


@pytest.mark.parametrize(
    "image,check",
    [
        (MMIO_WRITE, "triple_fault"),  # a page fault past guest memory with no IDT
        (UNKNOWN_PORT, "unknown_port_write"),
        (UNKNOWN_PORT_IN, "unknown_port_read"),
        (BAD_CONSOLE_DESC, "console_descriptor"),
    ],
)
def test_misbehaving_guest_is_reported_and_the_pool_keeps_working(good, image, check):
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        with Vm.boot(image, CFG) as bad:
            with pytest.raises(GuestCrashError) as ei:
                bad.run(timeout_s=5)
            assert ei.value.check == check
            assert "rip=0x" in str(ei.value)  # the message carries the registers (documented)
            with pytest.raises(GuestCrashError):  # stays crashed
                bad.run(timeout_s=1)
        with pool.restore_snapshot(good) as rvm:
            assert rvm.run_until_exit().exit_code == 0
        assert pool.stats().failures == 0


#: The truncation scripts' start: a memtouch snapshot saved at argv[1],
#: loaded, and restored with map as `mapped` (kvmlab's SIGBUS handler is
#: installed by then).
MAPPED_MEMTOUCH = textwrap.dedent(
    r"""
    import faulthandler, os, sys
    import kvmlab
    from kvmlab import GuestCrashError, SnapshotError, Snapshot, Vm, VmConfig
    path = sys.argv[1]
    vm = Vm.boot("memtouch", VmConfig(memory_mib=16), args={"pages": 512, "rounds": 3})
    vm.run()
    vm.snapshot().save(path)
    vm.close()
    snap = Snapshot.load(path)
    mapped = Vm.restore(snap, "map")
    """
)

TRUNCATE_SCRIPT = MAPPED_MEMTOUCH + textwrap.dedent(
    r"""
    os.truncate(path, 4096)          # someone truncates the file under us
    outcomes = []
    for what, call in [
        ("read_memory", lambda: mapped.read_memory(0x400000, 4096 * 8)),
        ("write_memory", lambda: mapped.write_memory(0x500000, b"x")),
        ("snapshot", lambda: mapped.snapshot()),
        ("run", lambda: mapped.run(timeout_s=5)),
        ("copy restore", lambda: Vm.restore(snap, "copy")),
        ("to_bytes", lambda: snap.to_bytes()),
    ]:
        try:
            call()
            outcomes.append(f"{what}: ok")
        except (SnapshotError, GuestCrashError) as e:
            outcomes.append(f"{what}: {type(e).__name__}: {e}")
    # Python reading the zero-copy view past the new end: no SIGBUS, zeros,
    # and the snapshot is marked damaged so kvmlab refuses it from now on
    # (the copy restore above already saw the file's new size).
    tail = bytes(snap.memory[0x400000:0x400000 + 4096])
    outcomes.append(f"memory view: {'zeros' if tail == bytes(4096) else 'data'}")
    outcomes.append(f"damaged: {snap.damaged}")
    for what, call in [("save after", lambda: snap.save(path + ".2")), ("restore after", lambda: Vm.restore(snap, "copy"))]:
        try:
            call()
            outcomes.append(f"{what}: ok")
        except (SnapshotError, GuestCrashError) as e:
            outcomes.append(f"{what}: {type(e).__name__}: {e}")
    print("\n".join(outcomes))
    print("alive")
    """
)


def test_truncating_a_mapped_snapshot_file_gives_errors_not_sigbus(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", TRUNCATE_SCRIPT, str(tmp_path / "m.kvmsnap")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, f"died with {p.returncode}: {p.stderr[-3000:]}"
    out = p.stdout
    assert out.strip().endswith("alive")
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines()[:-1])
    for what in ("read_memory", "write_memory", "snapshot", "copy restore", "to_bytes"):
        assert lines[what].startswith("SnapshotError") and "truncated" in lines[what], (what, lines[what])
    # The guest's touch of a lost page is reported as the truncation (the
    # error class), not as the triple fault or EFAULT it shows up as.
    assert lines["run"].startswith("SnapshotError") and "truncated" in lines["run"], lines["run"]
    assert lines["memory view"] == "zeros" and lines["damaged"] == "True"
    for what in ("save after", "restore after"):
        assert lines[what].startswith("SnapshotError") and "truncated or replaced while mapped" in lines[what], lines[what]


OTHER_SIGBUS_HANDLER_SCRIPT = MAPPED_MEMTOUCH + textwrap.dedent(
    r"""
    faulthandler.enable()             # replaces kvmlab's SIGBUS handler: a plain copy of a lost page would kill us now
    os.truncate(path, 4096)
    for what, call in [("read_memory", lambda: mapped.read_memory(0x400000, 4096 * 8)),
                       ("write_memory", lambda: mapped.write_memory(0x500000, b"x"))]:
        try:
            call()
            print(what, "ok")
        except SnapshotError as e:
            print(what, e.check)
    print("alive")
    """
)


def test_host_copies_of_a_mapped_vm_stay_safe_when_another_sigbus_handler_took_over(tmp_path):
    """read_memory/write_memory (and call()) of a map-restored VM copy with
    memcpy only while kvmlab's SIGBUS handler is the process's: with another
    one installed (faulthandler here) they copy through the kernel and a
    truncated file is an error, not a crash."""
    p = subprocess.run([sys.executable, "-c", OTHER_SIGBUS_HANDLER_SCRIPT, str(tmp_path / "m.kvmsnap")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"died with {p.returncode}: {p.stderr[-3000:]}"
    assert p.stdout.split("\n")[:3] == ["read_memory damaged", "write_memory damaged", "alive"], p.stdout

RLIMIT_AS_SCRIPT = textwrap.dedent(
    """
    import resource
    import kvmlab
    from kvmlab import KvmlabError, Vm, VmConfig
    with Vm.boot("hello", VmConfig(memory_mib=8)) as vm:
        vm.run()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, hard))   # 3 GiB of address space
    try:
        Vm.boot("hello", VmConfig(memory_mib=4096))
        print("big: ok")
    except KvmlabError as e:
        print("big:", type(e).__name__, e)
    with Vm.boot("hello", VmConfig(memory_mib=8)) as vm:      # small ones still work
        print("small:", vm.run().console.strip())
    """
)


def test_address_space_limit_gives_a_clear_error():
    p = subprocess.run([sys.executable, "-c", RLIMIT_AS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    big, small = p.stdout.strip().splitlines()[-2:]
    assert big.startswith("big: KvmlabMemoryError") and "4096 MiB" in big, big
    assert small == "small: hello from kvmlab guest"
