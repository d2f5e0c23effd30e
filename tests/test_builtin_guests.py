"""Every built-in guest, booted for real (docs/guest-protocol.md)."""

import re
import struct

import pytest

from kvmlab import GuestCrashError, Vm, VmConfig

from conftest import CFG, SERVICE_TAG
from snapshot_codec import crc32c  # the tests' one CRC32C

pytestmark = pytest.mark.kvm

STEP_RE = re.compile(r"step (\d+) checksum 0x[0-9a-f]+\Z")
DONE_RE = re.compile(r"done vcpu (\d+) checksum 0x[0-9a-f]+\Z")
ROUND_RE = re.compile(r"round (\d+) pages (\d+) sum 0x[0-9a-f]+\Z")


def run_counter(**kw):
    cfg = kw.pop("cfg", CFG)
    with Vm.boot("counter", cfg, args=kw) as vm:
        return vm.run(timeout_s=10)


def steps_of(lines):
    return [int(STEP_RE.match(l).group(1)) for l in lines if STEP_RE.match(l)]


def test_hello():
    with Vm.boot("hello", CFG) as vm:
        assert vm.guest == "hello"
        r = vm.run()
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.console == "hello from kvmlab guest\n"
    assert r.console_dropped == 0
    assert isinstance(r.elapsed_ns, int) and r.elapsed_ns > 0


def test_counter_output_is_deterministic():
    a = run_counter(steps=20)
    b = run_counter(steps=20)
    assert (a.reason, a.exit_code) == ("exit", 0)
    lines = a.console.splitlines()
    assert steps_of(lines) == list(range(1, 21))
    assert all(STEP_RE.match(l) for l in lines[:20])
    assert DONE_RE.match(lines[20]) and lines[20].startswith("done vcpu 0 ")
    assert a.console == b.console


def test_counter_default_steps():
    r = run_counter()
    assert steps_of(r.lines) == list(range(1, 11))
    # Documented reference values (docs/guest-protocol.md, counter details).
    assert r.lines[0] == "step 1 checksum 0xb9fcd37da7ba670d"
    assert r.lines[9] == "step 10 checksum 0x8bc72d52c3ffbcd3"


def test_counter_checkpoint_then_continue():
    straight = run_counter(steps=20)
    with Vm.boot("counter", CFG, args={"steps": 20, "checkpoint_at": 10}) as vm:
        first = vm.run()
        assert (first.reason, first.checkpoint_tag) == ("checkpoint", 10)
        assert steps_of(first.lines) == list(range(1, 11))
        second = vm.run()
    assert (second.reason, second.exit_code) == ("exit", 0)
    assert steps_of(second.lines) == list(range(11, 21))
    assert second.lines[-1].startswith("done vcpu 0 ")
    # Stopping at a checkpoint does not change what the guest computes.
    assert first.console + second.console == straight.console


def test_counter_cpl0():
    # CPL0 code is emulated on kvm_pvm: keep it short.
    with Vm.boot("counter", CFG, args={"steps": 3}, cpl=0) as vm:
        r = vm.run(timeout_s=30)
        regs = vm.registers()
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert steps_of(r.lines) == [1, 2, 3]
    assert regs["cpl"] == 0 and regs["cs"] == 0x08
    # Same computation as at CPL3.
    assert r.console == run_counter(steps=3).console


def test_counter_cpl3_registers():
    with Vm.boot("counter", CFG, args={"steps": 1}) as vm:
        regs0 = vm.registers()
        assert regs0["rip"] == 0x100000 and regs0["rsi"] == 0x3000 and regs0["cpl"] == 3
        assert regs0["cs"] == 0x1B and regs0["rsp"] == 0x100000
        vm.run()
        assert vm.registers()["cpl"] == 3


def test_counter_two_vcpus():
    r = run_counter(steps=5, cfg=VmConfig(memory_mib=16, vcpus=2))
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert steps_of(r.lines) == [1, 2, 3, 4, 5]
    done = [DONE_RE.match(l) for l in r.lines if l.startswith("done")]
    assert [int(m.group(1)) for m in done] == [0, 1]


def test_counter_two_vcpus_checkpoint():
    cfg = VmConfig(memory_mib=16, vcpus=2)
    with Vm.boot("counter", cfg, args={"steps": 6, "checkpoint_at": 3}) as vm:
        assert vm.registers(1)["rdi"] == 1
        r1 = vm.run()
        assert (r1.reason, r1.checkpoint_tag) == ("checkpoint", 3)
        r2 = vm.run()
    assert (r2.reason, r2.exit_code) == ("exit", 0)
    assert steps_of(r1.lines + r2.lines) == [1, 2, 3, 4, 5, 6]
    assert r1.console + r2.console == run_counter(steps=6, cfg=cfg).console


def test_memtouch_rounds():
    with Vm.boot("memtouch", CFG, args={"pages": 8, "rounds": 3}) as vm:
        assert vm.read_memory(0x400000, 8 * 4096) == bytes(8 * 4096)
        results = [vm.run()]
        while results[-1].reason == "checkpoint":
            assert len(results) < 10
            results.append(vm.run())
        touched = vm.read_memory(0x400000, 8 * 4096)
    assert [r.reason for r in results] == ["checkpoint", "checkpoint", "exit"]
    assert results[-1].lines[-1] == "done"
    assert [r.checkpoint_tag for r in results[:2]] == [1, 2]
    assert results[-1].exit_code == 0
    rounds = [ROUND_RE.match(l) for r in results for l in r.lines if l.startswith("round")]
    assert [(int(m.group(1)), int(m.group(2))) for m in rounds] == [(1, 8), (2, 8), (3, 8)]
    # Every one of the 8 pages was written.
    assert all(any(touched[i * 4096 : (i + 1) * 4096]) for i in range(8))


def test_memtouch_defaults():
    with Vm.boot("memtouch", CFG) as vm:
        r = vm.run()
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.console == "round 1 pages 16 sum 0x0000001000000078\ndone\n"


def test_spin_times_out_and_resumes():
    with Vm.boot("spin", CFG) as vm:
        r = vm.run(timeout_s=0.3)
        assert r.reason == "timeout"
        assert 0.25e9 <= r.elapsed_ns < 0.6e9
        assert vm.run(timeout_s=0.1).reason == "timeout"


def test_crash():
    with Vm.boot("crash", CFG) as vm:
        with pytest.raises(GuestCrashError) as e:
            vm.run()
        assert e.value.check == "triple_fault"  # ud2 with no IDT
        assert "rip=" in str(e.value)  # the message carries the registers (documented)
        # The crash is sticky: the guest cannot be resumed.
        with pytest.raises(GuestCrashError):
            vm.run()




def service_call(vm, seq: int, opcode: int, payload: bytes, status: int = 0) -> bytes:
    vm.write_memory(0x5000, payload)
    vm.write_memory(0x4000, struct.pack("<IIIII", len(payload), 0, seq, 0, opcode))
    r = vm.run(timeout_s=5)
    assert (r.reason, r.checkpoint_tag) == ("checkpoint", SERVICE_TAG)
    assert struct.unpack("<I", vm.read_memory(0x4014, 4))[0] == status
    resp_len = struct.unpack("<I", vm.read_memory(0x4004, 4))[0]
    resp_seq = struct.unpack("<I", vm.read_memory(0x400C, 4))[0]
    assert resp_seq == seq
    return vm.read_memory(0x6000, resp_len)


def test_service():
    with Vm.boot("service", CFG) as vm:
        r = vm.run(timeout_s=5)
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", SERVICE_TAG)
        assert "service ready" in r.console
        assert service_call(vm, 1, 1, b"hello kvmlab") == b"hello kvmlab"
        assert service_call(vm, 2, 3, b"abcdef") == b"fedcba"
        data = bytes(range(256)) * 4
        assert service_call(vm, 3, 2, data) == struct.pack("<I", crc32c(data))
        assert crc32c(b"123456789") == 0xE3069283  # the reference check value
        assert service_call(vm, 4, 2, b"123456789") == struct.pack("<I", 0xE3069283)
        assert service_call(vm, 5, 99, b"x", status=1) == b""  # unknown opcode
        assert service_call(vm, 6, 1, b"") == b""
