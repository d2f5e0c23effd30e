import subprocess
import sys
from pathlib import Path

import pytest

import kvmlab
from kvmlab import cli


@pytest.mark.kvm
def test_doctor(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "/dev/kvm" in out and "KVM API version" in out
    for name, _ in cli.REQUIRED_CAPS:
        assert f"cap {name}" in out
    assert "guest at CPL3" in out and "guest at CPL0" in out
    assert "CPL0 emulated (ratio" in out or "CPL0 native (ratio" in out
    assert "kvmlab can run on this host" in out


@pytest.mark.kvm
def test_demo(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "counter" in out and "64 MiB" in out
    assert "checkpoint (tag 10)" in out and "exit (code 0)" in out
    assert "done vcpu 0" in out


def test_cpl_probe_image_exits():
    img = cli.cpl_loop_image(5)
    assert img.startswith(b"\xb9\x05\x00\x00\x00") and img.endswith(b"\xef")


def test_usage_errors():
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["nope"])


@pytest.mark.kvm
def test_python_dash_m():
    root = Path(kvmlab.__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "kvmlab", "demo", "--steps", "4", "--checkpoint-at", "2"],
        capture_output=True, text=True, timeout=60, cwd=root,
    )
    assert r.returncode == 0, r.stderr
    assert "checkpoint (tag 2)" in r.stdout
