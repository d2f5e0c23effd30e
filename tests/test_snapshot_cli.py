"""``kvmlab snapshot info PATH``: the header and sections of a snapshot file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
import snapshot_codec as C
from kvmlab import Snapshot, Vm, VmConfig, cli

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    """A full-layout file of a 2-vCPU, 32 MiB counter guest at its checkpoint."""
    conftest._require_kvm()
    d = tmp_path_factory.mktemp("cli")
    with Vm.boot("counter", VmConfig(memory_mib=32, vcpus=2), args={"steps": 4, "checkpoint_at": 2}) as vm:
        assert vm.run().reason == "checkpoint"
        with vm.snapshot() as snap:
            p = snap.save(d / "counter.kvmsnap")
            facts = dict(snap.info(), packed=snap.to_bytes())
    return p, facts


def fields(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in re.findall(r"^([a-z0-9 ]+):[ \t]+(.+)$", out, flags=re.M)}


def test_info_prints_header_and_sections(saved, capsys):
    p, facts = saved
    assert cli.main(["snapshot", "info", str(p)]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    f = fields(cap.out)
    st = os.stat(p)
    with Snapshot.load(p) as s:
        stored = s.stored_bytes
    assert f["file"] == str(p)
    assert f["version"] == "1.0"
    assert f["arch"] == "x86_64"
    assert f["guest"] == "counter"
    assert f["memory"] == "32 MiB (33554432 bytes, 8192 pages)"
    assert f["vcpus"] == "2"
    assert f["created"] == facts["created_at"]
    assert f["layout"].startswith("full")
    assert f["present pages"].startswith(f"{facts['present_pages']} of 8192 ")
    assert f["stored bytes"].startswith(f"{stored} (") and f"file size {st.st_size}" in f["stored bytes"]
    assert stored == st.st_blocks * 512
    raw = p.read_bytes()[:4096]
    assert f["header crc32c"] == f"0x{C.u32(raw, C.OFF['header_crc32c']):08x} ok"
    # The section table, one row per section: index, kind, offset, bytes, CRC, status.
    rows = re.findall(r"^\s+(\d)\s+(STATE|MEMORY)\s+(\d+)\s+(\d+)\s+(0x[0-9a-f]{8})\s+(\S+)$", cap.out, flags=re.M)
    expect = [(str(s.index), {1: "STATE", 2: "MEMORY"}[s.kind], str(s.offset), str(s.bytes), f"0x{s.crc:08x}", "ok") for s in C.sections(raw)]
    assert rows == expect
    assert rows[1][3] == str(32 << 20)  # full layout: MEMORY is all of guest memory


def test_info_json(saved, capsys):
    p, facts = saved
    assert cli.main(["snapshot", "info", "--json", str(p)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["version"], d["arch"], d["layout"], d["guest"], d["vcpus"]) == ("1.0", "x86_64", "full", "counter", 2)
    assert (d["memory_bytes"], d["present_pages"], d["created_unix_ns"]) == (
        32 << 20, facts["present_pages"], facts["created_unix_ns"]
    )
    assert d["file_bytes"] == os.stat(p).st_size and d["header_status"] == "ok"
    assert [(s["kind"], s["status"]) for s in d["sections"]] == [("STATE", "ok"), ("MEMORY", "ok")]


def test_info_of_a_packed_file(saved, tmp_path, capsys):
    _, facts = saved
    q = tmp_path / "packed.bin"
    q.write_bytes(facts["packed"])
    assert cli.main(["snapshot", "info", str(q)]) == 0
    out = capsys.readouterr().out
    assert fields(out)["layout"].startswith("packed")
    assert re.search(rf"^\s+1\s+MEMORY\s+\d+\s+{facts['present_pages'] * 4096}\s", out, flags=re.M)


def test_info_of_a_corrupt_file_fails_with_the_reason(saved, tmp_path, capsys):
    p, _ = saved
    raw = bytearray(p.read_bytes())
    st, mem = C.sections(raw)
    raw[st.offset + 100] ^= 0x01
    bad = tmp_path / "bad.kvmsnap"
    bad.write_bytes(raw)
    assert cli.main(["snapshot", "info", str(bad)]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert f"{bad}: snapshot: checksum mismatch in section STATE" in cap.err


@pytest.mark.parametrize(
    "make,reason",
    [
        pytest.param(lambda d: d, "is not a regular file", id="directory"),
        pytest.param(lambda d: Path("/dev/null"), "is not a regular file", id="dev-null"),
        pytest.param(lambda d: d / "missing", "No such file", id="missing"),
        pytest.param(lambda d: (d / "t").write_bytes(b"KVMLSNAP") and d / "t", "truncated: 8 bytes", id="truncated"),
    ],
)
def test_info_refuses_what_is_not_a_snapshot(tmp_path, capsys, make, reason):
    path = make(tmp_path)
    assert cli.main(["snapshot", "info", str(path)]) == 1
    assert reason in capsys.readouterr().err


def test_info_via_python_dash_m(saved, tmp_path):
    p, _ = saved
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "kvmlab", "snapshot", "info", str(p)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "version:" in r.stdout and "MEMORY" in r.stdout
    raw = bytearray(p.read_bytes())
    raw[C.OFF["magic"]] ^= 0xFF
    bad = tmp_path / "bad.kvmsnap"
    bad.write_bytes(raw)
    r = subprocess.run(
        [sys.executable, "-m", "kvmlab", "snapshot", "info", str(bad)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert r.returncode == 1 and "bad magic" in r.stderr and r.stdout == ""


def test_snapshot_usage_errors(capsys):
    for argv in (["snapshot"], ["snapshot", "info"], ["snapshot", "nope"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_existing_commands_and_plugin_slot_are_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"doctor", "demo", "snapshot"} <= set(sub.choices)
    # The intended plug-ins, the benchmarks and the campaign command, each
    # added by its own module's add_parser: not the stub that stands in for a
    # module that failed to import (test_broken_plugin_does_not_break_the_cli).
    assert cli.PLUGIN_MODULES == ("kvmlab.bench", "kvmlab.campaign")
    for command in ("bench", "campaign"):
        assert "unavailable" not in (sub.choices[command].description or ""), sub.choices[command].description
    assert sub.choices["campaign"].get_default("func").__module__ == "kvmlab.campaign"
    assert "restore" in next(a for a in sub.choices["bench"]._actions if a.dest == "bench_command").choices


def test_broken_plugin_does_not_break_the_cli(monkeypatch, tmp_path, capsys):
    """A plug-in module that fails to import still gets its command (which
    reports the failure); the other commands keep working."""
    pkg = tmp_path / "kvmlab_fake_plugin.py"
    pkg.write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("kvmlab_fake_plugin",))
    parser = cli.build_parser()
    args = parser.parse_args(["kvmlab_fake_plugin"])
    assert args.func(args) == 1
    assert "half-written module" in capsys.readouterr().err
    args = parser.parse_args(["snapshot", "info", "x"])
    assert args.func is cli.cmd_snapshot_info


def test_working_plugin_adds_its_command(monkeypatch, tmp_path):
    (tmp_path / "kvmlab_ok_plugin.py").write_text(
        "def add_parser(sub):\n"
        "    p = sub.add_parser('okcmd', help='test plug-in')\n"
        "    p.add_argument('--n', type=int, default=3)\n"
        "    p.set_defaults(func=lambda args: args.n)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("kvmlab_ok_plugin",))
    assert cli.main(["okcmd", "--n", "7"]) == 7
