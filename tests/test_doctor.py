"""kvmlab.doctor(): the host report as data, its text, JSON and HTML forms."""

from __future__ import annotations

import json
import os
import resource

import pytest

import kvmlab
from kvmlab import cli
from kvmlab.doctor import KVM_MODULES, REQUIRED_CAPS, Check, DoctorReport, Status, kvm_module


@pytest.fixture(scope="module")
def report(request):
    from conftest import _require_kvm

    _require_kvm()
    return kvmlab.doctor()


@pytest.mark.kvm
def test_report_on_this_host(report):
    assert report.ok and not report.failed
    assert set(report.versions) == {"kvmlab", "core_abi", "python", "kernel"}
    assert report.versions["kernel"] == os.uname().release
    assert report.versions["core_abi"] == str(kvmlab._ffi.ABI_VERSION)
    # The module doctor names is one this host really has loaded.
    assert report.kvm_module in KVM_MODULES
    assert os.path.isdir(f"/sys/module/{report.kvm_module}") or report.kvm_module in open("/proc/modules").read()
    for name, _ in REQUIRED_CAPS:
        assert report.capabilities[name], name
        assert report[f"cap {name}"].status is Status.OK
    assert isinstance(report.cpl0_emulated, bool) and report.cpl0_ratio > 0
    assert report.cpl0_emulated == (report.cpl0_ratio > 10)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert (report.limits["nofile_soft"], report.limits["nofile_hard"]) == (soft, hard)
    with open("/proc/sys/vm/max_map_count") as f:
        assert report.limits["max_map_count"] == int(f.read())
    assert set(report.tools) == {"QEMU", "unicorn", "Dask", "chromium"}
    import shutil

    assert bool(report.tools["QEMU"]) == bool(shutil.which("qemu-system-x86_64"))


@pytest.mark.kvm
def test_to_dict_is_json_and_complete(report):
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is True and d["kvm_module"] == report.kvm_module
    assert [c["name"] for c in d["checks"]] == [c.name for c in report.checks]
    assert {c["status"] for c in d["checks"]} <= {s.value for s in Status}
    assert d["limits"] == report.limits and d["cpl0_emulated"] == report.cpl0_emulated


@pytest.mark.kvm
def test_html_and_text_forms(report):
    html = report._repr_html_()
    for c in report.checks:
        assert f">{c.name.replace('/', '/')}<" in html
    assert "var(--jp-ui-font-color1" in html  # theme colours, not fixed greys
    text = report.to_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert text.endswith("kvmlab can run on this host.")
    r = repr(report)
    assert r.startswith("<DoctorReport ok:") and "\n" not in r and len(r) < 120


def test_a_failed_check_makes_the_report_fail():
    checks = (
        Check("/dev/kvm", Status.FAIL, "missing", "load kvm_intel or kvm_amd"),
        Check("open files", Status.WARN, "soft 64, hard 64", "raise it"),
    )
    r = DoctorReport(checks, versions={})
    assert not r.ok and r.failed == [checks[0]] and r.warnings == [checks[1]]
    assert "-> load kvm_intel or kvm_amd" in r.to_text()
    assert r.to_text().endswith("kvmlab cannot run on this host: fix the failed checks.")
    assert r["open files"] is checks[1]
    with pytest.raises(KeyError):
        r["nope"]
    assert "&lt;" not in DoctorReport((Check("<x>", Status.OK, "a<b"),), {})._repr_html_().split("<table")[0]
    assert "a&lt;b" in DoctorReport((Check("<x>", Status.OK, "a<b"),), {})._repr_html_()


def test_kvm_module_from_sys_then_proc(tmp_path):
    sys_dir, proc = tmp_path / "sys", tmp_path / "modules"
    sys_dir.mkdir()
    proc.write_text("kvm_amd 200704 0 - Live 0x0\nkvm 1400832 1 kvm_amd, Live 0x0\n")
    assert kvm_module(sys_dir, proc) == "kvm_amd"
    (sys_dir / "kvm_intel").mkdir()
    assert kvm_module(sys_dir, proc) == "kvm_intel"
    assert kvm_module(tmp_path / "none", tmp_path / "none") is None


@pytest.mark.kvm
def test_cli_doctor_text_and_json(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "/dev/kvm" in out and "KVM API version" in out and "KVM module" in out
    for name, _ in REQUIRED_CAPS:
        assert f"cap {name}" in out
    assert "guest at CPL3" in out and "guest at CPL0" in out
    assert "CPL0 emulated (ratio" in out or "CPL0 native (ratio" in out
    assert "open files" in out and "vm.max_map_count" in out
    assert out.rstrip().endswith("kvmlab can run on this host.")
    assert cli.main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is True and d["versions"]["python"] and d["kvm_module"] in KVM_MODULES


def _kvmlab_in_a_mount_namespace(tmp_path, setup: str, *args: str):
    """``python -m kvmlab ARGS`` in a private mount namespace after ``setup``
    (a shell command that breaks /dev/kvm there only)."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give kvmlab a broken /dev/kvm")
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'{setup} && exec "$0" -m kvmlab "$@"', sys.executable, *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    if "mount" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip(f"mount namespaces are not allowed here: {r.stderr.strip()}")
    return r


def _doctor_in_a_mount_namespace(tmp_path, setup: str) -> tuple[int, dict]:
    r = _kvmlab_in_a_mount_namespace(tmp_path, setup, "doctor", "--json")
    assert r.stdout, f"the doctor wrote nothing: {r.stderr[-2000:]}"
    return r.returncode, json.loads(r.stdout)


def test_doctor_without_dev_kvm_fails_and_says_what_to_do(tmp_path):
    rc, d = _doctor_in_a_mount_namespace(tmp_path, "mount -t tmpfs none /dev")
    assert rc == 1 and d["ok"] is False
    failed = [c for c in d["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["/dev/kvm"] and "kvm_intel or kvm_amd" in failed[0]["advice"]
    # The host facts that need no KVM are still reported.
    assert d["limits"]["nofile_hard"] > 0 and set(d["tools"]) == {"QEMU", "unicorn", "Dask", "chromium"}


@pytest.mark.kvm  # binds over the existing /dev/kvm
def test_doctor_with_a_dev_kvm_that_is_not_kvm_fails(tmp_path):
    rc, d = _doctor_in_a_mount_namespace(tmp_path, "mount --bind /dev/null /dev/kvm")
    assert rc == 1 and d["ok"] is False
    assert [c["name"] for c in d["checks"] if c["status"] == "fail"] == ["KVM API"]
    assert "cap IRQCHIP" not in [c["name"] for c in d["checks"]]  # nothing probed past the failure


def test_demo_without_dev_kvm_says_to_run_the_doctor(tmp_path):
    r = _kvmlab_in_a_mount_namespace(tmp_path, "mount -t tmpfs none /dev", "demo", "--n", "5")
    assert r.returncode == 1
    assert "demo failed: KvmUnavailableError" in r.stderr and "kvmlab doctor" in r.stderr
    assert "Traceback" not in r.stderr
