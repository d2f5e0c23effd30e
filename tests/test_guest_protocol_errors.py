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
