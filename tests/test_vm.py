"""The Vm API on raw x86_64 guests (hand-assembled bytes)."""

import threading
import time

import pytest

from conftest import CFG_MIN as CFG
from conftest import EXIT7, LOOP_FOREVER, UD2, MiB, close_during
from kvmlab import (
    BoundsError,
    ClosedError,
    ConfigError,
    Guest,
    GuestCrashError,
    GuestError,
    GuestTimeoutError,
    RunResult,
    Vm,
    VmConfig,
)

pytestmark = pytest.mark.kvm

# mov al, 'x'; 1: out 0xe9, al; jmp 1b
PUTC_FOREVER = b"\xb0\x78\xe6\xe9\xeb\xfc"
# mov dx, 0x502; mov eax, 0x400000; 1: out dx, eax; jmp 1b  (descriptor written by the test)
WRITE_FOREVER = b"\x66\xba\x02\x05\xb8\x00\x00\x40\x00\xef\xeb\xfd"
# mov dx, 0x600; out dx, al  (a port kvmlab does not serve)
BAD_PORT = b"\x66\xba\x00\x06\xee"
# mov dx, 0x501; mov eax, 0x1234; out dx, eax; mov dx, 0x500; mov eax, 3; out dx, eax
CHECKPOINT_THEN_EXIT3 = bytes.fromhex("66ba0105b834120000ef66ba0005b803000000ef")


def test_exit_code_and_result_fields():
    with Vm.boot(EXIT7, CFG) as vm:
        assert (vm.guest, vm.memory_bytes, vm.vcpus, vm.config) == ("custom", 8 * MiB, 1, CFG)
        r = vm.run()
    assert isinstance(r, RunResult)
    assert (r.reason, r.exit_code, r.console, r.console_dropped) == ("exit", 7, "", 0)
    assert isinstance(r.elapsed_ns, int)
    with pytest.raises(AttributeError):
        r.reason = "x"  # frozen


def test_guest_spec_forms(tmp_path):
    p = tmp_path / "exit7.bin"
    p.write_bytes(EXIT7)
    for spec in (EXIT7, Guest.from_bytes(EXIT7, name="seven"), p, str(p)):
        with Vm.boot(spec, CFG) as vm:
            assert vm.run().exit_code == 7
    with pytest.raises(GuestError):
        Vm.boot(12345)  # type: ignore[arg-type]


def test_default_config():
    with Vm.boot(EXIT7) as vm:
        assert vm.config == VmConfig()
        assert vm.memory_bytes == 64 * MiB


def test_bad_boot_arguments():
    with pytest.raises(ConfigError):
        Vm.boot(EXIT7, cpl=1)
    with pytest.raises(ConfigError):
        Vm.boot(EXIT7, cpl=True)
    with pytest.raises(ConfigError):
        Vm.boot(EXIT7, {"memory_mib": 8})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Vm.boot(EXIT7, CFG, args={"bad key": 1})


def test_checkpoint_then_exit():
    with Vm.boot(CHECKPOINT_THEN_EXIT3, CFG) as vm:
        r = vm.run()
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", 0x1234)
        r = vm.run()
        assert (r.reason, r.exit_code) == ("exit", 3)


def test_run_until_exit():
    with Vm.boot(CHECKPOINT_THEN_EXIT3, CFG) as vm:
        r = vm.run_until_exit(timeout_s=5)
    assert (r.reason, r.exit_code) == ("exit", 3)
    with Vm.boot("counter", CFG, args={"steps": 4, "checkpoint_at": 2}) as vm:
        r = vm.run_until_exit(timeout_s=5)
    assert r.reason == "exit" and r.console.count("step ") == 4


def test_run_until_exit_times_out():
    with Vm.boot(LOOP_FOREVER, CFG) as vm:
        t0 = time.monotonic()
        with pytest.raises(GuestTimeoutError) as e:
            vm.run_until_exit(timeout_s=0.3)
        assert e.value.check == "deadline"
        assert time.monotonic() - t0 < 0.6


def test_timeout_is_a_result():
    with Vm.boot(LOOP_FOREVER, CFG) as vm:
        t0 = time.monotonic()
        r = vm.run(timeout_s=0.5)
        wall = time.monotonic() - t0
    assert r.reason == "timeout"
    assert 0.5 <= wall < 1.0, wall
    assert 0.5e9 <= r.elapsed_ns < 1.0e9


@pytest.mark.parametrize("bad", [0, -1, "1", True, float("nan")])
def test_bad_timeouts(bad):
    with Vm.boot(EXIT7, CFG) as vm:
        with pytest.raises(ConfigError):
            vm.run(timeout_s=bad)
        assert vm.run(timeout_s=None).exit_code == 7  # None: no deadline


def test_triple_fault_crash():
    with Vm.boot(UD2, CFG) as vm:
        with pytest.raises(GuestCrashError) as e:
            vm.run()
    assert e.value.check == "triple_fault"
    assert "rip=0x100000" in str(e.value)  # the message carries the registers (documented)


def test_unknown_port_crash_names_port():
    with Vm.boot(b"\xb0\x41\xe6\xe9" + BAD_PORT, CFG) as vm:  # prints "A" first
        with pytest.raises(GuestCrashError) as e:
            vm.run()
    assert e.value.check == "unknown_port_write" and "0x600" in str(e.value)  # names the port
    assert e.value.console == "A"


def test_memory_read_write():
    with Vm.boot(EXIT7, CFG) as vm:
        assert vm.read_memory(0x100000, len(EXIT7)) == EXIT7
        assert vm.read_memory(0x3000, 8) == b"KVMLBOOT"
        vm.write_memory(0x500000, b"abc")
        vm.write_memory(0x500003, bytearray(b"de"))
        vm.write_memory(0x500005, memoryview(b"f"))
        assert vm.read_memory(0x500000, 6) == b"abcdef"
        assert vm.read_memory(CFG.memory_bytes - 4, 4) == bytes(4)
        assert vm.read_memory(0, 0) == b""
        vm.write_memory(CFG.memory_bytes - 1, b"z")
        # The guest sees host writes: replace its exit code.
        vm.write_memory(0x100005, (42).to_bytes(4, "little"))
        assert vm.run().exit_code == 42


@pytest.mark.parametrize(
    "gpa,n",
    [(8 * MiB, 1), (8 * MiB - 1, 2), (-1, 1), (0, 8 * MiB + 1), (2**64 - 1, 2), (2**70, 1)],
)
def test_memory_out_of_bounds(gpa, n):
    with Vm.boot(EXIT7, CFG) as vm:
        with pytest.raises(BoundsError):
            vm.read_memory(gpa, n)
        with pytest.raises(BoundsError):
            vm.write_memory(gpa, b"x" * max(n, 0))
        with pytest.raises(IndexError):  # BoundsError is an IndexError
            vm.read_memory(gpa, n)


def test_registers():
    with Vm.boot(EXIT7, VmConfig(memory_mib=8, vcpus=2)) as vm:
        r0, r1 = vm.registers(0), vm.registers(1)
        assert r0["rip"] == r1["rip"] == 0x100000
        assert (r0["rdi"], r1["rdi"]) == (0, 1)
        assert (r0["rsp"], r1["rsp"]) == (0x100000, 0xF0000)
        assert r0["cr3"] == 0x10000 and r0["efer"] == 0x501
        assert "reserved" not in r0
        for bad in (2, -1, "0"):
            with pytest.raises(ConfigError):
                vm.registers(bad)
        r = vm.run()
        assert r.reason == "exit" and vm.registers()["rax"] == 7


def test_use_after_close():
    vm = Vm.boot(EXIT7, CFG)
    assert not vm.closed
    vm.close()
    vm.close()  # twice is fine
    assert vm.closed
    assert "closed" in repr(vm)
    for call in (vm.run, lambda: vm.read_memory(0, 1), lambda: vm.write_memory(0, b"x"), vm.registers, vm.run_until_exit):
        with pytest.raises(ClosedError):
            call()
    with Vm.boot(EXIT7, CFG) as vm2:
        pass
    with pytest.raises(ClosedError):
        vm2.run()


@pytest.mark.parametrize("timeout_s", [5.0, None])
def test_close_interrupts_a_run_in_another_thread(timeout_s):
    """close() stops a run() on another thread at once (even one with no
    deadline), waits for it to return, then frees the VM."""
    vm = Vm.boot(LOOP_FOREVER, CFG)
    results = []
    waited, ended = close_during(vm, lambda: results.append(vm.run(timeout_s=timeout_s)), 0.2)
    assert ended
    assert results and results[0].reason == "timeout"
    assert waited < 2.0
    with pytest.raises(ClosedError):
        vm.run()


def test_interrupt_from_other_threads_while_closing():
    """interrupt() is documented safe from any thread: hammered from two
    threads while the VM runs and is closed, it never touches a freed handle
    (close() takes the handle away under the lock interrupt() holds) and no
    one deadlocks."""
    for _ in range(5):
        vm = Vm.boot(LOOP_FOREVER, CFG)
        stop = threading.Event()
        errors = []

        def hammer():
            try:
                while not stop.is_set():
                    vm.interrupt()
                    time.sleep(0.0001)  # as often as a real caller would, and then some
            except Exception as e:  # noqa: BLE001 - any exception fails the test below
                errors.append(e)

        runner = threading.Thread(target=lambda: vm.run(timeout_s=5.0))
        hammers = [threading.Thread(target=hammer) for _ in range(2)]
        runner.start()
        for h in hammers:
            h.start()
        time.sleep(0.05)
        vm.close()
        time.sleep(0.02)  # the hammers keep calling interrupt() on the closed VM
        stop.set()
        for t in [runner, *hammers]:
            t.join(10)
            assert not t.is_alive()
        assert errors == [] and vm.closed


def test_interrupt_then_resume():
    vm = Vm.boot(LOOP_FOREVER, CFG)
    results = []
    t = threading.Thread(target=lambda: results.append(vm.run(timeout_s=None)))
    t.start()
    time.sleep(0.2)
    vm.interrupt()
    t.join(5)
    assert results[0].reason == "timeout"
    assert vm.run(timeout_s=0.2).reason == "timeout"  # resumes the same loop
    vm.close()


def test_console_putc_bytes_arrive():
    """Byte-at-a-time output (port 0xe9) reaches the console, every byte of
    it. (0.3 s of putc cannot reach the 1 MiB bound here; the bound is tested
    with bulk writes below.)"""
    with Vm.boot(PUTC_FOREVER, CFG) as vm:
        r = vm.run(timeout_s=0.3)
    assert r.reason == "timeout"
    assert set(r.console) <= {"x"}
    assert len(r.console) >= 100 and r.console_dropped == 0


def test_console_bounded_bulk_write():
    with Vm.boot(WRITE_FOREVER, CFG) as vm:
        vm.write_memory(0x500000, b"y" * 65536)
        vm.write_memory(0x400000, (0x500000).to_bytes(8, "little") + (65536).to_bytes(8, "little"))
        r = vm.run(timeout_s=0.3)
        assert r.reason == "timeout"
        assert len(r.console) == MiB  # 1 MiB kept per run ...
        assert r.console_dropped > 0  # ... the rest counted
        assert set(r.console) == {"y"}
        r2 = vm.run(timeout_s=0.2)  # each run gets a fresh 1 MiB
        assert len(r2.console) == MiB and r2.console_dropped > 0


def test_console_is_utf8_with_replacement():
    # Prints "é" (c3 a9) then a lone 0xff byte, then exits 0.
    code = b"".join(b"\xb0" + bytes([c]) + b"\xe6\xe9" for c in (0xC3, 0xA9, 0xFF)) + bytes.fromhex(
        "66ba000531c0ef"
    )
    with Vm.boot(code, CFG) as vm:
        r = vm.run()
    assert r.console == "\u00e9\ufffd"


def test_console_split_between_runs():
    # Prints c3, checkpoints, prints a9, exits: the character survives the split.
    code = (
        b"\xb0\xc3\xe6\xe9"
        + bytes.fromhex("66ba0105b801000000ef")
        + b"\xb0\xa9\xe6\xe9"
        + bytes.fromhex("66ba000531c0ef")
    )
    with Vm.boot(code, CFG) as vm:
        a = vm.run()
        b = vm.run()
    assert (a.reason, b.reason) == ("checkpoint", "exit")
    assert a.console + b.console == "\u00e9"


CTRL_C_SCRIPT = """
import os, signal, threading, time
from kvmlab import Vm, VmConfig
vm = Vm.boot(b"\\xeb\\xfe", VmConfig(memory_mib=8))
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    vm.run(timeout_s=None)          # no deadline: only the signal can end it
    print("not interrupted")
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.1f} s")
print("then", vm.run(timeout_s=0.2).reason)   # the VM is still usable and resumes
"""


def test_ctrl_c_interrupts_a_run_without_deadline():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", CTRL_C_SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = p.stdout.strip().splitlines()
    assert first.startswith("interrupted after") and float(first.split()[-2]) < 5, first
    assert second == "then timeout"
