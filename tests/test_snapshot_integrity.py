"""A loaded snapshot's file changed behind its back: truncated (issue 17 item 5)
or rewritten in place with the same size (item 6). Every later use refuses with
a SnapshotError: no save or to_bytes of zeros with fresh checksums, no restore
of another file's memory under the original vCPU state."""

from __future__ import annotations

import os
import shutil
import time

import pytest

import snapshot_codec as C
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


def refused(snap, *uses) -> None:
    """Each of ``uses`` (in order) raises SnapshotError; then ``snap`` says it is damaged."""
    for use in uses:
        with pytest.raises(SnapshotError):
            use()
    assert snap.damaged


def test_save_and_to_bytes_refuse_a_file_truncated_after_load(two_files, tmp_path):
    a, _ = two_files
    with Snapshot.load(a) as s:
        os.truncate(a, 12288)  # the header and part of STATE are left
        out = tmp_path / "copy.kvmsnap"
        refused(s, lambda: s.save(out), s.to_bytes)
        assert not out.exists() and leftovers(tmp_path) == []


def test_to_bytes_refuses_a_file_truncated_after_load(two_files):
    a, _ = two_files
    with Snapshot.load(a) as s:
        os.truncate(a, 12288)
        refused(s, s.to_bytes)  # the first use after the truncation


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
        first = {
            "map": lambda: Vm.restore(s, "map"),
            "copy": lambda: Vm.restore(s, "copy"),
            "pool-map": lambda: pool.restore_snapshot(s, "map"),
            "pool-copy": lambda: pool.restore_snapshot(s, "copy"),
            "save": lambda: s.save(tmp_path / "copy.kvmsnap"),
            "to_bytes": s.to_bytes,
            "resettable": lambda: Vm.restore(s, "copy", resettable=True),
        }[use]
        refused(s, first, lambda: Vm.restore(s, "copy"))  # and stays: every later use fails too
        assert not (tmp_path / "copy.kvmsnap").exists() and leftovers(tmp_path) == []
        assert pool.stats().in_use == 0


@pytest.mark.parametrize("strategy", ["map", "copy"])
def test_a_prepared_take_of_a_rewritten_file_is_refused(two_files, strategy):
    """The take compares the mapped header (no statx: docs/security.md); another
    snapshot written over the file differs there."""
    a, b = two_files
    with Snapshot.load(a) as s, RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        pool.prepare(s, 1, strategy=strategy)
        rewrite_in_place(b, a)
        with pytest.raises(SnapshotError) as e:
            pool.restore_snapshot(s)
        assert e.value.check == "damaged"
        assert s.damaged and pool.stats().in_use == 0


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



def flip_code_page(path) -> None:
    """Rewrites the guest's code page (0x100000) of a full-layout file in place."""
    at = C.sections(path.read_bytes()[:4096])[1].offset + 0x100000
    with open(path, "r+b") as f:
        f.seek(at)
        page = f.read(4096)
        assert page != bytes(4096)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in page))


def test_a_page_rewritten_in_place_is_refused_by_save_and_reset(two_files, tmp_path):
    """Only guest memory rewritten (the header untouched): save and to_bytes
    see it at once (the file's mtime, and the MEMORY checksum of what
    they read), resets within a millisecond (docs/security.md)."""
    a, _ = two_files
    with Snapshot.load(a) as s, Vm.restore(s, "map", resettable=True) as vm:
        time.sleep(0.02)
        flip_code_page(a)
        refused(s, s.to_bytes, vm.reset)


def test_restores_see_a_page_rewritten_in_place_within_a_millisecond(two_files):
    a, _ = two_files
    with Snapshot.load(a) as s:
        Vm.restore(s, "copy").close()
        time.sleep(0.02)
        flip_code_page(a)
        time.sleep(0.002)  # past the interval of the restores' statx
        refused(s, lambda: Vm.restore(s, "copy"))


def test_a_file_renamed_over_the_path_leaves_the_snapshot_whole(two_files, tmp_path):
    """docs/security.md: a replaced path does not affect a loaded snapshot."""
    a, b = two_files
    with Snapshot.load(a) as s:
        before = s.to_bytes()
        tmp = tmp_path / "other"
        tmp.write_bytes(b.read_bytes())
        os.replace(tmp, a)  # a new file at the path; the loaded one is unlinked
        assert not s.damaged
        assert s.to_bytes() == before
        with Vm.restore(s, "map") as vm:
            assert vm.call(b"still the old file") == b"still the old file"
        s.save(a)  # save() to the path it was loaded from: a rename over it too
        assert not s.damaged and s.to_bytes() == before
