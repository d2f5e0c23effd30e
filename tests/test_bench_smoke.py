"""Smoke tests of ``kvmlab bench reset``, ``bench fork`` and ``bench all``
(kvmlab/bench.py, benchmarks/): they run with tiny repetitions and write
well-formed JSON / Markdown / PNG. No figure is checked: a benchmark is not a
test. QEMU and unicorn rows must skip cleanly when those are absent."""

from __future__ import annotations

import json
import math
import struct

import pytest

import kvmlab.bench as bench
from kvmlab import cli


def test_stats_and_crossover():
    s = bench.stats([3, 1, 2, 10])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1, 10, 4)
    assert math.isnan(bench.stats([])["median"])
    rows = [
        {"iterations": 1, "kvmlab": {"median": 100}, "unicorn": {"median": 10}},
        {"iterations": 100, "kvmlab": {"median": 100}, "unicorn": {"median": 1000}},
    ]
    cx = bench.crossover(rows)
    assert cx["n"] == 100 and 1 < cx["estimate"] < 100


def test_cycle_code_and_pvh_elf():
    code = bench.cycle_code(7)
    assert code[bench.CYCLE_OUT_OFFSET] == 0xEF and int.from_bytes(code[11:15], "little") == 7
    assert bench.cycle_expected(10, 2) == [55, 55]
    from benchmarks.qemu import XEN_ELFNOTE_PHYS32_ENTRY, pvh_elf

    elf = pvh_elf(123)
    assert elf[:4] == b"\x7fELF" and elf[4] == 1  # ELF32
    entry = struct.unpack_from("<I", elf, 24)[0]
    phoff, phnum = struct.unpack_from("<I", elf, 28)[0], struct.unpack_from("<H", elf, 44)[0]
    types = [struct.unpack_from("<I", elf, phoff + 32 * i)[0] for i in range(phnum)]
    assert types == [1, 4]  # PT_LOAD, PT_NOTE
    note_off = struct.unpack_from("<I", elf, phoff + 32 + 4)[0]
    namesz, descsz, ntype = struct.unpack_from("<III", elf, note_off)
    assert (namesz, descsz, ntype) == (4, 4, XEN_ELFNOTE_PHYS32_ENTRY)
    assert elf[note_off + 12:note_off + 16] == b"Xen\0"
    assert struct.unpack_from("<I", elf, note_off + 16)[0] == entry
    assert int.from_bytes(elf[entry - 0x100000 + 7:entry - 0x100000 + 11], "little") == 123


def test_unicorn_cycle_computes_the_expected_words():
    pytest.importorskip("unicorn")
    uc = bench.UnicornCycle(3, 16)
    uc.run((10).to_bytes(8, "little"))
    assert uc.words() == bench.cycle_expected(10, 3)
    uc.reset()
    assert uc.words() == [0, 0, 0]


@pytest.mark.kvm
def test_bench_reset_smoke(tmp_path, capsys):
    out = tmp_path / "reset.json"
    rc = bench.main([
        "reset", "--dirty-pages", "1,4", "--memory-mib", "16", "--n", "2", "--warmup", "0",
        "--cycle-iterations", "1,100", "--cycle-batches", "1", "--cycle-memory-mib", "16", "--json", str(out), "--quiet",
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "reset/floor" in text and "crossover" in text
    doc = json.loads(out.read_text())
    rows = doc["reset"]["rows"]
    assert len(rows) == 2 * len(bench.RESET_CONFIGS)
    for r in rows:
        assert r["bad_runs"] == 0
        assert r["reset"]["n"] == 2 and r["floor"]["n"] == 2
        assert r["dirty_pages"] >= r["dirty_pages_target"]
    cyc = doc["cycle"]["rows"]
    assert [r["iterations"] for r in cyc] == [1, 100]
    assert all(r["correct_kvmlab"] for r in cyc)
    if doc["cycle"]["unicorn_skipped"] is None:
        assert all(r["correct_unicorn"] for r in cyc)


@pytest.mark.kvm
def test_bench_fork_smoke(tmp_path, capsys):
    out = tmp_path / "fork.json"
    rc = bench.main(["fork", "--n", "5", "--reps", "1", "--memory-mib", "16", "--json", str(out), "--quiet"])
    assert rc == 0
    assert "fork density" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["fork"]["rows"]
    assert row["n"] == 5 and row["error"] is None and row["ready"]["median"] > 0


@pytest.mark.kvm
def test_bench_age_smoke_and_plot(tmp_path, capsys):
    from matplotlib.figure import Figure

    from kvmlab import plot

    out = tmp_path / "age.json"
    rc = bench.main(["age", "--ages-ms", "5,0", "--n", "2", "--warmup", "0", "--memory-mib", "16",
                     "--json", str(out), "--quiet"])
    assert rc == 0
    assert "into a fresh shell that waited" in capsys.readouterr().out
    rows = json.loads(out.read_text())["age"]["rows"]
    assert [r["age_ms"] for r in rows] == [0, 5]  # sorted; ratios are to the first
    assert rows[0]["total_ratio"] == 1.0
    for r in rows:
        assert r["total"]["n"] == 2 and r["total"]["min"] >= r["memory"]["min"] > 0
    fig = plot.floor_vs_shell_age(rows)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3
    assert bench.main(["age", "--ages-ms", "-1"]) == 2
    assert bench.main(["age", "--n", "0"]) == 2


def test_bench_all_is_a_cli_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "all", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    import benchmarks

    with pytest.raises(SystemExit) as e:
        benchmarks.main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def _check_outputs(out, pngs):
    doc = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert "## Restore" in md and "## Targets" in md
    assert {p.name for p in out.glob("*.png")} == pngs
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return doc, md


@pytest.mark.kvm
@pytest.mark.slow
def test_bench_all_quick(tmp_path, capsys):
    out = tmp_path / "all"
    rc = cli.main(["bench", "all", "--quick", "--memory-mib", "16", "--fork-n", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    doc, md = _check_outputs(out, {"restore.png", "reset.png", "cycle.png", "fork.png"})
    assert "## Restore" in capsys.readouterr().out
    assert [c["case"] for c in doc["cases"]] == ["16 MiB sparse", "16 MiB dense"]
    for c in doc["cases"]:
        for path, st in c["paths"].items():
            assert st["n"] == 5 and st["median"] > 0, path
        for peer in ("qemu", "unicorn"):
            assert ("skipped" in c[peer]) or c[peer]["median"] > 0
    assert doc["targets"] and doc["errors"] == {}


@pytest.mark.kvm
def test_bench_all_skips_absent_peers(tmp_path, monkeypatch):
    import benchmarks

    monkeypatch.setattr(bench, "unicorn_available", lambda: "unicorn is not installed (test); pip install unicorn")
    out = tmp_path / "skip"
    res = benchmarks.run_all(out, quick=True, memory_mib=[16], n=1, qemu="/nonexistent/qemu-system-x86_64",
                             skip=["reset", "cycle", "fork"], quiet=True)
    assert "apt-get install qemu-system-x86" in res["skipped"]["qemu"]
    assert "pip install unicorn" in res["skipped"]["unicorn"]
    doc, md = _check_outputs(out, {"restore.png"})
    assert "skipped" in md and "apt-get install qemu-system-x86" in md
    for c in doc["cases"]:
        assert "skipped" in c["qemu"] and "skipped" in c["unicorn"]
