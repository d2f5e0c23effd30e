"""Dirty-page reset: a restored VM goes back to exactly its snapshot, any
number of times, and the native reset loop runs many inputs."""

from __future__ import annotations

import hashlib

import pytest

from conftest import CFG
import kvmlab
from kvmlab import BusyError, ConfigError, Snapshot, Vm

pytestmark = pytest.mark.kvm



def _mem_hash(vm) -> str:
    return hashlib.sha256(vm.read_memory(0, vm.memory_bytes)).hexdigest()


def _regs_without_flags(vm) -> dict[str, int]:
    return vm.registers(0)


@pytest.fixture(scope="module")
def memtouch_snap(tmp_path_factory):
    """memtouch stopped after round 1 of 3: later rounds write 64 pages each."""
    vm = Vm.boot("memtouch", CFG, args={"pages": 64, "rounds": 3})
    assert vm.run().reason == "checkpoint"
    snap = vm.snapshot()
    path = tmp_path_factory.mktemp("reset") / "memtouch.kvmsnap"
    snap.save(path)
    vm.close()
    yield snap, path
    snap.close()


@pytest.mark.parametrize("strategy,mode", [("copy", "copy"), ("map", "copy"), ("map", "drop")])
def test_reset_returns_to_the_snapshot_every_time(memtouch_snap, strategy, mode):
    snap, path = memtouch_snap
    src = Snapshot.load(path) if strategy == "map" else snap
    golden = hashlib.sha256(bytes(snap.memory)).hexdigest()
    with Vm.restore(src, strategy, resettable=True) as vm:
        regs0 = vm.registers(0)
        assert _mem_hash(vm) == golden
        first = vm.run_until_exit()
        assert first.lines[-1] == "done"
        assert _mem_hash(vm) != golden  # the guest did write
        for cycle in range(5):
            t = vm.reset(mode)
            assert t.dirty_pages >= 64, t  # each round rewrites the same 64 pages
            assert _mem_hash(vm) == golden, f"memory differs after reset {cycle}"
            assert vm.registers(0) == regs0
            again = vm.run_until_exit()
            assert again.console == first.console and again.exit_code == first.exit_code
        assert len(vm.reset_timings()) == 5
        assert all(isinstance(x.total_ns, int) and x.total_ns > 0 for x in vm.reset_timings())
    if src is not snap:
        src.close()


def test_reset_undoes_host_writes_and_random_guest_pages(memtouch_snap):
    snap, _ = memtouch_snap
    golden = hashlib.sha256(bytes(snap.memory)).hexdigest()
    import random

    rnd = random.Random(1234)
    with Vm.restore(snap, resettable=True) as vm:
        for _ in range(10):
            for _ in range(rnd.randint(1, 20)):
                gpa = rnd.randrange(0, vm.memory_bytes - 4096)
                vm.write_memory(gpa, rnd.randbytes(rnd.randint(1, 4096)))
            if rnd.random() < 0.5:
                vm.run_until_exit()
            vm.reset()
            assert _mem_hash(vm) == golden


def test_reset_needs_a_resettable_vm(memtouch_snap):
    snap, _ = memtouch_snap
    with Vm.restore(snap) as vm:
        with pytest.raises(BusyError) as e:
            vm.reset()
        assert e.value.check == "not_resettable"
    with Vm.restore(snap, resettable=True) as vm:
        with pytest.raises(ConfigError):
            vm.reset("drop")  # drop needs a map restore
        with pytest.raises(ConfigError):
            vm.reset("sideways")


def test_reset_loop_runs_inputs_natively(memtouch_snap):
    snap, _ = memtouch_snap
    with Vm.restore(snap, resettable=True) as vm:
        expected = vm.run()  # round 2 then checkpoint
        vm.reset()
        inputs = [i.to_bytes(8, "little") for i in range(50)]
        results = vm.reset_loop(inputs, input_gpa=0x900000, run_timeout_s=5)
        assert len(results) == 50
        for r in results:
            assert r.reason == expected.reason and r.checkpoint_tag == expected.checkpoint_tag
            assert not r.crashed and r.run_ns > 0 and r.reset_ns > 0 and r.dirty_pages >= 64
        # After the loop the VM is at the snapshot again.
        assert hashlib.sha256(vm.read_memory(0, vm.memory_bytes)).hexdigest() == hashlib.sha256(bytes(snap.memory)).hexdigest()


def test_reset_loop_survives_crashing_and_looping_guests():
    """A guest that crashes or loops on some inputs: the loop records it and goes on."""
    # Guest: reads a qword at 0x900000: 0 -> exit 0, 1 -> ud2 (crash), 2 -> loop forever.
    code = bytes.fromhex(
        "488b04250000900048"  # mov rax, [0x900000]; (next byte starts cmp)
        "83f801"  # cmp eax, 1
        "7410"  # je crash
        "83f802"  # cmp eax, 2
        "740d"  # je spin
        "66ba0005"  # mov dx, 0x500
        "31c0"  # xor eax, eax
        "ef"  # out dx, eax
        "ebfe"  # (not reached) jmp $
        "9090"
        "0f0b"  # crash: ud2
        "ebfe"  # spin: jmp $
    )
    vm0 = Vm.boot(code, CFG)
    snap = vm0.snapshot()  # at entry, before any run
    vm0.close()
    with Vm.restore(snap, resettable=True) as vm:
        inputs = [v.to_bytes(8, "little") for v in (0, 1, 2, 0)]
        results = vm.reset_loop(inputs, input_gpa=0x900000, run_timeout_s=0.2)
        assert [r.reason for r in results][0] == "exit"
        assert results[1].crashed
        assert results[2].reason == "timeout"
        assert results[3].reason == "exit" and not results[3].crashed
    snap.close()
