"""Shared test setup: the tests' one support module.

Tests that need KVM carry the ``kvm`` marker (or use the ``kvm`` fixture).
Without a usable /dev/kvm they are skipped, unless ``KVMLAB_REQUIRE_KVM=1``
(CI on a KVM host), in which case they fail. There are no mocks: KVM tests run
real guests.

Constants (``MiB``, the VM shapes ``CFG``/``CFG_MIN``, raw guests) and the
snapshot fixtures shared by several files live here, once; what kvmlab itself
defines (``SERVICE_TAG``, memory limits) is imported from kvmlab. Test files
import constants with ``from conftest import ...``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kvmlab import _ffi
from kvmlab.config import MIN_MEMORY_MIB, VmConfig
from kvmlab.vm import SERVICE_TAG

REQUIRE_KVM = os.environ.get("KVMLAB_REQUIRE_KVM") == "1"
#: The source checkout's path when the suite tests an installed wheel (.ci/run sets it): the
#: kvmlab under test must not come from there, and tests marked ``checkout`` are skipped.
INSTALLED_NOT_FROM = os.environ.get("KVMLAB_TEST_INSTALLED")

MiB = 1 << 20
#: The usual test VM shape, and the smallest one kvmlab accepts.
CFG = VmConfig(memory_mib=16)
CFG_MIN = VmConfig(memory_mib=MIN_MEMORY_MIB)

#: Raw x86_64 guests (flat images loaded at 0x100000).
EXIT7 = bytes.fromhex("66ba0005b807000000ef")  # mov dx,0x500; mov eax,7; out dx,eax
LOOP_FOREVER = b"\xeb\xfe"  # jmp $
UD2 = b"\x0f\x0b"  # ud2 -> triple fault


@functools.lru_cache(maxsize=None)
def kvm_problem() -> str | None:
    """None when KVM is usable by kvmlab here, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        from kvmlab import _ffi
    except ImportError as e:  # a build problem, not a host problem: report it
        return f"kvmlab's native core does not load: {e}"
    info = _ffi.ffi.new("kvmlab_host_info *")
    try:
        _ffi.check(_ffi.lib.kvmlab_host_info_get(info))
    except Exception as e:  # noqa: BLE001 - any failure means "no KVM"
        return f"KVM is not usable: {e}"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    # pytest.ini sets `timeout` for pytest-timeout (the dev extra); without the
    # plugin, declare the key so pytest does not warn about it.
    if importlib.util.find_spec("pytest_timeout") is None:
        parser.addini("timeout", "per-test timeout in seconds (used by pytest-timeout)")


def _require_kvm() -> None:
    problem = kvm_problem()
    if problem is None:
        return
    if REQUIRE_KVM:
        pytest.fail(f"KVMLAB_REQUIRE_KVM=1 but {problem}", pytrace=False)
    pytest.skip(problem)


def pytest_configure(config: pytest.Config) -> None:
    import kvmlab

    where = Path(kvmlab.__file__).resolve().parent
    if INSTALLED_NOT_FROM and where.is_relative_to(Path(INSTALLED_NOT_FROM).resolve()):
        raise pytest.UsageError(
            f"KVMLAB_TEST_INSTALLED={INSTALLED_NOT_FROM}: this run must test an installed kvmlab, "
            f"but it imports {where} (run pytest outside the checkout, with the wheel installed)"
        )


def pytest_report_header(config: pytest.Config) -> str:
    import kvmlab

    kind = "installed (KVMLAB_TEST_INSTALLED)" if INSTALLED_NOT_FROM else "any"
    return f"kvmlab under test: {kvmlab.__version__} from {Path(kvmlab.__file__).resolve().parent} [{kind}]"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if INSTALLED_NOT_FROM and item.get_closest_marker("checkout") is not None:
        pytest.skip("needs the source checkout (README.md, zigsrc/); this run tests the installed wheel")
    if item.get_closest_marker("kvm") is not None:
        _require_kvm()


@pytest.fixture
def kvm() -> None:
    """Requires a usable /dev/kvm (skip, or fail under KVMLAB_REQUIRE_KVM=1)."""
    _require_kvm()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- snapshot fixtures shared by several test files ---------------------------------------


#: Shell-creation steps the core's fault switch can fail (kvmlab_fault_site of kvmlab_testing.h).
FAULT_SITE = _ffi.enum_values("kvmlab_fault_site")


@contextlib.contextmanager
def fault_injected(site: str, after: int = 0):
    """Shell-creation step ``site`` fails after ``after`` more passes, for the
    block (the testing export kvmlab_fault_inject); disarmed on the way out."""
    _ffi.check(_ffi.testing.kvmlab_fault_inject(FAULT_SITE[site], after))
    try:
        yield
    finally:
        _ffi.testing.kvmlab_fault_inject(FAULT_SITE["none"], 0)


@contextlib.contextmanager
def reapers_held(pool):
    """Holds ``pool``'s reapers off its destroy queue for the block (the
    testing export kvmlab_testing_pool_hold_reapers): released VMs stay queued,
    so a destroy backlog has an exact size whatever this host's destroy speed."""
    _ffi.check(_ffi.testing.kvmlab_testing_pool_hold_reapers(pool._handle, True))
    try:
        yield
    finally:
        if pool._handle is not None:
            _ffi.check(_ffi.testing.kvmlab_testing_pool_hold_reapers(pool._handle, False))


def close_during(vm, work, settle_s: float) -> tuple[float, bool]:
    """Runs ``work()`` on a daemon thread (a regression must not keep pytest
    alive), closes ``vm`` after ``settle_s``; returns (seconds close() took,
    whether the thread ended within 5 s after)."""
    t = threading.Thread(target=work, daemon=True)
    t.start()
    time.sleep(settle_s)
    t0 = time.monotonic()
    vm.close()
    waited = time.monotonic() - t0
    t.join(5)
    return waited, not t.is_alive()


#: A shell's background job starts with SIGINT ignored, and Python then leaves
#: it ignored (so do the interpreters it starts: an ignored signal stays
#: ignored across exec). The tests of Ctrl-C send SIGINT and expect
#: KeyboardInterrupt, as in a terminal or a notebook: they would fail there,
#: or pass without testing anything. With a handler installed here, children
#: start with SIGINT at its default again (exec resets handled signals).
@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_raises_keyboard_interrupt():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="session")
def service_snap():
    """The service guest (16 MiB) waiting at its service checkpoint, in memory."""
    _require_kvm()  # fails (not skips) under KVMLAB_REQUIRE_KVM=1
    from kvmlab import Vm

    with Vm.boot("service", CFG) as vm:
        r = vm.run(timeout_s=10)
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", SERVICE_TAG)
        assert "service ready" in r.console
        snap = vm.snapshot()
    yield snap
    snap.close()


@pytest.fixture(scope="session")
def counter_snap():
    """The counter guest (16 MiB, 4 steps) stopped at its checkpoint after step 2, in memory."""
    _require_kvm()
    from kvmlab import Vm

    with Vm.boot("counter", CFG, args={"steps": 4, "checkpoint_at": 2}) as vm:
        r = vm.run()
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", 2)
        snap = vm.snapshot()
    yield snap
    snap.close()


@pytest.fixture(scope="session")
def service_file(service_snap, tmp_path_factory):
    """``service_snap`` saved to a file (Snapshot.load it for map restores)."""
    return service_snap.save(tmp_path_factory.mktemp("service") / "service.kvmsnap")
