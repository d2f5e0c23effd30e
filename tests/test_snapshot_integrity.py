"""A loaded snapshot's file changed behind its back: truncated (issue 17 item 5)
or rewritten in place with the same size (item 6). Every later use refuses with
a SnapshotError: no save or to_bytes of zeros with fresh checksums, no restore
of another file's memory under the original vCPU state."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from conftest import CFG
from kvmlab import PoolConfig, RestorePool, Snapshot, SnapshotError, Vm

pytestmark = pytest.mark.kvm


@pytest.fixture
def two_files(service_snap, tmp_path):
    """Two snapshot files of the same size and shape with different memory:
    the service guest before and after answering a call."""
    a = service_snap.save(tmp_path / "a.kvmsnap")
    with Vm.restore(service_snap, "copy") as vm:
        assert vm.call(b"another memory") == b"another memory"
        b = vm.snapshot().save(tmp_path / "b.kvmsnap")
    assert os.path.getsize(a) == os.path.getsize(b)
    assert a.read_bytes() != b.read_bytes()
    return a, b


def leftovers(d) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name)


def test_save_and_to_bytes_refuse_a_file_truncated_after_load(two_files, tmp_path):
    a, _ = two_files
    with Snapshot.load(a) as s:
        os.truncate(a, 12288)  # the header and part of STATE are left
        out = tmp_path / "copy.kvmsnap"
        with pytest.raises(SnapshotError):
            s.save(out)
        assert not out.exists() and leftovers(tmp_path) == []
        assert s.damaged
        with pytest.raises(SnapshotError):
            s.to_bytes()


def test_to_bytes_refuses_a_file_truncated_after_load(two_files):
    a, _ = two_files
    with Snapshot.load(a) as s:
        os.truncate(a, 12288)
        with pytest.raises(SnapshotError):
            s.to_bytes()  # the first use after the truncation
        assert s.damaged


def rewrite_in_place(src, dst) -> None:
    # Same inode, same size, other bytes. The pause keeps the rewrite out of
    # the file system's timestamp granularity of the load (the limit
    # docs/security.md states).
    ino = os.stat(dst).st_ino
    time.sleep(0.02)
    shutil.copyfile(src, dst)
    assert os.stat(dst).st_ino == ino


@pytest.mark.parametrize("use", ["map", "copy", "pool-map", "pool-copy", "save", "to_bytes", "resettable"])
def test_a_file_rewritten_in_place_after_load_is_refused(two_files, tmp_path, use):
    a, b = two_files
    with Snapshot.load(a) as s, RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        with Vm.restore(s, "map") as vm:  # fine before the rewrite
            assert vm.call(b"x") == b"x"
        rewrite_in_place(b, a)
        with pytest.raises(SnapshotError):
            if use in ("map", "copy"):
                Vm.restore(s, use)
            elif use.startswith("pool-"):
                pool.restore_snapshot(s, use[5:])
            elif use == "save":
                s.save(tmp_path / "copy.kvmsnap")
            elif use == "to_bytes":
                s.to_bytes()
            else:
                Vm.restore(s, "copy", resettable=True)
        assert s.damaged  # and stays: every later use fails too
        with pytest.raises(SnapshotError):
            Vm.restore(s, "copy")
        assert not (tmp_path / "copy.kvmsnap").exists() and leftovers(tmp_path) == []
        assert pool.stats().in_use == 0


def test_reset_of_a_vm_whose_file_was_rewritten_is_refused(two_files):
    """A resettable map restore keeps reading the file at each reset."""
    a, b = two_files
    with Snapshot.load(a) as s, Vm.restore(s, "map", resettable=True) as vm:
        vm.call(b"dirty some pages")
        vm.reset()
        rewrite_in_place(b, a)
        vm.call(b"dirty some pages")
        with pytest.raises(SnapshotError):
            vm.reset()


def test_damaged_reports_a_rewrite(two_files):
    a, b = two_files
    with Snapshot.load(a) as s:
        assert not s.damaged
        rewrite_in_place(b, a)
        assert s.damaged
