"""Vm.restore: exact continuation, independence of restored VMs, host checks.

THE test of the snapshot feature is ``test_exact_continuation``: a guest runs
to a checkpoint, is snapshotted, and the original runs to its end; every way of
restoring the snapshot (the object, copy and auto; its bytes; its file mapped
and copied; its file in a fresh process) then runs to its end with the same
console output, run results, registers and byte-identical guest memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import conftest
import snapshot_codec as C
from conftest import MiB, fd_count
from kvmlab import ConfigError, IncompatibleError, Snapshot, SnapshotError, Vm, VmConfig

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
MEMORY_MIB = 16

#: (guest, cpl) -> guest args. CPL0 is emulated on kvm_pvm hosts: few steps there.
GUESTS = {
    ("counter", 3): {"steps": 12, "checkpoint_at": 6, "region_pages": 4},
    ("counter", 0): {"steps": 4, "checkpoint_at": 2, "region_pages": 1},
    ("memtouch", 3): {"pages": 64, "rounds": 4},
    ("memtouch", 0): {"pages": 4, "rounds": 3},
}
CASES = [
    pytest.param(guest, cpl, vcpus, id=f"{guest}-cpl{cpl}-{vcpus}vcpu")
    for (guest, cpl) in GUESTS
    for vcpus in (1, 2)
]
VARIANTS = ["object-copy", "object-auto", "bytes", "file-map", "file-copy", "fresh-process"]


def sha256(b) -> str:
    return hashlib.sha256(b).hexdigest()


def run_to_end(vm) -> dict:
    """Runs through every checkpoint to the exit: each run's result, then the
    registers of every vCPU and a hash of all guest memory."""
    runs = []
    while True:
        r = vm.run(timeout_s=60)
        runs.append([r.reason, r.checkpoint_tag, r.exit_code, r.console])
        if r.reason == "exit":
            break
        assert r.reason == "checkpoint", runs
        assert len(runs) < 100
    return {
        "runs": runs,
        "regs": [vm.registers(i) for i in range(vm.vcpus)],
        "memory": sha256(vm.read_memory(0, vm.memory_bytes)),
    }


#: What the fresh process runs: load the file, restore (auto = map), run to the end.
FRESH = textwrap.dedent("""
    import hashlib, json, sys
    import kvmlab

    snap = kvmlab.Snapshot.load(sys.argv[1])
    vm = kvmlab.Vm.restore(snap)
    runs = []
    while True:
        r = vm.run(timeout_s=60)
        runs.append([r.reason, r.checkpoint_tag, r.exit_code, r.console])
        if r.reason != "checkpoint":
            break
    print(json.dumps({
        "runs": runs,
        "regs": [vm.registers(i) for i in range(vm.vcpus)],
        "memory": hashlib.sha256(vm.read_memory(0, vm.memory_bytes)).hexdigest(),
        "mapped": vm.restore_timing["mapped"],
        "pid": __import__("os").getpid(),
    }))
""")


def run_fresh_process(path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-c", FRESH, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Original:
    """A guest run to its first checkpoint, snapshotted there (object, bytes,
    file), then run on to its end."""

    def __init__(self, guest: str, cpl: int, vcpus: int, directory: Path) -> None:
        cfg = VmConfig(memory_mib=MEMORY_MIB, vcpus=vcpus)
        args = GUESTS[(guest, cpl)]
        with Vm.boot(guest, cfg, args=args, cpl=cpl) as vm:
            first = vm.run(timeout_s=60)
            assert first.reason == "checkpoint", first
            self.before = first.console
            self.snap = vm.snapshot()
            self.memory_at_checkpoint = sha256(vm.read_memory(0, vm.memory_bytes))
            self.expected = run_to_end(vm)
        self.bytes = self.snap.to_bytes()
        self.path = self.snap.save(directory / f"{guest}-cpl{cpl}-{vcpus}.kvmsnap")
        # The same guest straight through, never snapshotted: capturing did not
        # change the original's course.
        with Vm.boot(guest, cfg, args=args, cpl=cpl) as ref:
            straight = run_to_end(ref)
        assert "".join(r[3] for r in straight["runs"]) == self.before + "".join(r[3] for r in self.expected["runs"])
        assert straight["memory"] == self.expected["memory"]
        self.straight = straight


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    conftest._require_kvm()
    d = tmp_path_factory.mktemp("originals")
    cache: dict[tuple, Original] = {}

    def get(guest: str, cpl: int, vcpus: int) -> Original:
        key = (guest, cpl, vcpus)
        if key not in cache:
            cache[key] = Original(guest, cpl, vcpus, d)
        return cache[key]

    yield get
    for o in cache.values():
        o.snap.close()


def restore_variant(o: Original, variant: str):
    """(the restored VM, the snapshot object it came from, whether memory was mapped)."""
    if variant == "object-copy":
        return Vm.restore(o.snap, strategy="copy"), None, 0
    if variant == "object-auto":
        return Vm.restore(o.snap), None, 0  # in memory: auto is copy
    if variant == "bytes":
        s = Snapshot.from_bytes(o.bytes)
        return Vm.restore(s), s, 0
    if variant == "file-map":
        s = Snapshot.load(o.path)
        return Vm.restore(s, strategy="map"), s, 1
    if variant == "file-copy":
        s = Snapshot.load(o.path)
        return Vm.restore(s, strategy="copy"), s, 0
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("guest,cpl,vcpus", CASES)
def test_exact_continuation(originals, guest, cpl, vcpus, variant):
    o = originals(guest, cpl, vcpus)
    exp = o.expected
    # Sanity of the expectation itself: the guest's own end, after the checkpoint.
    assert exp["runs"][-1][0] == "exit" and exp["runs"][-1][2] == 0
    after = "".join(r[3] for r in exp["runs"])
    if guest == "counter":
        assert o.before.endswith(f"step {GUESTS[(guest, cpl)]['checkpoint_at']} checksum " + o.before[-19:])
        assert [f"done vcpu {v}" in after for v in range(vcpus)] == [True] * vcpus
    else:
        assert o.before.startswith("round 1 ") and after.endswith("done\n")
    assert exp["regs"][0]["cpl"] == cpl

    if variant == "fresh-process":
        got = run_fresh_process(o.path)
        assert got.pop("pid") != os.getpid()
        assert got.pop("mapped") == 1  # auto on a file: mapped
    else:
        vm, s, mapped = restore_variant(o, variant)
        try:
            assert vm.restore_timing["mapped"] == mapped
            assert (vm.guest, vm.vcpus, vm.memory_bytes) == (guest, vcpus, MEMORY_MIB * MiB)
            # Restored memory is the memory at the checkpoint, before running.
            assert sha256(vm.read_memory(0, vm.memory_bytes)) == o.memory_at_checkpoint
            got = run_to_end(vm)
        finally:
            vm.close()
            if s is not None:
                s.close()
    assert got["runs"] == exp["runs"]  # console, reasons, checkpoint tags, exit code
    assert got["regs"] == exp["regs"]
    assert got["memory"] == exp["memory"]  # all guest memory, byte for byte


def test_the_two_parts_the_pool_takes(originals):
    """snap.memory and snap.vcpu_state are all a restore needs: a pool restores
    from just those two (of a snapshot in memory and of a mapped file) and the
    guest continues exactly."""
    from kvmlab import PoolConfig, RestorePool

    o = originals("counter", 3, 2)
    with RestorePool(o.snap.config, PoolConfig(min_size=1, max_size=1)) as pool:
        with pool.restore(o.snap.memory, o.snap.vcpu_state) as vm:
            assert run_to_end(vm) == o.expected
        with Snapshot.load(o.path) as s:
            memory, state = s.memory, s.vcpu_state
            with pool.restore(memory, state) as vm:
                assert run_to_end(vm) == o.expected
            memory.release()


# -- independence ---------------------------------------------------------------------------------


def test_two_copy_restores_are_identical_and_independent(originals):
    o = originals("counter", 3, 2)
    snap_mem = sha256(o.snap.memory)
    file_hash = sha256(o.path.read_bytes())
    region = 0x400000
    with Vm.restore(o.snap, "copy") as a, Vm.restore(o.snap, "copy") as b:
        assert a.read_memory(0, a.memory_bytes) == b.read_memory(0, b.memory_bytes)
        pristine = b.read_memory(region, 4096)
        a.write_memory(region, b"\xab" * 4096)
        assert a.read_memory(region, 4096) == b"\xab" * 4096
        assert b.read_memory(region, 4096) == pristine  # not seen by the other VM
        assert bytes(o.snap.memory[region : region + 4096]) == pristine  # nor by the snapshot
        got_a, got_b = run_to_end(a), run_to_end(b)
    assert got_b == o.expected  # b is untouched by a's write
    assert got_a["runs"] != o.expected["runs"]  # a's write changed a's checksums only
    assert got_a["runs"][-1][0] == "exit"
    assert sha256(o.snap.memory) == snap_mem
    assert sha256(o.path.read_bytes()) == file_hash


def test_map_restores_never_write_the_file(originals):
    """Two map restores of one loaded file: the guest writes memory (it runs to
    its end), the host writes a present page and a hole; neither the other VM,
    the snapshot's memory nor the file sees any of it."""
    o = originals("memtouch", 3, 1)
    file_hash = sha256(o.path.read_bytes())
    present, hole = 0x400000, 0x800000  # memtouch's first page; a page never touched
    with Snapshot.load(o.path) as s:
        snap_mem = sha256(s.memory)
        assert s.memory[hole : hole + 4096] == bytes(4096)
        with Vm.restore(s, "map") as a, Vm.restore(s, "map") as b:
            assert a.restore_timing["mapped"] == b.restore_timing["mapped"] == 1
            got_a = run_to_end(a)  # the guest writes its pages (copy-on-write)
            assert got_a == o.expected
            a.write_memory(present, b"\x11" * 4096)
            a.write_memory(hole, b"\x22" * 4096)
            assert b.read_memory(present, 4096) == bytes(s.memory[present : present + 4096])
            assert b.read_memory(hole, 4096) == bytes(4096)
            assert sha256(s.memory) == snap_mem
            assert run_to_end(b) == o.expected
        # A restore made after all that starts from the pristine snapshot.
        with Vm.restore(s, "map") as c:
            assert sha256(c.read_memory(0, c.memory_bytes)) == o.memory_at_checkpoint
        assert sha256(s.memory) == snap_mem
    assert sha256(o.path.read_bytes()) == file_hash
    with Snapshot.load(o.path) as again:
        assert again.to_bytes() == o.bytes


def test_snapshot_of_a_restored_vm_continues_too(originals, tmp_path):
    """Snapshot of a map-restored VM (memory partly still the file's pages),
    saved and restored again: the chain still ends exactly like the original."""
    o = originals("memtouch", 3, 2)
    with Snapshot.load(o.path) as s, Vm.restore(s, "map") as vm:
        r = vm.run(timeout_s=60)
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", 2)
        with vm.snapshot() as s2:
            p = s2.save(tmp_path / "second.kvmsnap")
        rest = run_to_end(vm)
    with Snapshot.load(p) as s3, Vm.restore(s3) as vm3:
        assert run_to_end(vm3) == rest
    assert rest["runs"] == o.expected["runs"][1:]
    assert rest["memory"] == o.expected["memory"]


# -- restore arguments --------------------------------------------------------------------------------


def test_restore_argument_errors(originals):
    o = originals("counter", 3, 1)
    with pytest.raises(ConfigError) as e:
        Vm.restore(o.snap, strategy="fast")
    assert (e.value.check, e.value.argument) == ("argument_value", "strategy")
    with pytest.raises(ConfigError) as e:
        Vm.restore(o.snap, strategy="map")
    assert e.value.check == "strategy_needs_file"
    with pytest.raises(ConfigError) as e:
        Vm.restore(o.bytes)  # type: ignore[arg-type]
    assert (e.value.check, e.value.argument) == ("argument_type", "snap")


# -- host compatibility ----------------------------------------------------------------------------------


def _with_cpuid(data: bytes, function: int, index: int, reg: str, value_fn) -> tuple[bytes, int]:
    header, recs = C.parse_state(C.state_of(data))
    rec = C.find(recs, C.TAG_CPUID, 0)
    entry = next(e for e in C.cpuid_entries(rec.data) if e[0] == function and e[1] == index)
    old = entry[{"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}[reg]]
    new = value_fn(old)
    rec.data = C.set_cpuid(rec.data, function, index, reg, new)
    return C.with_state(data, C.build_state(header, recs)), new & ~old


def _highest_clear_bit(v: int) -> int:
    return next(1 << b for b in range(31, -1, -1) if not v >> b & 1)


@pytest.mark.parametrize(
    "function,reg",
    [pytest.param(7, "ebx", id="leaf7-ebx"), pytest.param(0x8000_0001, "ecx", id="leaf80000001-ecx")],
)
def test_cpuid_feature_the_host_lacks_is_incompatible(originals, function, reg):
    o = originals("counter", 3, 1)
    data, bit = _with_cpuid(o.bytes, function, 0, reg, lambda v: v | _highest_clear_bit(v))
    fds = fd_count()
    with Snapshot.from_bytes(data) as s:  # valid: every checksum was recomputed
        with pytest.raises(IncompatibleError) as e:
            Vm.restore(s)
        assert e.value.check == "cpuid_features"
        # What to tell the user: the leaf, the register and the missing bit.
        assert f"CPUID 0x{function:x}.0" in str(e.value) and f"{reg}&~host=0x{bit:x}" in str(e.value)
    assert fd_count() == fds  # the shell made for the restore was freed


def test_cpuid_leaf_the_host_lacks_is_incompatible(originals):
    o = originals("counter", 3, 1)
    header, recs = C.parse_state(C.state_of(o.bytes))
    rec = C.find(recs, C.TAG_CPUID, 0)
    buf = bytearray(rec.data)
    for i in range(0, len(buf), C.CPUID_ENTRY):
        if C.u32(buf, i) == 0x8000_0001:
            C.put32(buf, i + 4, 3)  # leaf 0x80000001 index 3: no such leaf
    rec.data = bytes(buf)
    with Snapshot.from_bytes(C.with_state(o.bytes, C.build_state(header, recs))) as s:
        with pytest.raises(IncompatibleError) as e:
            Vm.restore(s)
        assert e.value.check == "cpuid_leaf"


def test_larger_xsave_state_than_the_host_takes_is_incompatible(originals):
    o = originals("counter", 3, 1)
    header, recs = C.parse_state(C.state_of(o.bytes))
    rec = C.find(recs, C.TAG_XSAVE, 0)
    size = len(rec.data)
    rec.data += bytes(64)
    with Snapshot.from_bytes(C.with_state(o.bytes, C.build_state(header, recs))) as s:
        with pytest.raises(IncompatibleError) as e:
            Vm.restore(s)
        assert e.value.check == "xsave_size"


def test_unchanged_cpuid_round_trips_through_the_codec(originals):
    """The control for the tests above: re-encoding the STATE blob with the
    test codec, without changing anything, still restores and continues."""
    o = originals("counter", 3, 1)
    header, recs = C.parse_state(C.state_of(o.bytes))
    data = C.with_state(o.bytes, C.build_state(header, recs))
    assert data == o.bytes
    with Snapshot.from_bytes(data) as s, Vm.restore(s) as vm:
        assert run_to_end(vm) == o.expected


def test_incompatible_snapshot_still_loads_and_reports_info(originals, tmp_path):
    """Incompatibility is a restore-time check: the file itself is valid."""
    o = originals("counter", 3, 1)
    data, _ = _with_cpuid(o.bytes, 7, 0, "ebx", lambda v: v | _highest_clear_bit(v))
    with Snapshot.from_bytes(data) as s:
        p = s.save(tmp_path / "foreign.kvmsnap")
    with Snapshot.load(p) as s:
        assert s.guest == "counter"
        with pytest.raises(IncompatibleError):
            Vm.restore(s, "map")
    with pytest.raises(SnapshotError):
        Snapshot.from_bytes(data[:-1])
