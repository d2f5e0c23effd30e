"""A snapshot file losing pages under kvmlab's mappings (issue 17 items 4 and
7, and SIGBUS chaining): the SIGBUS net covers every kvmlab mapping however
many there are, a SIGBUS elsewhere goes to the handler that was there before,
and a map-restored guest touching a lost page is reported as the truncation.
Each runs in a subprocess: a failure would kill the process with SIGBUS."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.kvm

PRELUDE = """
import os, resource, sys
from kvmlab import SnapshotError, Snapshot, Vm, VmConfig
def save_counter(path):
    vm = Vm.boot("counter", VmConfig(memory_mib=8), args={"steps": 4, "checkpoint_at": 2})
    vm.run()
    vm.snapshot().save(path)
    vm.close()
"""


def _script(body: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body), *args], capture_output=True, text=True, timeout=timeout_s
    )


MANY_MAPPINGS = """
    a, b = sys.argv[1], sys.argv[2]
    save_counter(a)
    save_counter(b)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # one fd per loaded snapshot
    # More kvmlab mappings than the old fixed table had slots (4,096): each
    # file-backed snapshot registers its mapping with the SIGBUS handler.
    held = [Snapshot.load(a) for _ in range(4100)]
    snap = Snapshot.load(b)                                     # registered past the old limit
    os.truncate(b, 12288)                                       # all of its memory is gone
    page = bytes(snap.memory[0x100000:0x101000])                # SIGBUS without the net
    print("zeros" if page == bytes(4096) else "data", snap.damaged)
    try:
        snap.save(b + ".2")
        print("saved")
    except SnapshotError as e:
        print("refused", e.check)
    for s in held:
        s.close()
"""


def test_the_sigbus_net_covers_more_than_4096_mappings(tmp_path):
    """Item 4: with 4,100 snapshots loaded, a new snapshot's mapping is still
    covered: reading a page lost to truncation gives zeros and marks it
    damaged (before: the table was full, the read killed the process)."""
    soft, hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
    if hard < 4200:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < 4200: this test needs 4,100 open snapshots")
    p = _script(MANY_MAPPINGS, str(tmp_path / "a.kvmsnap"), str(tmp_path / "b.kvmsnap"))
    assert p.returncode == 0, f"died with {p.returncode}: {p.stderr[-3000:]}"
    assert p.stdout.split() == ["zeros", "True", "refused", "damaged"], p.stdout


FORWARD = """
    import faulthandler, mmap
    faulthandler.enable()           # a SIGBUS handler installed before kvmlab's
    path, other = sys.argv[1], sys.argv[2]
    save_counter(path)
    snap = Snapshot.load(path)      # kvmlab installs its handler here, keeping faulthandler's
    os.truncate(path, 12288)
    print("kvmlab mapping:", "zeros" if bytes(snap.memory[0x100000:0x101000]) == bytes(4096) else "data", flush=True)
    with open(other, "w+b") as f:   # a mapping that is not kvmlab's
        f.write(b"x" * 8192)
        f.flush()
        m = mmap.mmap(f.fileno(), 8192)
        os.truncate(other, 0)
        print("touching a foreign mapping", flush=True)
        m[4096]                     # SIGBUS: kvmlab must pass it on to faulthandler
    print("survived")
"""


def test_a_sigbus_outside_kvmlab_mappings_goes_to_the_previous_handler(tmp_path):
    """A SIGBUS that is not kvmlab's reaches the handler installed before
    kvmlab's (faulthandler here: it prints "Fatal Python error: Bus error"
    and the traceback, then dies of SIGBUS), while a kvmlab mapping in the
    same process is still covered."""
    p = _script(FORWARD, str(tmp_path / "a.kvmsnap"), str(tmp_path / "other.bin"))
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stdout, p.stderr[-2000:])
    assert p.stdout.splitlines() == ["kvmlab mapping: zeros", "touching a foreign mapping"], p.stdout
    assert "Fatal Python error: Bus error" in p.stderr and "FORWARD" not in p.stderr, p.stderr[-2000:]
    assert 'File "<string>"' in p.stderr  # faulthandler's traceback of the touch


GUEST_TOUCH = """
    path = sys.argv[1]
    cut = int(sys.argv[2])
    outcomes = []
    for i in range(3):
        vm = Vm.boot("memtouch", VmConfig(memory_mib=16), args={"pages": 512, "rounds": 3})
        vm.run()                    # at the round-1 checkpoint: rounds 2 and 3 touch 512 pages
        vm.snapshot().save(path)
        vm.close()
        snap = Snapshot.load(path)
        mapped = Vm.restore(snap, "map")
        os.truncate(path, cut)      # the pages the guest touches next are gone
        try:
            mapped.run(timeout_s=10)
            outcomes.append("ran")
        except Exception as e:
            outcomes.append(f"{type(e).__name__}:{getattr(e, 'check', None)}")
        mapped.close()
        snap.close()
    print(" ".join(outcomes))
"""


@pytest.mark.parametrize("cut", [4096, 0x500000])
def test_a_guest_touching_a_lost_page_gets_the_truncation_error(tmp_path, cut):
    """Item 7: a map-restored guest touching a page lost to truncation ends in
    SnapshotError (the truncation), never in a bare GuestCrashError("triple
    fault") or a run that continues on zeros. `cut` 4096: everything lost;
    0x500000: the code and tables survive, the pages memtouch writes do not."""
    p = _script(GUEST_TOUCH, str(tmp_path / "m.kvmsnap"), str(cut))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["SnapshotError:damaged"] * 3, p.stdout  # the truncation's check id
