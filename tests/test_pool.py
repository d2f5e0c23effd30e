"""RestorePool on real KVM: configuration, warming, exact stats, the three
restore entry points and their strategies (exact continuation of the counter
guest), failure rollback, max_in_use, timings, and the service guest.

Threaded and stress tests live in test_pool_concurrency.py (which imports the
helpers below). Nothing asserts absolute durations: the pool's background work
(refill, destruction) is awaited by polling ``stats()`` with a bounded wait,
and "no caller waited for a shell" is proven with the hit counters.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CFG, fd_count
from snapshot_codec import crc32c  # the tests' one CRC32C
from kvmlab import (
    ClosedError,
    ConfigError,
    KvmlabError,
    PoolConfig,
    PooledRestoreVm,
    PoolExhaustedError,
    PoolStats,
    RestorePool,
    RestoreTiming,
    Snapshot,
    SnapshotError,
    Vm,
    VmConfig,
    timings_frame,
)

pytestmark = pytest.mark.kvm

COUNTER_ARGS = {"steps": 20, "checkpoint_at": 10}
#: Upper bound for background work (refill, destruction) to catch up. Generous:
#: the machine is shared; a VM that ran takes ~11-25 ms to destroy here.
SETTLE_S = 60.0
ROOT = Path(__file__).resolve().parents[1]


# -- helpers (also used by test_pool_concurrency.py) ---------------------------------------


def mem_hash(vm) -> str:
    return hashlib.sha256(vm.read_memory(0, vm.memory_bytes)).hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()




def accounted(s: PoolStats) -> bool:
    """Every live shell is idle, in use or queued for destruction."""
    return s.created - s.destroyed == s.idle + s.in_use + s.pending_destroy


def settled(s: PoolStats) -> bool:
    """No background work left: refilled to min_size, nothing queued or in flight."""
    return s.creating == 0 and s.pending_destroy == 0 and s.idle >= s.min_size and accounted(s)


def wait_stats(pool: RestorePool, pred=settled, timeout_s: float = SETTLE_S) -> PoolStats:
    """Polls ``pool.stats()`` until ``pred`` holds (bounded); returns those stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = pool.stats()
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool did not reach the expected state within {timeout_s} s: {s}")
        time.sleep(0.005)


def counts(s: PoolStats, *names: str) -> dict[str, int]:
    return {n: getattr(s, n) for n in names}


@dataclass
class CounterRef:
    """The counter guest stopped at its checkpoint, and what the original did next."""

    snap: Snapshot  # in memory (Vm.snapshot)
    path: Path  # the same snapshot saved to a file
    after: str  # console of the original from the checkpoint to exit
    end_hash: str  # sha256 of the original's whole memory at exit
    cfg: VmConfig


def make_counter_ref(tmp_dir: Path, cfg: VmConfig = CFG, args=COUNTER_ARGS) -> CounterRef:
    with Vm.boot("counter", cfg, args=args) as vm:
        r = vm.run()
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", args["checkpoint_at"])
        snap = vm.snapshot()
        path = snap.save(tmp_dir / f"counter-{cfg.memory_mib}m-{cfg.vcpus}c.kvmsnap")
        end = vm.run_until_exit(timeout_s=30)
        assert (end.reason, end.exit_code) == ("exit", 0)
        return CounterRef(snap, path, end.console, mem_hash(vm), cfg)


def check_continuation(rvm, ref: CounterRef) -> None:
    """The restored VM continues exactly as the original did after the checkpoint."""
    r = rvm.run_until_exit(timeout_s=30)
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.console == ref.after
    assert mem_hash(rvm) == ref.end_hash


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> CounterRef:
    ref = make_counter_ref(tmp_path_factory.mktemp("pool"))
    yield ref
    ref.snap.close()


@pytest.fixture
def loaded(ref):
    """The reference snapshot loaded from its file (file-backed: 'map' works)."""
    with Snapshot.load(ref.path) as s:
        yield s


# -- PoolConfig and shapes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"max_size": 0},
        {"min_size": 0, "max_size": 0},
        {"min_size": 3, "max_size": 2},
        {"min_size": -1},
        {"max_size": -4},
        {"max_size": 257},
        {"max_in_use": 0},
        {"max_in_use": -1},
        {"min_size": "1"},
        {"min_size": 1.0},
        {"max_size": True},
        {"max_size": None},
        {"max_in_use": 2.5},
        {"max_in_use": "4"},
    ],
)
def test_pool_config_invalid(kw):
    with pytest.raises(ConfigError):
        PoolConfig(**kw)


def test_pool_config_messages():
    for kw, check, argument in [
        ({"min_size": 0, "max_size": 0}, "argument_range", "PoolConfig max_size"),
        ({"min_size": 3, "max_size": 2}, "argument_range", "PoolConfig min_size"),
        ({"min_size": "1"}, "argument_type", "PoolConfig min_size"),
    ]:
        with pytest.raises(ConfigError) as e:
            PoolConfig(**kw)
        assert (e.value.check, e.value.argument) == (check, argument), kw
    assert PoolConfig(min_size=0, max_size=1, max_in_use=None).max_in_use is None
    assert PoolConfig(min_size=256, max_size=256).max_size == 256


def test_pool_constructor_argument_types():
    with pytest.raises(ConfigError) as e:
        RestorePool({"memory_mib": 16}, PoolConfig(min_size=0))  # type: ignore[arg-type]
    assert (e.value.check, e.value.argument) == ("argument_type", "vm_config")
    with pytest.raises(ConfigError) as e:
        RestorePool(CFG, {"min_size": 0})  # type: ignore[arg-type]
    assert (e.value.check, e.value.argument) == ("argument_type", "pool_config")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 64 MiB / 1 vCPU and a 16 MiB / 2 vCPU counter snapshot."""
    d = tmp_path_factory.mktemp("shapes")
    out = {}
    for cfg in (VmConfig(memory_mib=64), VmConfig(memory_mib=16, vcpus=2)):
        with Vm.boot("counter", cfg, args={"steps": 4, "checkpoint_at": 2}) as vm:
            assert vm.run().reason == "checkpoint"
            snap = vm.snapshot()
            snap.save(d / f"{cfg.memory_mib}-{cfg.vcpus}.kvmsnap")
            out[(cfg.memory_mib, cfg.vcpus)] = (snap, d / f"{cfg.memory_mib}-{cfg.vcpus}.kvmsnap")
    yield out
    for snap, _ in out.values():
        snap.close()


@pytest.mark.parametrize(
    "snap_shape,pool_cfg,words",
    [
        ((64, 1), VmConfig(memory_mib=128), ("64 MiB", "128 MiB")),
        ((16, 2), VmConfig(memory_mib=16, vcpus=1), ("2 vCPU", "1 vCPU")),
    ],
    ids=["64MiB-into-128MiB", "2vcpu-into-1vcpu"],
)
@pytest.mark.parametrize("how", ["snapshot", "file-map", "bytes", "parts"])
def test_shape_mismatch_names_both_shapes(shapes, snap_shape, pool_cfg, words, how):
    snap, path = shapes[snap_shape]
    with RestorePool(pool_cfg, PoolConfig(min_size=1, max_size=2)) as pool:
        before = pool.stats()
        with pytest.raises(SnapshotError) as e:
            if how == "snapshot":
                pool.restore_snapshot(snap)
            elif how == "file-map":
                with Snapshot.load(path) as s:
                    pool.restore_snapshot(s, "map")
            elif how == "bytes":
                pool.restore_from_bytes(snap.to_bytes())
            else:
                pool.restore(snap.memory, snap.vcpu_state)
        assert e.value.check == "shape"
        msg = str(e.value)  # the message names both shapes: what this test is about
        if how != "parts":  # parts: the memory buffer's size is checked first
            assert words[0] in msg and words[1] in msg, msg
        # Rejected before any shell was touched: nothing counted, nothing lost.
        assert pool.stats() == before
        assert before.idle == 1 and before.in_use == 0 and before.failures == 0


def test_parts_memory_size_mismatch(ref):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        with pytest.raises(SnapshotError) as e:
            pool.restore(bytes(4096), ref.snap.vcpu_state)
        assert e.value.check == "shape"
        with pytest.raises(SnapshotError) as e:
            pool.restore(ref.snap.memory, b"not a state blob")
        assert e.value.check == "state_size"
        with pytest.raises(SnapshotError) as e:
            pool.restore(12345, ref.snap.vcpu_state)  # type: ignore[arg-type]
        assert e.value.check == "argument_type"
        assert pool.stats().restores == 0 and pool.stats().in_use == 0


# -- warming --------------------------------------------------------------------------------


def test_creation_warms_min_size_and_warm_caps_at_max_size():
    with RestorePool(CFG, PoolConfig(min_size=2, max_size=4)) as pool:
        # Warmed in the constructor, before it returns.
        s = pool.stats()
        assert counts(s, "idle", "created", "in_use", "min_size", "max_size") == {
            "idle": 2, "created": 2, "in_use": 0, "min_size": 2, "max_size": 4,
        }
        assert pool.idle_count() == 2
        pool.warm(0)
        pool.warm(1)  # below what is idle: nothing to do
        assert pool.stats().created == 2
        pool.warm(3)
        assert pool.idle_count() >= 3
        pool.warm(100)  # capped at max_size
        s = pool.stats()
        assert (s.idle, s.created) == (4, 4)
        pool.warm(4)
        assert pool.stats().created == 4
        for bad in (-1, "2", 2.0, True, None):
            with pytest.raises(ConfigError):
                pool.warm(bad)  # type: ignore[arg-type]
        assert "idle=4" in repr(pool)
    # Closed: idle_count never raises, everything else says ClosedError.
    assert pool.closed and pool.idle_count() == 0
    assert "closed" in repr(pool)
    for call in (pool.stats, lambda: pool.warm(1), pool.timings):
        with pytest.raises(ClosedError):
            call()
    pool.close()  # idempotent


def test_min_size_zero_pool_starts_empty():
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=3)) as pool:
        s = pool.stats()
        assert (s.idle, s.created, s.creating) == (0, 0, 0)
        pool.warm(2)
        assert pool.stats().idle == 2


def test_idle_count_never_raises_while_closing_concurrently():
    pool = RestorePool(CFG, PoolConfig(min_size=1, max_size=2))
    seen = []
    after_close = []
    errors = []
    stop = threading.Event()
    closed = threading.Event()

    def poll():
        try:
            while not stop.is_set():
                (after_close if closed.is_set() else seen).append(pool.idle_count())
        except BaseException as e:  # noqa: BLE001 - a raise is exactly what this test looks for
            errors.append(e)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.05)
    pool.close()
    closed.set()
    time.sleep(0.02)
    stop.set()
    t.join(10)
    assert errors == []
    assert seen and set(seen) <= {0, 1, 2}
    assert after_close and set(after_close) == {0}
    assert pool.idle_count() == 0


# -- exact stats -----------------------------------------------------------------------------


def test_stats_exact_after_warm_restore_release(ref):
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=3)) as pool:
        s = pool.stats()
        assert isinstance(s, PoolStats)
        assert counts(s, "idle", "in_use", "created", "destroyed", "hits", "misses", "failures", "restores", "releases") == {
            "idle": 1, "in_use": 0, "created": 1, "destroyed": 0, "hits": 0, "misses": 0, "failures": 0,
            "restores": 0, "releases": 0,
        }
        assert (s.max_in_use, s.creating, s.pending_destroy) == (None, 0, 0)

        pool.warm(3)
        a = pool.restore_snapshot(ref.snap)
        # 2 idle left >= min_size: the worker has nothing to do, so this is exact.
        assert counts(pool.stats(), "idle", "in_use", "created", "hits", "misses", "restores") == {
            "idle": 2, "in_use": 1, "created": 3, "hits": 1, "misses": 0, "restores": 1,
        }
        b = pool.restore_snapshot(ref.snap)
        c = pool.restore_snapshot(ref.snap)
        assert all(v.restore_timing["hit"] == 1 for v in (a, b, c))
        # Drained: the worker refills to min_size (1).
        s = wait_stats(pool)
        assert counts(s, "idle", "in_use", "created", "destroyed", "hits", "misses", "restores", "releases") == {
            "idle": 1, "in_use": 3, "created": 4, "destroyed": 0, "hits": 3, "misses": 0, "restores": 3,
            "releases": 0,
        }
        d = pool.restore_snapshot(ref.snap)
        assert d.restore_timing["hit"] == 1
        s = wait_stats(pool)
        assert counts(s, "idle", "in_use", "created", "hits", "restores") == {
            "idle": 1, "in_use": 4, "created": 5, "hits": 4, "restores": 4,
        }
        check_continuation(a, ref)
        a.release()
        a.release()  # idempotent: counted once
        assert counts(pool.stats(), "in_use", "releases") == {"in_use": 3, "releases": 1}
        for v in (b, c, d):
            v.release()
        s = wait_stats(pool)  # destroyed catches up off this thread
        assert counts(s, "idle", "in_use", "created", "destroyed", "hits", "misses", "failures", "restores", "releases") == {
            "idle": 1, "in_use": 0, "created": 5, "destroyed": 4, "hits": 4, "misses": 0, "failures": 0,
            "restores": 4, "releases": 4,
        }


def test_stats_exact_misses_on_an_empty_pool(ref):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool:
        a = pool.restore_snapshot(ref.snap)
        b = pool.restore_snapshot(ref.snap)
        assert (a.restore_timing["hit"], b.restore_timing["hit"]) == (0, 0)
        s = pool.stats()
        assert counts(s, "idle", "in_use", "created", "hits", "misses", "restores", "failures") == {
            "idle": 0, "in_use": 2, "created": 2, "hits": 0, "misses": 2, "restores": 2, "failures": 0,
        }
        a.release()
        b.release()
        s = wait_stats(pool)
        assert counts(s, "idle", "in_use", "created", "destroyed", "releases") == {
            "idle": 0, "in_use": 0, "created": 2, "destroyed": 2, "releases": 2,
        }


# -- restore entry points and strategies: exact continuation ------------------------------


RESTORES = [
    # (id, how, strategy, mapped)
    ("snapshot-auto", "snapshot", "auto", 0),
    ("snapshot-copy", "snapshot", "copy", 0),
    ("file-auto", "file", "auto", 1),
    ("file-copy", "file", "copy", 0),
    ("file-map", "file", "map", 1),
    ("bytes", "bytes", None, 0),
    ("file-bytes", "file-bytes", None, 0),
    ("parts", "parts", None, 0),
    ("file-parts", "file-parts", None, 0),
]


def restore_with(pool: RestorePool, how: str, strategy, snap: Snapshot, loaded: Snapshot, path: Path):
    if how == "snapshot":
        return pool.restore_snapshot(snap, strategy)
    if how == "file":
        return pool.restore_snapshot(loaded, strategy)
    if how == "bytes":
        return pool.restore_from_bytes(snap.to_bytes())
    if how == "file-bytes":  # the file's own (full, unpacked) layout
        return pool.restore_from_bytes(Path(path).read_bytes())
    if how == "parts":
        return pool.restore(snap.memory, snap.vcpu_state)
    if how == "file-parts":
        return pool.restore(loaded.memory, loaded.vcpu_state)
    raise AssertionError(how)


@pytest.mark.parametrize("how,strategy,mapped", [r[1:] for r in RESTORES], ids=[r[0] for r in RESTORES])
def test_restore_exact_continuation(ref, loaded, how, strategy, mapped):
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        for round_ in range(2):  # a hit, then whatever the worker refilled
            with restore_with(pool, how, strategy, ref.snap, loaded, ref.path) as rvm:
                assert isinstance(rvm, PooledRestoreVm)
                assert rvm.config == CFG
                assert rvm.restore_timing["mapped"] == mapped
                if round_ == 0:
                    assert rvm.restore_timing["hit"] == 1
                check_continuation(rvm, ref)
            wait_stats(pool)
        t = pool.timings()
        assert [x.strategy for x in t] == ["map" if mapped else "copy"] * 2
        s = wait_stats(pool)
        assert (s.restores, s.releases, s.failures, s.in_use) == (2, 2, 0, 0)


def test_restore_guest_names(ref, loaded):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool:
        with pool.restore_snapshot(ref.snap) as a, pool.restore_snapshot(loaded, "map") as b:
            assert a.guest == b.guest == "counter"


def test_restore_exact_continuation_two_vcpus(tmp_path):
    cfg = VmConfig(memory_mib=16, vcpus=2)
    r2 = make_counter_ref(tmp_path, cfg, {"steps": 8, "checkpoint_at": 4})
    try:
        with RestorePool(cfg, PoolConfig(min_size=1, max_size=2)) as pool, Snapshot.load(r2.path) as s:
            for strategy in ("copy", "map"):
                with pool.restore_snapshot(s, strategy) as rvm:
                    check_continuation(rvm, r2)
    finally:
        r2.snap.close()


def test_restored_vms_are_independent(ref, loaded):
    """Two VMs restored from one mapped file do not see each other's writes."""
    with RestorePool(CFG, PoolConfig(min_size=2, max_size=2)) as pool:
        a = pool.restore_snapshot(loaded, "map")
        b = pool.restore_snapshot(loaded, "map")
        a.write_memory(0x400000, b"\xff" * 4096)  # vCPU 0's counter region
        assert b.read_memory(0x400000, 4096) == ref.snap.memory[0x400000 : 0x401000].tobytes()
        check_continuation(b, ref)
        assert a.run_until_exit().console != ref.after  # a's history was changed
        a.release()
        b.release()


def test_map_restore_leaves_the_file_unchanged(ref, tmp_path):
    # A dense case too: memtouch over 512 pages (2 MiB) between checkpoints.
    with Vm.boot("memtouch", CFG, args={"pages": 512, "rounds": 3}) as vm:
        assert vm.run().reason == "checkpoint"
        mt_path = vm.snapshot().save(tmp_path / "memtouch.kvmsnap")
    paths = [ref.path, mt_path]
    before = [file_hash(p) for p in paths]
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        for p in paths:
            with Snapshot.load(p) as s:
                mem_before = hashlib.sha256(s.memory).hexdigest()
                for _ in range(2):
                    with pool.restore_snapshot(s, "map") as rvm:
                        assert rvm.restore_timing["mapped"] == 1
                        r = rvm.run_until_exit(timeout_s=30)  # the guest writes its memory
                        assert (r.reason, r.exit_code) == ("exit", 0)
                        rvm.write_memory(0x400000, b"host write" * 1000)  # so does the host
                        rvm.write_memory(CFG.memory_bytes - 4096, b"\x5a" * 4096)
                        assert rvm.read_memory(0x400000, 10) == b"host write"
                assert hashlib.sha256(s.memory).hexdigest() == mem_before
    assert [file_hash(p) for p in paths] == before


# -- failures: rollback, pool stays usable ---------------------------------------------------


def corruptions(data: bytes) -> list[bytes]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a checksummed section
    bad_magic = b"X" + data[1:]
    return [bytes(flipped), bad_magic, data[: len(data) // 3], data + b"\0" * 7, b"", b"KVMLSNAP"]


def test_corrupt_bytes_raise_and_roll_back(ref):
    good = ref.snap.to_bytes()
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        held = pool.restore_from_bytes(good)
        before = wait_stats(pool)
        assert before.in_use == 1
        for bad in corruptions(good):
            with pytest.raises(SnapshotError):
                pool.restore_from_bytes(bad)
            assert pool.stats() == before
        with pytest.raises(SnapshotError) as e:
            pool.restore_from_bytes("not bytes")  # type: ignore[arg-type]
        assert e.value.check == "argument_type"
        # Still usable.
        with pool.restore_from_bytes(good) as rvm:
            check_continuation(rvm, ref)
        check_continuation(held, ref)
        held.release()
        s = wait_stats(pool)
        assert (s.in_use, s.failures, s.restores, s.releases) == (0, 0, 2, 2)


def test_bad_restore_arguments_change_nothing(ref, loaded):
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        before = pool.stats()
        with pytest.raises(ConfigError) as e:
            pool.restore_snapshot(ref.snap, "map")  # in-memory snapshot: no file to map
        assert e.value.check == "strategy_needs_file"
        with pytest.raises(ConfigError) as e:
            pool.restore_snapshot(loaded, "mmap")
        assert (e.value.check, e.value.argument) == ("argument_value", "strategy")
        with pytest.raises(SnapshotError) as e:
            pool.restore_snapshot(ref.snap.to_bytes())  # type: ignore[arg-type]
        assert e.value.check == "argument_type"
        for bad in (0, -1, "1", float("nan"), True):
            with pytest.raises(ConfigError):
                pool.restore_snapshot(loaded, timeout_s=bad)
        closed = Snapshot.from_bytes(ref.snap.to_bytes())
        closed.close()
        with pytest.raises(ClosedError):
            pool.restore_snapshot(closed)
        assert pool.stats() == before


SHELL_FAILURE_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    from kvmlab import KvmlabError, PoolConfig, RestorePool, Snapshot, Vm, VmConfig

    snap = Snapshot.load(sys.argv[1])
    # Open /dev/kvm first (once per process): this test is about shells.
    with Vm.boot("hello", VmConfig(memory_mib=8)) as vm:
        vm.run()
    pool = RestorePool(VmConfig(memory_mib=16), PoolConfig(min_size=0, max_size=2))

    def fds():
        return sorted(int(x) for x in os.listdir("/proc/self/fd"))

    def lowest_free():
        used = set(fds())  # includes the listing's own (now closed) descriptor
        i = 0
        while i in used:
            i += 1
        return i

    out = {"attempts": []}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A shell needs a VM fd and one fd per vCPU. Allow 0, then 1 new descriptor:
    # KVM_CREATE_VM fails, then KVM_CREATE_VCPU fails (a half-built shell).
    for extra in (0, 1):
        before = fds()
        base = lowest_free() - 1  # lowest_free saw the listing's own fd
        resource.setrlimit(resource.RLIMIT_NOFILE, (base + extra, hard))
        try:
            vm = pool.restore_snapshot(snap)
            err = None
        except KvmlabError as e:
            err = (type(e).__name__, str(e))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        s = pool.stats()
        out["attempts"].append({"error": err, "in_use": s.in_use, "failures": s.failures,
                                "restores": s.restores, "misses": s.misses, "created": s.created,
                                "fds_same": fds() == before})
        if err is None:
            vm.release()
    with pool.restore_snapshot(snap) as vm:
        r = vm.run_until_exit(timeout_s=30)
        out["after"] = [r.reason, r.exit_code, r.console]
    s = pool.stats()
    out["final"] = {"in_use": s.in_use, "failures": s.failures, "restores": s.restores}
    pool.close()
    print(json.dumps(out))
    """
)


def test_shell_creation_failure_rolls_back(ref):
    """In a subprocess: RLIMIT_NOFILE so low that a shell cannot be created."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(
        [sys.executable, "-c", SHELL_FAILURE_SCRIPT, str(ref.path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    for i, (a, ioctl) in enumerate(zip(out["attempts"], ("KVM_CREATE_VM", "KVM_CREATE_VCPU")), start=1):
        assert a["error"] is not None, a  # the shell could not be created
        assert a["error"][0] == "KvmError" and ioctl in a["error"][1], a
        # Rolled back: nothing in use, the failure counted, no restore, no fd left over.
        assert (a["in_use"], a["failures"], a["restores"], a["created"]) == (0, i, 0, 0), a
        assert a["misses"] == i and a["fds_same"], a
    assert out["after"][:2] == ["exit", 0] and out["after"][2] == ref.after
    assert out["final"] == {"in_use": 0, "failures": 2, "restores": 1}


from test_faults import FAULT_SITE, SITES as FAULT_SITES  # noqa: E402  (names from kvmlab_testing.h)


@pytest.fixture
def fault_inject():
    """The core's test switch (kvmlab_fault_inject, testing group): fail one shell-creation step."""
    from kvmlab import _ffi

    def arm(site: str, after: int = 0) -> None:
        _ffi.check(_ffi.testing.kvmlab_fault_inject(FAULT_SITE[site], after))

    yield arm
    _ffi.testing.kvmlab_fault_inject(FAULT_SITE["none"], 0)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_injected_shell_failures_roll_back(ref, fault_inject, vcpus, tmp_path):
    """Every step of on-demand shell creation failing: the restore raises,
    accounting is rolled back, nothing leaks, and the pool keeps working."""
    cfg = VmConfig(memory_mib=16, vcpus=vcpus)
    r = ref if vcpus == 1 else make_counter_ref(tmp_path, cfg, {"steps": 4, "checkpoint_at": 2})
    with Vm.boot("hello", VmConfig(memory_mib=8)) as vm:  # /dev/kvm open before counting fds
        vm.run()
    with RestorePool(cfg, PoolConfig(min_size=0, max_size=2)) as pool:
        base = fd_count()
        # Pooled shells have no PIT (the snapshot's was never programmed), so
        # the pit step is not on this path (test_faults fails it under Vm.boot).
        sites = [site for site in FAULT_SITES if site != "pit"]
        for n, site in enumerate(sites, start=1):
            # For 2 vCPUs, the per-vCPU steps fail on the second vCPU (a half-built shell).
            fault_inject(site, after=1 if vcpus == 2 and site.startswith(("vcpu", "cpuid")) else 0)
            with pytest.raises(KvmlabError) as e:
                pool.restore_snapshot(r.snap)
            assert e.value.check == "fault_injected" and f"'{site}'" in str(e.value), site  # only the message names the step
            s = pool.stats()
            assert (s.in_use, s.failures, s.restores, s.created, s.misses) == (0, n, 0, 0, n), (site, s)
            assert fd_count() == base, site
        with pool.restore_snapshot(r.snap) as rvm:
            check_continuation(rvm, r)
        s = wait_stats(pool)
        assert (s.in_use, s.failures, s.restores, s.releases) == (0, len(sites), 1, 1)
    if r is not ref:
        r.snap.close()


def test_injected_failure_in_warm_and_in_the_worker(ref, fault_inject):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=3)) as pool:
        fault_inject("irqchip", after=1)  # the second shell of warm() fails
        with pytest.raises(KvmlabError) as e:
            pool.warm(3)
        assert e.value.check == "fault_injected" and "'irqchip'" in str(e.value)
        s = pool.stats()
        assert (s.idle, s.created, s.in_use) == (1, 1, 0)
        pool.warm(3)  # fine again
        assert pool.stats().idle == 3
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        fault_inject("vcpu")  # the worker's refill after the take fails once...
        a = pool.restore_snapshot(ref.snap)
        s = wait_stats(pool, timeout_s=SETTLE_S)  # ...then it retries and refills
        assert s.idle == 1 and s.failures >= 1 and s.in_use == 1
        check_continuation(a, ref)
        a.release()


# -- max_in_use -------------------------------------------------------------------------------


def test_max_in_use_exhausted_then_waits(ref):
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2, max_in_use=1)) as pool:
        assert pool.stats().max_in_use == 1
        a = pool.restore_snapshot(ref.snap)
        with pytest.raises(PoolExhaustedError) as e:
            pool.restore_snapshot(ref.snap)
        assert e.value.check == "pool_exhausted"
        with pytest.raises(PoolExhaustedError) as e:
            pool.restore_snapshot(ref.snap, timeout_s=0.1)
        assert e.value.check == "pool_wait_timeout"
        with pytest.raises(PoolExhaustedError):
            pool.restore_from_bytes(ref.snap.to_bytes())
        s = pool.stats()
        assert (s.in_use, s.restores, s.failures) == (1, 1, 0)

        got = []

        def waiter():
            try:
                got.append(pool.restore_snapshot(ref.snap, timeout_s=30))
            except Exception as e:  # noqa: BLE001 - reported below
                got.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)  # usually waiting by now; the test holds either way
        assert not got
        check_continuation(a, ref)
        a.release()
        t.join(30)
        assert not t.is_alive()
        assert len(got) == 1 and isinstance(got[0], PooledRestoreVm), got
        check_continuation(got[0], ref)
        got[0].release()
        s = wait_stats(pool)
        assert (s.in_use, s.restores, s.releases, s.failures) == (0, 2, 2, 0)


def test_close_wakes_a_restore_waiting_for_room(ref):
    """close() does not wait for a waiting restore's timeout_s: the waiter
    gets ClosedError, the VM that was out stays usable."""
    pool = RestorePool(CFG, PoolConfig(min_size=1, max_size=2, max_in_use=1))
    a = pool.restore_snapshot(ref.snap)
    got = []

    def waiter():
        try:
            got.append(pool.restore_snapshot(ref.snap, timeout_s=3600))
        except Exception as e:  # noqa: BLE001
            got.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    pool.close()
    t.join(20)  # would be an hour before the fix
    assert not t.is_alive()
    assert len(got) == 1 and isinstance(got[0], ClosedError), got
    check_continuation(a, ref)
    a.release()


# -- reset and reuse -----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["copy", "map"])
def test_reset_on_release_parks_and_reuses(ref, loaded, strategy):
    """reset_on_release: the release hands the VM to the pool's worker, which
    resets it to the snapshot and parks it; the next restore of the same
    snapshot takes it back (strategy "reuse", no shell) and it continues
    exactly like the original. Another snapshot does not get it."""
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        rvm = pool.restore_snapshot(loaded, strategy, reset_on_release=True)
        assert rvm.run_until_exit(timeout_s=30).exit_code == 0  # dirties memory, leaves the checkpoint
        rvm.release()
        s = wait_stats(pool, lambda s: s.parked == 1 and s.in_use == 0 and s.resets == 1)
        assert (s.reuses, s.releases) == (0, 1)
        again = pool.restore_snapshot(loaded, strategy, reset_on_release=True)
        s = pool.stats()
        assert (s.reuses, s.parked, s.in_use) == (1, 0, 1)
        assert pool.timings()[-1].strategy == "reuse" and again.restore_timing["hit"] == 1
        check_continuation(again, ref)
        again.release()
        wait_stats(pool, lambda s: s.parked == 1 and s.resets == 2)
        with Snapshot.load(ref.path) as other:  # same file, another Snapshot: not the parked one's
            fresh = pool.restore_snapshot(other, strategy, reset_on_release=True)
            assert pool.stats().reuses == 1 and pool.timings()[-1].strategy == strategy
            fresh.release()


def test_pooled_vm_reset_in_place(ref, loaded):
    """A pooled VM restored resettable=True goes back to the snapshot with
    reset(): the same continuation again."""
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        with pool.restore_snapshot(loaded, "map", resettable=True) as rvm:
            for _ in range(2):
                check_continuation(rvm, ref)
                assert rvm.reset().dirty_pages > 0


# -- timings -------------------------------------------------------------------------------


def test_timings_records(ref, loaded):
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=3)) as pool:
        assert pool.timings() == []
        a = pool.restore_snapshot(ref.snap)  # hit, copy
        b = pool.restore_snapshot(loaded, "map")  # usually a miss (min_size 1)
        c = pool.restore_from_bytes(ref.snap.to_bytes())
        check_continuation(a, ref)
        check_continuation(c, ref)
        t = pool.timings()
        assert [x.seq for x in t] == [0, 1, 2]
        assert [x.strategy for x in t] == ["copy", "map", "copy"]
        assert [x.hit for x in t] == [bool(v.restore_timing["hit"]) for v in (a, b, c)]
        assert t[0].hit is True
        for x, v in zip(t, (a, b, c)):
            assert isinstance(x, RestoreTiming)
            for f in ("acquire_ns", "memory_ns", "vcpu_ns", "devices_ns", "total_ns", "memory_bytes"):
                assert type(getattr(x, f)) is int and getattr(x, f) >= 0, (f, x)
            assert x.memory_bytes == CFG.memory_bytes
            assert x.memory_ns > 0 and x.vcpu_ns > 0 and x.total_ns > 0
            assert x.total_ns >= x.acquire_ns + x.memory_ns + x.vcpu_ns + x.devices_ns
            # The VM's own copy of its record.
            rt = v.restore_timing
            assert set(rt) >= {"acquire_ns", "memory_ns", "vcpu_ns", "devices_ns", "total_ns", "mapped", "hit", "seq"}
            assert rt["seq"] == x.seq
            assert (rt["memory_ns"], rt["vcpu_ns"], rt["devices_ns"]) == (x.memory_ns, x.vcpu_ns, x.devices_ns)
            assert rt["total_ns"] >= rt["memory_ns"] + rt["vcpu_ns"] + rt["devices_ns"]
        # first_run_ns: set by the VM's first run only.
        assert t[0].first_run_ns and t[2].first_run_ns and t[1].first_run_ns is None
        first = t[0].first_run_ns
        assert isinstance(first, int) and first > 0
        b.run(timeout_s=30)
        t2 = pool.timings()
        assert t2[1].first_run_ns and t2[0].first_run_ns == first  # later runs do not overwrite
        assert pool.timings(last=1) == [t2[-1]]
        assert pool.timings(last=0) == []
        for v in (a, b, c):
            v.release()

        df = timings_frame(pool.timings())
        pd = pytest.importorskip("pandas")
        assert isinstance(df, pd.DataFrame)
        assert list(df.columns) == [
            "seq", "acquire_ns", "memory_ns", "vcpu_ns", "devices_ns", "total_ns", "first_run_ns",
            "memory_bytes", "hit", "strategy",
        ]
        assert len(df) == 3 and list(df["strategy"]) == ["copy", "map", "copy"]
        assert (df["total_ns"] >= df["memory_ns"] + df["vcpu_ns"] + df["devices_ns"]).all()


def test_the_core_records_the_first_run_of_every_hand_out(service_snap):
    """first_run_ns of a prepared take comes from the VM's first call, recorded
    by the core (no Python step); a VM released unrun leaves its record None,
    and the warmup's runs count for no record."""
    def take():
        deadline = time.monotonic() + 30
        while pool.prepared_count(service_snap) < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        vm = pool.restore_snapshot(service_snap)
        assert vm.restore_timing["strategy"] == "prepared"
        return vm

    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool:
        pool.prepare(service_snap, 1, warmup=lambda vm: vm.call(b"warm"))
        take().release()  # unrun
        with take() as vm:
            assert vm.call(b"x") == b"x" and vm.call(b"y") == b"y"
        unrun, ran = pool.timings()[-2:]
        assert (unrun.strategy, ran.strategy) == ("prepared", "prepared")
        assert unrun.first_run_ns is None
        assert isinstance(ran.first_run_ns, int) and ran.first_run_ns > 0


def test_timings_frame_empty():
    pd = pytest.importorskip("pandas")
    df = timings_frame([])
    assert isinstance(df, pd.DataFrame) and len(df) == 0 and "total_ns" in df.columns


# -- the service guest ---------------------------------------------------------------------


def test_service_guest_calls(service_snap):
    assert crc32c(b"123456789") == 0xE3069283
    with RestorePool(CFG, PoolConfig(min_size=2, max_size=2)) as pool:
        with pool.restore_snapshot(service_snap) as rvm, pool.restore_from_bytes(service_snap.to_bytes()) as other:
            assert rvm.call(b"hello kvmlab") == b"hello kvmlab"
            assert rvm.call(b"abcdef", op="reverse") == b"fedcba"
            data = os.urandom(4000)
            assert rvm.call(data, op="crc32c") == struct.pack("<I", crc32c(data))
            assert rvm.call(b"123456789", op="crc32c") == struct.pack("<I", 0xE3069283)
            assert rvm.call(b"") == b""
            # A second VM from the same snapshot starts from the same state.
            assert other.call(b"x" * 4096) == b"x" * 4096
            assert rvm.call(b"again") == b"again"
        t = pool.timings()
        assert len(t) == 2 and all(x.first_run_ns for x in t)


def test_a_pooled_vm_sets_every_slot_of_a_vm_handle(service_snap):
    """PooledRestoreVm sets _VmHandle's slots itself (no base __init__ on the
    hot path): a slot added there and forgotten here would be unset."""
    from kvmlab.vm import _VmHandle

    slots = [s for s in _VmHandle.__slots__ if s != "__weakref__"]
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        pool.prepare(service_snap, 1)
        for vm in (pool.restore_snapshot(service_snap), pool.restore_snapshot(service_snap)):  # prepared, then restored
            with vm:
                unset = [s for s in slots + list(type(vm).__slots__) if not hasattr(vm, s)]
                assert unset == []
                assert vm.guest == service_snap.guest
                assert vm.call(b"slots") == b"slots"


def test_a_released_wrapper_is_never_handed_out_again(service_snap):
    """Restores fill spare wrappers made ahead: a released VM's wrapper stays
    closed and is not one of them (a holder of it can never reach a later VM)."""
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool:
        pool.prepare(service_snap, 1)
        old = [pool.restore_snapshot(service_snap, "copy") for _ in range(2)]  # prepared, then a shell
        for vm in old:
            vm.release()
        for _ in range(12):  # past the spares made at the releases
            with pool.restore_snapshot(service_snap, "copy") as vm:
                assert all(vm is not o for o in old) and vm.call(b"new") == b"new"
        assert all(o.closed for o in old)
        with pytest.raises(ClosedError) as e:
            old[0].call(b"x")
        assert e.value.check == "vm_closed"
