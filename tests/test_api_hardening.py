"""The Python API under hostile use (issue 17): multi-step operations are one
operation under the VM's lock (item 3), bad arguments and host limits give a
KvmlabError with a machine-readable ``check`` id (item 8), and os.fork() with
live pools leaves a child that can use kvmlab and exits cleanly (item 9)."""

from __future__ import annotations

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
