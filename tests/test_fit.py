"""A pool populates its new shells with the pages of its latest copy restore
(zigsrc/fit.zig), on real KVM: the shell the refill makes after a copy
restore holds exactly the snapshot's present pages, zero-filled, before any
restore into it; after a map restore (which replaces shell memory) it holds
none. Residency is counted with mincore on an idle shell taken through the
benchmark export group; nothing here is timed."""

from __future__ import annotations

from test_stop_races import _script

from kvmlab import PoolConfig, RestorePool, Snapshot
from kvmlab.bench._native import idle_shell_resident_pages
from kvmlab.bench.settle import wait_settled


def test_shells_after_a_copy_restore_hold_its_pages_and_after_a_map_restore_none(kvm, service_file):
    with Snapshot.load(service_file) as snap, RestorePool(snap.config, PoolConfig(min_size=1, max_size=2)) as pool:
        assert idle_shell_resident_pages(pool) == 0  # made before any restore: nothing to learn yet
        # Every restore below takes a shell made before it (a settled pool):
        # the shell it leaves idle is made after it, from what it taught.
        wait_settled(pool)
        with pool.restore_snapshot(snap, "copy") as vm:
            assert vm.call(b"ping") == b"ping"
        assert idle_shell_resident_pages(pool) == snap.present_pages
        # The populated shell serves the next copy restore like any other.
        wait_settled(pool)
        with pool.restore_snapshot(snap, "copy") as vm:
            assert vm.restore_timing["hit"] and vm.call(b"again") == b"again"
        wait_settled(pool)
        with pool.restore_snapshot(snap, "map") as vm:
            assert vm.call(b"mapped") == b"mapped"
        assert idle_shell_resident_pages(pool) == 0
        assert pool.stats().failures == 0


def test_a_resettable_restore_into_a_shell_made_without_the_dirty_log_resets_exactly(kvm, service_file):
    """After plain restores the pool makes shells without KVM's dirty log; a
    resettable restore into one turns it on, so a reset still finds every page
    the guest wrote (the service guest's memory is back to the snapshot's)."""
    with Snapshot.load(service_file) as snap, RestorePool(snap.config, PoolConfig(min_size=1, max_size=2)) as pool:
        wait_settled(pool)
        pool.restore_snapshot(snap, "copy").release()  # plain: the next shell is made unlogged
        wait_settled(pool)
        with pool.restore_snapshot(snap, "copy", resettable=True) as vm:
            assert vm.restore_timing["hit"]
            before = vm.read_memory(0, snap.memory_bytes)
            assert vm.call(b"x" * 3000) == b"x" * 3000  # the guest writes its buffers
            assert vm.read_memory(0, snap.memory_bytes) != before
            vm.reset()
            assert vm.read_memory(0, snap.memory_bytes) == before
            assert vm.call(b"again") == b"again"


CTRL_C_WARM = """
    import signal, tempfile, threading, time
    from pathlib import Path
    from kvmlab import PoolConfig, RestorePool, Snapshot
    from kvmlab.bench.harness import make_snapshot
    _, path, _ = make_snapshot("dense", 256, Path(tempfile.mkdtemp()), dense_fraction=1.0)
    snap = Snapshot.load(path)
    pool = RestorePool(snap.config, PoolConfig(min_size=0, max_size=8))
    pool.restore_snapshot(snap, "copy").release()  # teaches it: each new shell gets ~256 MiB resident
    t = time.monotonic(); pool.warm(1); one_s = time.monotonic() - t
    main = threading.main_thread().ident
    def send():
        global sent
        sent = time.monotonic()
        signal.pthread_kill(main, signal.SIGINT)
    threading.Timer(one_s / 2, send).start()  # inside the first shell of the warm below
    try:
        pool.warm(8)
        print("not interrupted")
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - sent:.3f} s, {pool.idle_count()} idle, one shell {one_s:.3f} s")
    pool.close()
    snap.close()
"""


def test_ctrl_c_stops_a_warm_whose_shells_are_populated():
    """Ctrl-C during warm() of a pool that populates 256 MiB per shell ends
    it inside the shell being made (populate stops between 4 MiB chunks, warm
    makes no further shell): KeyboardInterrupt well within one shell's time,
    not after all 7 shells."""
    p = _script(CTRL_C_WARM)
    assert p.returncode == 0, p.stderr[-3000:]
    words = p.stdout.split()
    assert words[0] == "interrupted", p.stdout
    after_s, idle, one_s = float(words[2]), int(words[4]), float(words[-2])
    assert idle <= 2, p.stdout  # the one warmed before, and at most the one being made
    assert after_s < one_s / 2, p.stdout
