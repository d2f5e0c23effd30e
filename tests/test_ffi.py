import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvmlab
from kvmlab import _ffi, errors


def test_abi_version_and_struct_sizes():
    assert _ffi.lib.kvmlab_abi_version() == _ffi.ABI_VERSION == 5
    ids = _ffi.struct_ids()
    # Every struct of the header is checked at import.
    for name in ["kvmlab_vm_config", "kvmlab_boot_options", "kvmlab_run_result", "kvmlab_regs", "kvmlab_host_info", "kvmlab_snapshot_header"]:
        assert name in ids
    for name, sid in ids.items():
        assert _ffi.lib.kvmlab_struct_size(sid) == _ffi.ffi.sizeof(name)


def test_unknown_struct_id_has_size_zero():
    assert _ffi.lib.kvmlab_struct_size(10_000) == 0


def test_every_result_code_maps_to_one_exception_class():
    assert _ffi.RESULTS[0][1] is None
    for code, (name, cls) in _ffi.RESULTS.items():
        if code == 0:
            continue
        assert issubclass(cls, errors.KvmlabError), name
        err = _ffi.error_for(code, "boom")
        assert type(err) is cls and str(err) == "boom"


def test_check_raises_with_core_message():
    out = _ffi.ffi.new("kvmlab_vm **")
    cfg = _ffi.ffi.new("kvmlab_vm_config *", {"memory_bytes": 7 << 20, "vcpus": 1})
    # A bad config is rejected before /dev/kvm is touched.
    with pytest.raises(errors.ConfigError) as e:
        _ffi.check(_ffi.lib.kvmlab_vm_new(cfg, out))
    assert e.value.check == "vm_memory_range" and "8 .. 4096 MiB" in str(e.value)  # the core's message, not a fallback
    assert out[0] == _ffi.ffi.NULL
    _ffi.check(0)


def test_specific_errors_derive_from_builtins():
    assert issubclass(errors.BoundsError, IndexError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.KvmlabMemoryError, MemoryError)
    assert issubclass(errors.GuestTimeoutError, TimeoutError)
    for name in errors.__all__:
        assert getattr(kvmlab, name) is getattr(errors, name)


def test_import_does_not_open_dev_kvm():
    code = (
        "import os, kvmlab, kvmlab.cli\n"
        "def link(f):\n"
        "    try:\n"
        "        return os.readlink('/proc/self/fd/' + f)\n"
        "    except OSError:\n"
        "        return ''\n"
        "fds = [link(f) for f in os.listdir('/proc/self/fd')]\n"
        "assert not any('kvm' in p for p in fds), fds\n"
        "print('ok')\n"
    )
    root = Path(kvmlab.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def _import_with_native_dir(native_dir: Path) -> subprocess.CompletedProcess:
    root = Path(kvmlab.__file__).resolve().parent.parent
    env = dict(os.environ, KVMLAB_NATIVE_DIR=str(native_dir))
    return subprocess.run(
        [sys.executable, "-c", "import kvmlab"], capture_output=True, text=True, timeout=60, cwd=root, env=env
    )


def test_missing_library_is_an_import_error_with_a_fix(tmp_path):
    r = _import_with_native_dir(tmp_path)
    assert r.returncode != 0
    # The fix fits the install: rebuild a source checkout, reinstall/report a wheel.
    assert "ImportError" in r.stderr and _ffi._REBUILD_HINT in r.stderr


def test_an_installed_copy_is_told_to_reinstall_not_rebuild(tmp_path):
    # The package without its source tree around it (as from a wheel) and without its core.
    shutil.copytree(Path(kvmlab.__file__).parent, tmp_path / "kvmlab", ignore=shutil.ignore_patterns("_native"))
    env = dict(os.environ, KVMLAB_NATIVE_DIR=str(tmp_path / "none"))
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [sys.executable, "-c", "import kvmlab"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "pip install --force-reinstall kvmlab" in r.stderr, r.stderr
    assert "ziglang build" not in r.stderr


def test_struct_size_mismatch_is_an_import_error(tmp_path):
    shutil.copy(_ffi.LIBRARY_PATH, tmp_path / "libkvmlab.so")
    shutil.copy(_ffi.TESTING_HEADER_PATH, tmp_path / "kvmlab_testing.h")
    header = _ffi.HEADER_PATH.read_text()
    # Grow kvmlab_run_result by one field: the header no longer matches the library.
    grown, n = re.subn(r"(\buint64_t\s+console_dropped_bytes\s*;)", r"\1 uint64_t extra_field;", header, count=1)
    assert n == 1
    (tmp_path / "kvmlab.h").write_text(grown)
    r = _import_with_native_dir(tmp_path)
    assert r.returncode != 0
    assert "kvmlab_run_result" in r.stderr and _ffi._REBUILD_HINT in r.stderr


def test_enum_names_come_from_the_header():
    assert _ffi.enum_names("kvmlab_run_reason") == {0: "exit", 1: "checkpoint", 2: "halt", 3: "timeout", 4: "interrupted"}
    assert list(_ffi.enum_values("kvmlab_strategy")) == ["auto", "copy", "map", "reuse", "prepared"]
    assert _ffi.enum_values("kvmlab_reset_mode") == {"auto": 0, "copy": 1, "drop": 2}
    assert _ffi.RESULTS[-8][0] == "snapshot" and _ffi.RESULTS[-8][1] is errors.SnapshotError
    checks = _ffi.enum_values("kvmlab_check")
    assert checks["none"] == 0 and {"magic", "header_crc", "state_crc", "memory_crc", "holes", "shape", "damaged"} <= set(checks)
    # The testing group's enum is read through its own header.
    assert "vcpu_mmap" in _ffi.enum_values("kvmlab_fault_site")
    # The binding reads the spellings gen_header emits, nothing else.
    assert _ffi._enum_prefix("kvmlab_result") == "KVMLAB_"
    assert _ffi._enum_prefix("kvmlab_run_reason") == "KVMLAB_RUN_REASON_"


def test_snapshot_error_carries_the_check_id():
    with pytest.raises(errors.SnapshotError) as e:
        kvmlab.Snapshot.from_bytes(b"x" * 5000)
    assert e.value.check == "total_bytes" or e.value.check == "magic"
    import pickle

    again = pickle.loads(pickle.dumps(e.value))
    assert again.check == e.value.check and str(again) == str(e.value)


def _header_functions(path: Path) -> set[str]:
    return set(re.findall(r"\b(kvmlab_\w+)\(", path.read_text()))


def test_product_and_testing_groups_are_apart():
    product = _header_functions(_ffi.HEADER_PATH)
    testing = _header_functions(_ffi.TESTING_HEADER_PATH)
    assert product and testing and not product & testing
    assert not any(n.startswith(("kvmlab_bench_", "kvmlab_fault_", "kvmlab_testing_")) for n in product)
    assert all(n.startswith(("kvmlab_bench_", "kvmlab_fault_", "kvmlab_testing_")) for n in testing)
    for name in testing:  # only through the testing lib object
        assert not hasattr(_ffi.lib, name) and hasattr(_ffi.testing, name)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm on this host")
    out = subprocess.run([nm, "-D", "--defined-only", str(_ffi.LIBRARY_PATH)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split() and line.split()[-1].startswith("kvmlab_")}
    # The shipped library (built with the testing group) exports exactly both headers.
    assert exported == product | testing

