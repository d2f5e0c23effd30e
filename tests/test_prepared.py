"""RestorePool.prepare (issue 14 items 1-2): prepared VMs are taken by
restore_snapshot (strategy "prepared"), kept prepared on release, given up by
prepare(snap, 0), and are exact: the snapshot's memory byte for byte, the
registers, console and answers of a fresh restore, with or without a warmup,
copy and map, 1 and 2 vCPUs, and still after 100 take/release cycles.
Real KVM; the bookkeeping itself is unit-tested in zigsrc/pool_test.zig."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import CFG
from kvmlab import (
    ClosedError,
    ConfigError,
    GuestCrashError,
    PoolConfig,
    PoolExhaustedError,
    PrepareError,
    RestorePool,
    Snapshot,
    SnapshotError,
    Vm,
    VmConfig,
)
from test_pool import check_continuation, make_counter_ref, wait_stats

READY_S = 20.0


def wait_prepared(pool: RestorePool, snap: Snapshot, n: int) -> None:
    """Until ``n`` VMs of ``snap`` are ready (a release is reset off the caller's thread)."""
    deadline = time.monotonic() + READY_S
    while pool.prepared_count(snap) < n:
        assert time.monotonic() < deadline, f"{n} prepared VMs not ready within {READY_S} s: {pool.stats()}"
        time.sleep(0.002)


def ping(vm) -> None:
    """A warmup: runs the service guest once (and dirties its buffers)."""
    assert vm.call(b"warm up " * 64, op="reverse") == (b"warm up " * 64)[::-1]


def counter_to_exit(vm) -> None:
    """A warmup that runs the counter guest to its end: the reset must undo all of it."""
    assert vm.run_until_exit(timeout_s=30).reason == "exit"


@pytest.fixture(scope="module")
def counter2(tmp_path_factory):
    ref = make_counter_ref(tmp_path_factory.mktemp("prepared"), VmConfig(memory_mib=16, vcpus=2), {"steps": 8, "checkpoint_at": 4})
    yield ref
    ref.snap.close()


def memory_of(snap: Snapshot) -> bytes:
    return bytes(snap.memory)


def assert_same_as_snapshot(vm, snap: Snapshot, image: bytes) -> None:
    """Memory byte for byte, and every vCPU's registers as a fresh restore has them."""
    assert vm.read_memory(0, len(image)) == image
    with Vm.restore(snap) as fresh:
        for i in range(snap.config.vcpus):
            assert vm.registers(i) == fresh.registers(i)


def assert_answers_as_fresh(vm, snap: Snapshot) -> None:
    with Vm.restore(snap) as fresh:
        for op, payload in (("echo", b"first"), ("reverse", b"abcdef" * 100), ("crc32c", b"x" * 4000)):
            assert vm.call(payload, op=op) == fresh.call(payload, op=op)


# -- taking, releasing, giving up -------------------------------------------------------------


def test_prepare_take_release_give_up(service_snap):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=4)) as pool:
        pool.prepare(service_snap, 2)
        assert pool.prepared_count(service_snap) == 2
        assert pool.stats().prepared == 2
        vm = pool.restore_snapshot(service_snap)
        t = vm.restore_timing
        assert (t["strategy"], t["hit"]) == ("prepared", 1)
        assert [r.strategy for r in pool.timings() if r.seq == t["seq"]] == ["prepared"]
        assert vm.call(b"taken") == b"taken"
        destroyed = pool.stats().destroyed
        vm.release()
        # The released VM is reset and kept (no destroy); the refill may have made one more meanwhile.
        s = wait_stats(pool, lambda s: s.resets >= 1 and s.prepared >= 2 and s.in_use == 0 and s.pending_destroy == 0)
        assert s.destroyed == destroyed
        pool.prepare(service_snap, 0)
        assert pool.prepared_count(service_snap) == 0
        assert pool.stats().prepared == 0
        with pool.restore_snapshot(service_snap) as vm:
            assert vm.restore_timing["strategy"] == "copy"


def test_a_take_checks_its_arguments_and_a_closed_snapshot(service_snap, service_file):
    """The take has no guard of its own: it still says what every restore says."""
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool, Snapshot.load(service_file) as fs:
        pool.prepare(fs, 1)
        with pytest.raises(ConfigError) as e:
            pool.restore_snapshot(fs, strategy="bogus")
        assert e.value.check == "argument_value"
        assert pool.prepared_count(fs) == 1  # nothing was taken
        fs.close()
        with pytest.raises(ClosedError) as e:
            pool.restore_snapshot(fs)
        assert e.value.check == "snapshot_closed"
        pool.close()
        with pytest.raises(ClosedError) as e:
            pool.restore_snapshot(service_snap)
        assert e.value.check == "pool_closed"


def test_prepared_takes_racing_close_get_a_vm_or_closed(service_snap):
    """Takes on several threads while close() runs: each gets a VM (which works
    after the close) or ClosedError, nothing else; everything is freed."""
    pool = RestorePool(CFG, PoolConfig(min_size=0, max_size=4))
    pool.prepare(service_snap, 3)
    outcomes: list[object] = []
    go = threading.Barrier(4)

    def taker() -> None:
        go.wait()
        for _ in range(100_000):  # bounded; the close ends it long before
            try:
                vm = pool.restore_snapshot(service_snap)
            except ClosedError as e:
                outcomes.append(e.check)
                return
            except BaseException as e:  # noqa: BLE001 - the test reports it
                outcomes.append(e)
                return
            with vm:
                outcomes.append(vm.call(b"race"))

    threads = [threading.Thread(target=taker) for _ in range(3)]
    for t in threads:
        t.start()
    go.wait()
    time.sleep(0.05)
    pool.close()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert {o for o in outcomes} <= {b"race", "pool_closed"}, outcomes
    assert outcomes.count("pool_closed") == 3  # every thread ended on the close
    assert outcomes.count(b"race") > 0
    with pytest.raises(ClosedError):
        pool.stats()


def test_prepared_snapshots_share_max_size(service_snap, service_file):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=3)) as pool, Snapshot.load(service_file) as fs:
        pool.prepare(service_snap, 2)
        with pytest.raises(PoolExhaustedError):
            pool.prepare(fs, 2)
        pool.prepare(fs, 1)
        assert (pool.prepared_count(service_snap), pool.prepared_count(fs), pool.stats().prepared) == (2, 1, 3)
        with pool.restore_snapshot(fs) as vm:
            assert (vm.restore_timing["strategy"], vm.restore_timing["mapped"]) == ("prepared", 1)


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["plain", "warmup"])
@pytest.mark.parametrize("strategy", ["copy", "map"])
def test_prepared_service_vm_is_exact(service_snap, service_file, strategy, warm):
    image = memory_of(service_snap)
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool, Snapshot.load(service_file) as fs:
        pool.prepare(fs, 1, warmup=ping if warm else None, strategy=strategy)
        with pool.restore_snapshot(fs) as vm:
            assert vm.restore_timing["strategy"] == "prepared"
            assert vm.restore_timing["mapped"] == (strategy == "map")
            assert_same_as_snapshot(vm, fs, image)
            assert_answers_as_fresh(vm, fs)


@pytest.mark.parametrize("warm", [False, True], ids=["plain", "warmup"])
@pytest.mark.parametrize("strategy", ["copy", "map"])
def test_prepared_two_vcpu_vm_is_exact(counter2, strategy, warm):
    image = memory_of(counter2.snap)
    with RestorePool(counter2.cfg, PoolConfig(min_size=0, max_size=2)) as pool, Snapshot.load(counter2.path) as fs:
        pool.prepare(fs, 1, warmup=counter_to_exit if warm else None, strategy=strategy)
        with pool.restore_snapshot(fs) as vm:
            assert vm.restore_timing["strategy"] == "prepared"
            assert_same_as_snapshot(vm, fs, image)
            check_continuation(vm, counter2)  # the same console and final memory as the original


@pytest.mark.parametrize("strategy", ["copy", "map"])
def test_prepared_vm_is_exact_after_100_take_release_cycles(service_snap, service_file, strategy):
    image = memory_of(service_snap)
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool, Snapshot.load(service_file) as fs:
        pool.prepare(fs, 1, warmup=ping, strategy=strategy)
        for i in range(100):
            wait_prepared(pool, fs, 1)
            with pool.restore_snapshot(fs) as vm:
                assert vm.restore_timing["strategy"] == "prepared"
                assert vm.call(b"cycle %d " % i * 50, op="reverse") == (b"cycle %d " % i * 50)[::-1]
                vm.write_memory(0x200000 + 4096 * (i % 16), b"host %d" % i)  # host writes are undone too
        wait_prepared(pool, fs, 1)
        s = pool.stats()
        assert (s.failures, s.destroyed) == (0, 0), s  # every cycle was a reset, none a new VM
        with pool.restore_snapshot(fs) as vm:
            assert vm.restore_timing["strategy"] == "prepared"
            assert_same_as_snapshot(vm, fs, image)
            assert_answers_as_fresh(vm, fs)


# -- warmups that fail, bad arguments ---------------------------------------------------------


def crash_guest(vm) -> None:
    """Overwrites the code the guest resumes at with ud2: the next call crashes it."""
    vm.write_memory(vm.registers(0)["rip"], b"\x0f\x0b" * 8)
    vm.call(b"boom")


@pytest.mark.parametrize(
    "warmup, cause",
    [(lambda vm: 1 / 0, ZeroDivisionError), (crash_guest, GuestCrashError)],
    ids=["raises", "crashes"],
)
def test_a_failing_warmup_is_a_prepare_error_and_nothing_stays(service_snap, warmup, cause):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=3)) as pool:
        with pytest.raises(PrepareError) as info:
            pool.prepare(service_snap, 2, warmup=warmup)
        assert info.value.check == "warmup"
        assert isinstance(info.value.__cause__, cause)
        s = wait_stats(pool, lambda s: s.pending_destroy == 0)
        assert (pool.prepared_count(service_snap), s.prepared, s.in_use, s.parked) == (0, 0, 0, 0)
        assert s.created == s.destroyed  # the VM it ran in is gone
        with pool.restore_snapshot(service_snap) as vm:  # the pool still works
            assert vm.restore_timing["strategy"] == "copy"
            assert vm.call(b"fine") == b"fine"


def test_the_warmer_keeps_the_target_in_the_background(service_snap):
    warmed = []
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=3)) as pool:
        pool.prepare(service_snap, 1, warmup=lambda vm: warmed.append(vm.call(b"w")))
        assert warmed == [b"w"]
        held = pool.restore_snapshot(service_snap)
        wait_prepared(pool, service_snap, 1)  # made by the warmer thread while one is out
        assert len(warmed) == 2
        held.release()
    assert pool.closed  # close() stopped the warmer


def test_close_stops_a_warmup_that_runs_forever(service_snap):
    """close() must not wait on a warmup's endless run: it stops the run (the
    guest spins at its resume point), prepare() raises ClosedError, and the
    pool is gone with nothing left in use."""
    started = threading.Event()
    outcome: list[BaseException | None] = []

    def spin(vm) -> None:
        vm.write_memory(vm.registers(0)["rip"], b"\xeb\xfe")  # jmp $
        started.set()
        vm.run(timeout_s=None)

    def prepare() -> None:
        try:
            pool.prepare(service_snap, 1, warmup=spin)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - checked below
            outcome.append(e)

    pool = RestorePool(CFG, PoolConfig(min_size=0, max_size=2))
    t = threading.Thread(target=prepare)
    try:
        t.start()
        assert started.wait(30)
        time.sleep(0.2)  # well inside the endless run
        t0 = time.monotonic()
        pool.close()
        assert time.monotonic() - t0 < 10
    finally:
        pool.close()  # a no-op once closed; frees the pool if an assertion above failed
    t.join(10)
    assert not t.is_alive()
    assert isinstance(outcome[0], ClosedError) and outcome[0].check == "pool_closed", outcome


def test_prepare_argument_errors(service_snap):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=2)) as pool:
        with pytest.raises(ConfigError) as e:
            pool.prepare(service_snap, 3)
        assert e.value.check == "argument_range"
        with pytest.raises(ConfigError) as e:
            pool.prepare(service_snap, 1, warmup="ping")
        assert e.value.check == "argument_type"
        with pytest.raises(ConfigError):
            pool.prepare(service_snap, 1, strategy="prepared")  # chosen by the pool only
        with pytest.raises(SnapshotError):
            pool.prepare(b"not a snapshot", 1)
        assert pool.stats().prepared == 0
    with RestorePool(VmConfig(memory_mib=32), PoolConfig(min_size=0, max_size=2)) as other:
        with pytest.raises(SnapshotError) as e:
            other.prepare(service_snap, 1)
        assert e.value.check == "shape"
    with pytest.raises(ClosedError):
        pool.prepare(service_snap, 1)
    assert pool.prepared_count(service_snap) == 0
