"""The service guest's status codes that docs/guest-protocol.md names, each
tried with a request written by hand (call() refuses to send them): unknown
opcode (1) and a request over 4096 bytes (2). (Console writes over 64 KiB or
outside memory: tests/test_claims.py.)"""

from __future__ import annotations

import pytest

from kvmlab import Vm
from kvmlab.vm import SERVICE_GPA

pytestmark = pytest.mark.kvm


def _service_raw(vm, length: int, opcode: int, payload: bytes) -> tuple[int, int]:
    """One request written by hand (what call() would refuse to send);
    returns (status, response length)."""
    hdr = vm.read_memory(SERVICE_GPA, 16)
    seq = (int.from_bytes(hdr[8:12], "little") + 1) & 0xFFFFFFFF
    vm.write_memory(SERVICE_GPA + 0x1000, payload)
    vm.write_memory(
        SERVICE_GPA,
        length.to_bytes(4, "little") + bytes(4) + seq.to_bytes(4, "little") + bytes(4) + opcode.to_bytes(4, "little"),
    )
    r = vm.run(timeout_s=5)
    assert r.reason == "checkpoint"
    head = vm.read_memory(SERVICE_GPA, 0x18)
    assert int.from_bytes(head[12:16], "little") == seq
    return int.from_bytes(head[0x14:0x18], "little"), int.from_bytes(head[4:8], "little")


def test_service_status_codes(service_snap):
    with Vm.restore(service_snap) as vm:
        assert _service_raw(vm, 3, 1, b"abc") == (0, 3)  # echo: ok
        assert vm.read_memory(SERVICE_GPA + 0x2000, 3) == b"abc"
        assert _service_raw(vm, 3, 99, b"abc") == (1, 0)  # unknown opcode: status 1, no response
        status, n = _service_raw(vm, 5000, 1, bytes(range(256)) * 16)  # over 4096: status 2
        assert (status, n) == (2, 4096)
        assert vm.read_memory(SERVICE_GPA + 0x2000, 4096) == bytes(range(256)) * 16
        assert vm.call(b"still fine") == b"still fine"  # the guest serves on


def test_vm_call_abi_resumes_a_run_and_refuses_an_oversized_payload(service_snap):
    """kvmlab_vm_call, which call() makes: a run cut short (a 1 ns timeout)
    leaves the request in place, and a resume (resume_run=1) runs on and
    reads the answer to the same sequence number; a payload over the service
    area is refused with check id service_payload, writing nothing."""
    from kvmlab import _ffi
    from kvmlab.vm import SERVICE_MAX_BYTES, SERVICE_OPS

    ffi, lib = _ffi.ffi, _ffi.lib
    outcome = _ffi.enum_values("kvmlab_call_outcome")
    with Vm.restore(service_snap) as vm:
        assert vm.call(b"warm") == b"warm"
        h = vm._handle
        since = lib.kvmlab_vm_interrupt_count(h)  # where this "call" began
        buf = bytearray(SERVICE_MAX_BYTES)
        ans, out = ffi.new("kvmlab_service_answer *"), ffi.new("kvmlab_run_result *")
        payload = b"resumed"
        rc = lib.kvmlab_vm_call(h, since, SERVICE_OPS["reverse"], payload, len(payload), 0, 1, out,
                                ffi.from_buffer("uint8_t[]", buf), len(buf), ans)
        assert rc == 0
        seq = ans.seq
        # 1 ns ends the run before the guest can answer: the resume below is what reads it.
        assert ans.outcome == outcome["no_answer"]
        for _ in range(100):  # the 1 ns run may already have answered; else resume until it does
            if ans.outcome == outcome["answered"]:
                break
            assert ans.outcome == outcome["no_answer"]
            rc = lib.kvmlab_vm_call(h, since, 0, ffi.NULL, 0, 1, 1_000_000_000, out, ffi.from_buffer("uint8_t[]", buf),
                                    len(buf), ans)
            assert rc == 0
        assert (ans.outcome, ans.seq, bytes(buf[: ans.bytes])) == (outcome["answered"], seq, payload[::-1])
        before = vm.read_memory(SERVICE_GPA, 0x18)
        big = bytes(SERVICE_MAX_BYTES + 1)
        rc = lib.kvmlab_vm_call(h, since, SERVICE_OPS["echo"], big, len(big), 0, 1_000_000_000, out,
                                ffi.from_buffer("uint8_t[]", buf), len(buf), ans)
        assert _ffi.error_for(rc).check == "service_payload"
        assert vm.read_memory(SERVICE_GPA, 0x18) == before
        assert vm.call(b"still fine") == b"still fine"


def test_vm_call_abi_stops_for_an_interrupt_made_since_its_call_began(service_snap):
    """kvmlab_vm_call pins its run where the caller's call began (`since`): an
    interrupt() made after that, even before the native call, stops the run
    with no answer; the next call (a new `since`) is answered."""
    from kvmlab import _ffi
    from kvmlab.run import REASONS
    from kvmlab.vm import SERVICE_MAX_BYTES, SERVICE_OPS

    ffi, lib = _ffi.ffi, _ffi.lib
    outcome = _ffi.enum_values("kvmlab_call_outcome")
    with Vm.restore(service_snap) as vm:
        assert vm.call(b"warm") == b"warm"
        h = vm._handle
        buf = bytearray(SERVICE_MAX_BYTES)
        ans, out = ffi.new("kvmlab_service_answer *"), ffi.new("kvmlab_run_result *")
        since = lib.kvmlab_vm_interrupt_count(h)
        vm.interrupt()  # after the call "began", before its native call
        rc = lib.kvmlab_vm_call(h, since, SERVICE_OPS["echo"], b"x", 1, 0, 5_000_000_000, out,
                                ffi.from_buffer("uint8_t[]", buf), len(buf), ans)
        assert rc == 0
        assert (ans.outcome, REASONS[out.reason]) == (outcome["no_answer"], "timeout")
        assert vm.call(b"next") == b"next"
