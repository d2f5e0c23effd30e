"""The Python API under hostile use (issue 17): multi-step operations are one
operation under the VM's lock (item 3), bad arguments and host limits give a
KvmlabError with a machine-readable ``check`` id (item 8), and os.fork() with
live pools leaves a child that can use kvmlab and exits cleanly (item 9)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import CFG


def run_script(body: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`body` in a fresh interpreter (faulthandler ends a hang with stacks)."""
    code = f"import faulthandler\nfaulthandler.dump_traceback_later({timeout_s - 10}, exit=True)\n"
    return subprocess.run(
        [sys.executable, "-c", code + textwrap.dedent(body), *args], capture_output=True, text=True, timeout=timeout_s
    )


# -- item 3: call() is one operation ----------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize("make", ["vm", "pooled"])
def test_concurrent_calls_on_one_vm_each_get_their_own_answer(service_snap, make):
    """Two threads x 150 calls on one service VM: each answer is the caller's
    own and none times out (call() was four separately locked steps: answers
    were swapped and requests lost)."""
    from kvmlab import PoolConfig, RestorePool, Vm

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as much as possible
    pool = RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) if make == "pooled" else None
    try:
        vm = pool.restore_snapshot(service_snap) if pool else Vm.restore(service_snap, "copy")
        with vm:
            failures: list[object] = []

            def caller(k: int) -> None:
                for i in range(150):
                    msg = f"thread {k} call {i}".encode()
                    try:
                        got = vm.call(msg, timeout_s=30)
                    except Exception as e:  # noqa: BLE001 - counted, reported below
                        failures.append(e)
                        continue
                    if got != msg:
                        failures.append((msg, got))

            threads = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
            assert failures == []
            assert vm.call(b"still serving") == b"still serving"
    finally:
        sys.setswitchinterval(switch)
        if pool:
            pool.close()


# -- item 8: bad arguments and host limits ---------------------------------------------------


def raises_check(check: str, call) -> None:
    """``call()`` raises a KvmlabError whose ``check`` id is ``check``."""
    from kvmlab import KvmlabError

    with pytest.raises(KvmlabError) as e:
        call()
    assert getattr(e.value, "check", None) == check, (e.value, getattr(e.value, "check", None))


BAD_TIMEOUTS = [(1e12, "argument_range"), (1e300, "argument_range"), (float("nan"), "argument_range"),
                (-1, "argument_range"), (0, "argument_range"), (-float("inf"), "argument_range"),
                ("2", "argument_type"), (True, "argument_type")]  # fmt: skip


@pytest.mark.kvm
@pytest.mark.parametrize("timeout_s,check", BAD_TIMEOUTS, ids=[repr(t) for t, _ in BAD_TIMEOUTS])
def test_bad_timeouts_give_a_config_error(service_snap, timeout_s, check):
    from kvmlab import PoolConfig, RestorePool, Vm

    with Vm.restore(service_snap, "copy", resettable=True) as vm:
        raises_check(check, lambda: vm.run(timeout_s))
        raises_check(check, lambda: vm.run_until_exit(timeout_s))
        raises_check(check, lambda: vm.call(b"x", timeout_s=timeout_s))
        raises_check(check, lambda: vm.reset_loop([b"x"], run_timeout_s=timeout_s))
        assert vm.call(b"unharmed") == b"unharmed"
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        raises_check(check, lambda: pool.restore_snapshot(service_snap, timeout_s=timeout_s))
        assert pool.stats().restores == 0


@pytest.mark.parametrize(
    "kw", [{"max_in_use": 2**32}, {"max_in_use": 2**64}, {"min_size": 2**40}, {"max_size": 2**32}],
    ids=["max_in_use=2**32", "max_in_use=2**64", "min_size=2**40", "max_size=2**32"],
)
def test_out_of_range_pool_config_ints(kw):
    from kvmlab import PoolConfig

    raises_check("argument_range", lambda: PoolConfig(**kw))


@pytest.mark.kvm
def test_pool_argument_ints(service_snap):
    from kvmlab import PoolConfig, RestorePool

    with RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        raises_check("argument_type", lambda: pool.timings(last="2"))
        raises_check("argument_range", lambda: pool.timings(last=-1))
        raises_check("argument_type", lambda: pool.warm(1.0))
        assert pool.timings(last=2**62) == []


@pytest.mark.kvm
def test_save_and_load_refuse_a_path_with_a_nul_byte(service_snap, tmp_path):
    from kvmlab import Snapshot

    raises_check("argument_path", lambda: service_snap.save(tmp_path / "x.kvmsnap\0evil"))
    raises_check("argument_path", lambda: service_snap.save(""))
    raises_check("argument_type", lambda: service_snap.save(12))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even x.kvmsnap
    raises_check("argument_path", lambda: Snapshot.load(str(tmp_path / "x\0y")))


@pytest.mark.kvm
def test_write_memory_with_a_strided_buffer(service_snap):
    from kvmlab import Vm

    with Vm.restore(service_snap, "copy") as vm:
        raises_check("argument_buffer", lambda: vm.write_memory(0x900000, memoryview(b"abcdef")[::2]))
        raises_check("argument_type", lambda: vm.write_memory(0x900000, "text"))
        vm.write_memory(0x900000, bytes(memoryview(b"abcdef")[::2]))  # what the message says to do
        assert vm.read_memory(0x900000, 3) == b"ace"


@pytest.mark.kvm
def test_fork_many_bad_threads(service_file):
    from kvmlab import Snapshot, fork_many

    with Snapshot.load(service_file) as snap:
        raises_check("argument_range", lambda: fork_many(snap, 2, threads=-1))
        raises_check("argument_range", lambda: fork_many(snap, 2, threads=0))
        raises_check("argument_type", lambda: fork_many(snap, 2, threads="2"))
        raises_check("argument_range", lambda: fork_many(snap, 2, threads=10**6))


@pytest.mark.kvm
def test_fork_many_when_no_thread_can_start(service_file):
    """A host limit on threads (here: address space too small for a thread
    stack) is a KvmlabMemoryError with check "host_threads", not RuntimeError."""
    p = run_script(
        """
        import resource, sys, threading
        from kvmlab import KvmlabMemoryError, Snapshot, fork_many
        snap = Snapshot.load(sys.argv[1])
        with open("/proc/self/status") as f:
            vm_kb = next(int(l.split()[1]) for l in f if l.startswith("VmSize:"))
        threading.stack_size(1 << 30)  # every new thread wants 1 GiB of address space
        resource.setrlimit(resource.RLIMIT_AS, ((vm_kb << 10) + (512 << 20), resource.RLIM_INFINITY))
        try:
            fork_many(snap, 4, threads=2, progress=False)
        except KvmlabMemoryError as e:
            print("check", e.check)
        """,
        str(service_file),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "check host_threads", (p.stdout, p.stderr[-2000:])


# -- item 9: os.fork() with live pools -----------------------------------------------------


@pytest.mark.kvm
def test_a_forked_child_uses_kvmlab_and_exits_cleanly(service_file):
    """The child of os.fork() (multiprocessing's fork start method, Dask
    workers) inherits pools whose worker threads do not exist in it: it
    restores from its own new pool and exits 0 (it died with SIGABRT at exit
    when the inherited pool's cleanup joined the missing threads)."""
    p = run_script(
        """
        import os, sys
        from kvmlab import ClosedError, KvmlabError, PoolConfig, RestorePool, Snapshot, Vm
        snap = Snapshot.load(sys.argv[1])
        pool = RestorePool(snap.config, PoolConfig(min_size=2, max_size=4))
        held = pool.restore_snapshot(snap)            # a VM out of the pool at fork time
        assert held.call(b"parent") == b"parent"
        # faulthandler's watchdog thread would hang the child at exit (a
        # Python matter, not kvmlab's): off around the fork, subprocess.run's
        # timeout bounds the test meanwhile.
        faulthandler.cancel_dump_traceback_later()
        pid = os.fork()
        if pid == 0:
            try:
                assert pool.closed                      # the inherited pool is forgotten ...
                try:
                    pool.restore_snapshot(snap)
                    raise AssertionError("an inherited pool restored")
                except ClosedError:
                    pass
                try:                                    # KVM binds a VM to its creator's process
                    held.call(b"inherited")
                    raise AssertionError("an inherited VM ran in the child")
                except KvmlabError:
                    pass
                held.release()                          # ... and so are its VMs (no call into it)
                with RestorePool(snap.config, PoolConfig(min_size=1, max_size=2)) as mine:
                    with mine.restore_snapshot(snap) as vm:
                        assert vm.call(b"child") == b"child"
                with Vm.restore(snap, "map") as vm:
                    assert vm.call(b"child map") == b"child map"
            except BaseException as e:
                print("child failed:", repr(e), flush=True)
                os._exit(3)
            sys.exit(0)                                 # normal interpreter exit: finalizers run
        _, status = os.waitpid(pid, 0)
        assert held.call(b"parent again") == b"parent again"   # the parent's pool is untouched
        held.release()
        pool.close()
        print("child status", os.waitstatus_to_exitcode(status))
        """,
        str(service_file),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "child status 0" in p.stdout, (p.stdout, p.stderr[-3000:])


# -- item 10: documented promises --------------------------------------------------------


@pytest.mark.kvm
def test_restore_timing_has_every_documented_key(service_snap, service_file):
    from kvmlab import PoolConfig, RestorePool, Snapshot
    from test_pool import wait_stats

    keys = {"acquire_ns", "memory_ns", "vcpu_ns", "devices_ns", "total_ns", "hit", "strategy", "mapped",
            "memory_bytes", "seq"}  # fmt: skip
    with RestorePool(CFG, PoolConfig(min_size=1, max_size=2)) as pool, Snapshot.load(service_file) as fs:
        for snap, strategy in ((service_snap, "copy"), (fs, "map"), (fs, "copy")):
            with pool.restore_snapshot(snap, strategy) as vm:
                t = vm.restore_timing
                assert set(t) == keys
                assert (t["strategy"], t["memory_bytes"]) == (strategy, CFG.memory_bytes)
                assert [r.strategy for r in pool.timings() if r.seq == t["seq"]] == [strategy]
        with pool.restore_snapshot(fs, reset_on_release=True) as vm:
            vm.call(b"dirty")
        wait_stats(pool, lambda s: s.parked == 1)
        with pool.restore_snapshot(fs, reset_on_release=True) as vm:
            t = vm.restore_timing
            assert (t["strategy"], t["memory_bytes"]) == ("reuse", CFG.memory_bytes)
            assert [r.strategy for r in pool.timings() if r.seq == t["seq"]] == ["reuse"]


@pytest.mark.kvm
def test_run_until_exit_is_one_operation():
    """Two threads run one guest with 40 checkpoints to its exit: one of them
    gets the whole output in order, the other the exit at once (the runs of
    two callers interleaved, each getting every other round, before)."""
    from kvmlab import Vm

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with Vm.boot("memtouch", CFG, args={"pages": 1, "rounds": 40}) as vm:
            results: list = []
            threads = [threading.Thread(target=lambda: results.append(vm.run_until_exit(timeout_s=60))) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert len(results) == 2 and all(r.reason == "exit" for r in results)
            whole, rest = sorted(results, key=lambda r: -len(r.console))
            rounds = [int(x) for x in re.findall(r"round (\d+) pages", whole.console)]
            assert rounds == sorted(rounds) and len(rounds) >= 39, whole.console[-500:]
            assert rest.console == ""
    finally:
        sys.setswitchinterval(switch)


@pytest.mark.kvm
def test_pool_restore_parts_with_a_strided_buffer(service_snap):
    from kvmlab import PoolConfig, RestorePool, SnapshotError

    with RestorePool(CFG, PoolConfig(min_size=0, max_size=1)) as pool:
        state = service_snap.vcpu_state
        with pytest.raises(SnapshotError) as e:
            pool.restore(memoryview(bytes(2 * CFG.memory_bytes))[::2], state)
        assert e.value.check == "argument_buffer"
        with pytest.raises(SnapshotError) as e:
            pool.restore(12345, state)
        assert e.value.check == "argument_type"
        assert pool.stats().restores == 0


@pytest.mark.kvm
def test_every_bad_argument_has_a_check_id(service_snap, service_file):
    """Each argument check of the API raises ConfigError with a check id."""
    from kvmlab import PoolConfig, RestorePool, Snapshot, Vm, VmConfig, fork_many

    cases = [
        ("argument_type", lambda: VmConfig(memory_mib="16")),
        ("argument_range", lambda: VmConfig(memory_mib=6)),
        ("argument_range", lambda: VmConfig(memory_mib=15)),
        ("argument_range", lambda: VmConfig(vcpus=9)),
        ("argument_type", lambda: RestorePool({"memory_mib": 16})),
        ("argument_type", lambda: RestorePool(CFG, {"min_size": 0})),
        ("argument_type", lambda: Vm.boot("hello", {"memory_mib": 16})),
        ("argument_value", lambda: Vm.boot("hello", CFG, cpl=1)),
        ("argument_type", lambda: Vm.restore(b"not a snapshot")),
        ("argument_value", lambda: Vm.restore(service_snap, "sideways")),
        ("argument_type", lambda: fork_many(b"not a snapshot", 1)),
        ("strategy_needs_file", lambda: fork_many(service_snap, 1)),  # not file-backed: the core's id for this refusal
    ]
    with Snapshot.load(service_file) as fs:
        cases += [("argument_range", lambda: fork_many(fs, 0)), ("argument_type", lambda: fork_many(fs, 1.5))]
        with Vm.restore(service_snap, "copy", resettable=True) as vm:
            cases += [
                ("argument_value", lambda: vm.call(b"x", op="shout")),
                ("argument_range", lambda: vm.call(b"x" * 4097)),
                ("argument_type", lambda: vm.call("text")),
                ("argument_value", lambda: vm.reset("sideways")),
                ("argument_range", lambda: vm.registers(1)),
                ("argument_type", lambda: vm.registers("0")),
                ("argument_type", lambda: vm.read_memory(0.5, 1)),
            ]
            for check, call in cases:
                raises_check(check, call)
            assert vm.call(b"fine") == b"fine"


@pytest.mark.kvm
@pytest.mark.parametrize("stop", ["interrupt", "close"])
def test_one_operation_runs_stop_at_interrupt_and_close(stop):
    """run_until_exit() and call() hold the VM's lock across runs, yet
    interrupt() and close() from another thread end them at once."""
    import time

    from conftest import LOOP_FOREVER
    from kvmlab import GuestTimeoutError, KvmlabError, Vm

    for name, call in (("run_until_exit", lambda vm: vm.run_until_exit(None)),
                       ("call", lambda vm: vm.call(b"x", timeout_s=None))):  # fmt: skip
        vm = Vm.boot(LOOP_FOREVER, CFG)
        raised: list[BaseException] = []

        def run(vm=vm, call=call) -> None:
            try:
                call(vm)
            except KvmlabError as e:
                raised.append(e)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)  # the guest is spinning inside the operation
        getattr(vm, stop)()
        t.join(10)
        assert not t.is_alive(), name
        assert len(raised) == 1 and isinstance(raised[0], GuestTimeoutError), (name, raised)
        if name == "run_until_exit":
            assert raised[0].check == "run_stopped"
        vm.close()


@pytest.mark.kvm
def test_forkset_close_when_no_thread_can_start(service_file):
    """ForkSet.close() frees every VM even when it cannot start its closing
    threads (a host limit): RuntimeError escaped and the VMs stayed open."""
    p = run_script(
        """
        import os, resource, sys, threading
        from kvmlab import Snapshot, Vm, fork_many
        snap = Snapshot.load(sys.argv[1])
        Vm.restore(snap, "map").close()  # /dev/kvm is opened once per process
        fds = len(os.listdir("/proc/self/fd"))
        vms = fork_many(snap, 4, threads=2, progress=False)
        assert len(os.listdir("/proc/self/fd")) > fds
        with open("/proc/self/status") as f:
            vm_kb = next(int(l.split()[1]) for l in f if l.startswith("VmSize:"))
        threading.stack_size(1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, ((vm_kb << 10) + (512 << 20), resource.RLIM_INFINITY))
        vms.close()
        print("fds back", len(os.listdir("/proc/self/fd")) == fds)
        """,
        str(service_file),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "fds back True", (p.stdout, p.stderr[-2000:])
