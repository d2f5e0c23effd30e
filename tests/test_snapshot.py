"""Snapshots: capture, the two parts the pool takes, the format, save/load, metadata.

Every test runs real guests on /dev/kvm. Byte-level facts about the format are
checked with the independent reader in ``snapshot_codec`` (tests/).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

import snapshot_codec as C
import conftest
from conftest import CFG_MIN as CFG
from conftest import EXIT7, MiB
from kvmlab import (
    ClosedError,
    ConfigError,
    GuestCrashError,
    Snapshot,
    Vm,
    VmConfig,
)

pytestmark = pytest.mark.kvm

COUNTER = {"steps": 4, "checkpoint_at": 2, "region_pages": 1}


def counter_at_checkpoint(cfg: VmConfig = CFG, **args) -> Vm:
    """A counter guest stopped at its checkpoint (a VM that can be snapshotted)."""
    args = {**COUNTER, **args}
    vm = Vm.boot("counter", cfg, args=args)
    r = vm.run()
    assert (r.reason, r.checkpoint_tag) == ("checkpoint", args["checkpoint_at"])
    return vm


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


# -- capture ------------------------------------------------------------------------


def test_capture_parts_and_metadata():
    before = dt.datetime.now(dt.timezone.utc)
    with counter_at_checkpoint(VmConfig(memory_mib=16, vcpus=2)) as vm:
        snap = vm.snapshot()
        mem_now = vm.read_memory(0, vm.memory_bytes)
    after = dt.datetime.now(dt.timezone.utc)
    with snap:
        assert isinstance(snap, Snapshot)
        assert (snap.memory_bytes, snap.vcpus, snap.guest) == (16 * MiB, 2, "counter")
        assert snap.config == VmConfig(memory_mib=16, vcpus=2)
        assert before - dt.timedelta(seconds=1) <= snap.created_at <= after + dt.timedelta(seconds=1)
        assert snap.created_at.tzinfo is not None
        assert not snap.file_backed and snap.path is None

        # memory: a read-only buffer, exactly the guest memory at capture.
        m = snap.memory
        assert isinstance(m, memoryview) and m.readonly and m.nbytes == 16 * MiB
        assert hashlib.sha256(m).digest() == hashlib.sha256(mem_now).digest()
        with pytest.raises(TypeError):
            m[0x400000] = 1
        # present pages are exactly the non-zero pages.
        nonzero = sum(1 for i in range(0, len(mem_now), 4096) if mem_now[i : i + 4096].count(0) != 4096)
        assert snap.present_pages == nonzero
        m.release()

        # vcpu_state: bytes, the STATE section, with every record the issue lists.
        blob = snap.vcpu_state
        assert isinstance(blob, bytes) and blob[:8] == b"KVMLSTAT"
        assert blob == C.state_of(snap.to_bytes())
        header, recs = C.parse_state(blob)
        assert C.u32(header, 12) == 2 and C.u64(header, 16) == 16 * MiB
        per_vcpu = {(r.tag, r.vcpu) for r in recs}
        for v in (0, 1):
            # regs, sregs, xsave/fpu, msrs, lapic, mp_state, events, cpuid, host device state
            for tag in (1, 2, 6, 7, 8, 9, 11, 13):
                assert (tag, v) in per_vcpu, (tag, v)
            assert (4, v) in per_vcpu or (3, v) in per_vcpu
        for tag in (32, 33, 34, 35, 37, 39):  # PIC x2, IOAPIC, PIT2, page map, boot
            assert (tag, C.VM_WIDE) in per_vcpu
        assert len(snap.vcpu_state) == snap.info()["state_bytes"]


def test_vm_keeps_running_after_capture():
    with counter_at_checkpoint() as vm, counter_at_checkpoint() as ref:
        vm.snapshot().close()
        vm.snapshot().close()
        r = vm.run_until_exit()
        expect = ref.run_until_exit()
        assert (r.exit_code, r.console) == (0, expect.console)
        assert r.console.startswith("step 3 checksum")


def test_capture_refuses_crashed_and_closed_vms():
    vm = Vm.boot(b"\x0f\x0b", CFG)  # ud2: triple fault
    with pytest.raises(GuestCrashError) as e:
        vm.run()
    assert e.value.check == "triple_fault"
    with pytest.raises(GuestCrashError) as e:
        vm.snapshot()
    assert e.value.check == "snapshot_crashed"
    vm.close()
    with pytest.raises(ClosedError):
        vm.snapshot()


def test_capture_waits_for_a_run_in_another_thread():
    """snapshot() only ever sees a stopped VM: it waits for run() to return."""
    import threading

    with Vm.boot("spin", CFG) as vm:
        t = threading.Thread(target=vm.run, kwargs={"timeout_s": 0.3})
        t.start()
        while not vm._lock.locked() and t.is_alive():  # until run() holds the VM
            time.sleep(0.001)
        assert t.is_alive()
        t0 = time.monotonic()
        snap = vm.snapshot()
        waited = time.monotonic() - t0
        t.join()
        assert waited > 0.1  # it waited for the run's deadline
        with snap, Vm.restore(snap) as vm2:
            assert vm2.run(timeout_s=0.1).reason == "timeout"  # still spinning


def test_closed_snapshot(tmp_path):
    with counter_at_checkpoint() as vm:
        snap = vm.snapshot()
    m = snap.memory
    snap.close()
    snap.close()  # idempotent
    assert snap.closed
    with pytest.raises(ValueError):
        m[0]  # the view handed out was released by close()
    for f in (lambda: snap.to_bytes(), lambda: snap.vcpu_state, lambda: snap.memory, lambda: Vm.restore(snap)):
        with pytest.raises(ClosedError):
            f()
    with pytest.raises(ClosedError):
        snap.save(tmp_path / "sub" / "never-written")
    assert not (tmp_path / "sub").exists()


def test_memory_views_never_dangle():
    """Slices of snap.memory, or the view of a snapshot nobody holds any more,
    keep the memory valid (this used to be a use-after-free: segfault)."""
    import gc

    with counter_at_checkpoint() as vm:
        expect = vm.read_memory(0x400000, 64)
        orphan = vm.snapshot().memory  # the Snapshot object is dropped at once
        gc.collect()
        assert bytes(orphan[0x400000 : 0x400000 + 64]) == expect
        snap = vm.snapshot()
        piece = snap.memory[0x400000 : 0x400000 + 64]
        snap.close()
        gc.collect()
        assert bytes(piece) == expect  # still mapped: the slice holds it
        owner = snap._owner
        assert owner._handle is not None
        del piece
        gc.collect()
        assert owner._handle is None  # freed with the last slice
        del orphan


# -- the format ----------------------------------------------------------------------


def test_to_bytes_layout():
    with counter_at_checkpoint(VmConfig(memory_mib=8, vcpus=2)) as vm, vm.snapshot() as snap:
        b = snap.to_bytes()
        assert snap.stored_bytes == len(b)
        assert b[:8] == b"KVMLSNAP"
        assert (C.u16(b, C.OFF["version_major"]), C.u16(b, C.OFF["version_minor"])) == (1, 0)
        assert C.u32(b, C.OFF["arch"]) == 1  # x86_64
        assert C.u32(b, C.OFF["header_bytes"]) == 4096
        assert C.u64(b, C.OFF["memory_bytes"]) == 8 * MiB
        assert C.u32(b, C.OFF["vcpus"]) == 2
        assert C.u32(b, C.OFF["flags"]) == C.FLAG_PACKED
        assert C.u64(b, C.OFF["created_unix_ns"]) == snap.info()["created_unix_ns"]
        assert C.u64(b, C.OFF["total_bytes"]) == len(b)
        assert C.u64(b, C.OFF["present_pages"]) == snap.present_pages
        assert C.u32(b, C.OFF["header_crc32c"]) == C.header_crc(b)
        st, mem = C.sections(b)
        assert (st.kind, st.offset, st.bytes) == (C.KIND_STATE, 4096, len(snap.vcpu_state))
        assert mem.kind == C.KIND_MEMORY and mem.offset % 4096 == 0 and mem.offset >= st.offset + st.bytes
        assert mem.bytes == snap.present_pages * 4096 and mem.offset + mem.bytes == len(b)
        assert C.crc32c(C.state_of(b)) == st.crc
        assert C.crc32c(C.memory_section_of(b)) == mem.crc
        # Packed MEMORY = the present pages in page order, no zero page among them.
        m = snap.memory
        present = [i for i in range(8 * MiB // 4096) if any(m[i * 4096 : (i + 1) * 4096])]
        assert C.memory_section_of(b) == b"".join(bytes(m[i * 4096 : (i + 1) * 4096]) for i in present)
        m.release()


def test_from_bytes_round_trip():
    with counter_at_checkpoint() as vm, vm.snapshot() as snap:
        b = snap.to_bytes()
        for data in (b, bytearray(b), memoryview(b)):
            with Snapshot.from_bytes(data) as s2:
                assert s2.to_bytes() == b  # same bytes, created_at included
                assert s2.vcpu_state == snap.vcpu_state
                assert (s2.memory_bytes, s2.vcpus, s2.guest, s2.present_pages) == (
                    snap.memory_bytes, snap.vcpus, snap.guest, snap.present_pages
                )
                assert s2.created_at == snap.created_at
                assert s2.memory == snap.memory


def test_sparse_256mib_guest(tmp_path):
    """A 256 MiB guest that touched ~2 MiB: a few MiB in bytes and on disk."""
    cfg = VmConfig(memory_mib=256)
    with Vm.boot("counter", cfg, args={"steps": 2, "region_pages": 512}) as vm:  # 512 pages = 2 MiB
        assert vm.run().exit_code == 0
        snap = vm.snapshot()
    with snap:
        assert snap.memory_bytes == 256 * MiB
        assert 512 <= snap.present_pages < 600  # the region + boot structures
        assert snap.stored_bytes < 3 * MiB
        assert len(snap.to_bytes()) == snap.stored_bytes
        p = snap.save(tmp_path / "big.kvmsnap")
        st = os.stat(p)
        assert st.st_size > 256 * MiB  # full layout: page i at MEMORY + i*4096 ...
        assert st.st_blocks * 512 < 4 * MiB  # ... but zero pages are holes
        with Snapshot.load(p) as loaded:
            assert loaded.memory_bytes == 256 * MiB
            assert loaded.stored_bytes == st.st_blocks * 512
            assert loaded.present_pages == snap.present_pages


def test_full_layout_file_bytes_load_with_from_bytes(tmp_path):
    with counter_at_checkpoint() as vm, vm.snapshot() as snap:
        p = snap.save(tmp_path / "s.kvmsnap")
        raw = p.read_bytes()
        assert C.u32(raw, C.OFF["flags"]) == 0  # full layout
        st, mem = C.sections(raw)
        assert mem.bytes == snap.memory_bytes and mem.offset % 4096 == 0
        assert raw[mem.offset :] == bytes(snap.memory)  # page i at MEMORY + i*4096
        with Snapshot.from_bytes(raw) as s2:
            assert s2.to_bytes() == snap.to_bytes()


# -- save / load --------------------------------------------------------------------------


def test_save_is_atomic_0600_and_leaves_no_temp_file(tmp_path):
    with counter_at_checkpoint() as vm, vm.snapshot() as snap:
        p = tmp_path / "s.kvmsnap"
        p.write_bytes(b"old contents")
        old = open(p, "rb")  # noqa: SIM115 - kept open across the save
        old_ino = os.fstat(old.fileno()).st_ino
        old_umask = os.umask(0)  # even with no umask, the file is 0600
        try:
            assert snap.save(p) == p
        finally:
            os.umask(old_umask)
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_ino != old_ino  # a new file renamed over the old one ...
        assert old.read() == b"old contents"  # ... which was never written in place
        old.close()
        assert sorted(os.listdir(tmp_path)) == ["s.kvmsnap"]
        # A missing parent directory is created (0700).
        q = snap.save(tmp_path / "sub" / "dir" / "t.kvmsnap")
        assert stat.S_IMODE(os.stat(tmp_path / "sub").st_mode) == 0o700
        assert q.read_bytes() == p.read_bytes()


def test_save_writes_temp_fsyncs_then_renames(tmp_path):
    """The syscall order of save(): create a temp file 0600, write, fsync it,
    rename it over the target, fsync the directory."""
    strace = shutil.which("strace")
    if strace is None:
        # The only evidence of the atomic-save promise: CI (.ci/run) installs strace.
        (pytest.fail if conftest.REQUIRE_KVM else pytest.skip)("strace is not installed (apt-get install strace)")
    with counter_at_checkpoint() as vm, vm.snapshot() as snap:
        src = tmp_path / "src.kvmsnap"
        snap.save(src)
    target = tmp_path / "t.kvmsnap"
    code = textwrap.dedent(f"""
        import kvmlab
        kvmlab.Snapshot.load({str(src)!r}).save({str(target)!r})
    """)
    log = tmp_path / "strace.log"
    r = subprocess.run(
        [strace, "-f", "-qq", "-o", str(log), "-e", "trace=open,openat,pwrite64,ftruncate,fsync,rename,renameat,renameat2",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    if r.returncode != 0 and "ptrace" in (r.stderr or "") and not conftest.REQUIRE_KVM:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    calls = [re.sub(r"^\d+\s+", "", ln) for ln in log.read_text().splitlines()]  # drop the pid column
    tmp_open = next(i for i, c in enumerate(calls) if c.startswith("open") and "t.kvmsnap.tmp-" in c)
    assert all(flag in calls[tmp_open] for flag in ("O_CREAT", "O_EXCL", "0600"))
    fd = calls[tmp_open].rsplit("=", 1)[1].strip()
    kinds = []
    for c in calls[tmp_open + 1 :]:
        name = c.split("(", 1)[0]
        if name in ("pwrite64", "ftruncate", "fsync") and re.match(rf"{name}\({fd}[,)]", c):
            kinds.append(name)
        elif name.startswith("rename") and "t.kvmsnap" in c:
            kinds.append("rename")
        elif name == "fsync":
            kinds.append("fsync-other")
    assert kinds[0] == "pwrite64"
    i_fsync = kinds.index("fsync")
    i_rename = kinds.index("rename")
    assert i_fsync < i_rename  # data durable before it becomes visible
    assert "pwrite64" not in kinds[i_fsync:]
    assert "fsync-other" in kinds[i_rename:]  # the directory, after the rename
    assert target.read_bytes() == src.read_bytes()


def test_load_maps_the_file_without_reading_memory_into_the_heap(tmp_path):
    cfg = VmConfig(memory_mib=128)
    with Vm.boot("counter", cfg, args={"steps": 2, "region_pages": 1024}) as vm:  # 4 MiB touched
        assert vm.run().exit_code == 0
        with vm.snapshot() as snap:
            p = snap.save(tmp_path / "m.kvmsnap")
            digest = hashlib.sha256(snap.memory).hexdigest()
    base = rss_anon()
    with Snapshot.load(p) as loaded:
        grown = rss_anon() - base
        assert grown < 2 * MiB, f"load grew anonymous memory by {grown} bytes"
        assert loaded.file_backed and loaded.path == p
        maps = open("/proc/self/maps").read()
        assert str(p) in maps  # the file is mapped
        assert loaded.stored_bytes == os.stat(p).st_blocks * 512
        m = loaded.memory
        assert m.readonly and m.nbytes == 128 * MiB
        assert hashlib.sha256(m).hexdigest() == digest
        m.release()
        assert rss_anon() - base < 2 * MiB  # reading it did not copy it either
    assert str(p) not in open("/proc/self/maps").read()  # close() unmapped it


def test_load_round_trip_keeps_metadata(tmp_path):
    with counter_at_checkpoint(VmConfig(memory_mib=8, vcpus=2)) as vm, vm.snapshot() as snap:
        p = snap.save(tmp_path / "s.kvmsnap")
        with Snapshot.load(str(p)) as loaded:
            assert (loaded.memory_bytes, loaded.vcpus, loaded.guest, loaded.present_pages, loaded.created_at) == (
                snap.memory_bytes, snap.vcpus, snap.guest, snap.present_pages, snap.created_at
            )
            assert loaded.vcpu_state == snap.vcpu_state
            assert loaded.to_bytes() == snap.to_bytes()
            info = loaded.info()
            assert info["path"] == str(p) and info["file_backed"] and info["version"] == "1.0"
            assert info["created_at"] == snap.created_at.isoformat()
            assert "s.kvmsnap" in repr(loaded)
            # Saving a loaded (mapped) snapshot over its own file works.
            loaded.save(p)
        with Snapshot.load(p) as again:
            assert again.to_bytes() == snap.to_bytes()
        # A packed encoding written to a file loads too (copied, not mapped).
        q = tmp_path / "packed.bin"
        q.write_bytes(snap.to_bytes())
        with Snapshot.load(q) as packed:
            assert not packed.file_backed and packed.to_bytes() == snap.to_bytes()
            with pytest.raises(ConfigError) as e:
                Vm.restore(packed, strategy="map")
            assert e.value.check == "strategy_needs_file"


def test_snapshot_of_a_small_raw_guest():
    with Vm.boot(EXIT7, CFG) as vm:
        assert vm.run().exit_code == 7
        with vm.snapshot() as snap:
            assert snap.guest == "custom"
            with Vm.restore(snap) as vm2:
                r = vm2.run()
                assert (r.reason, r.exit_code, r.console) == ("exit", 7, "")
