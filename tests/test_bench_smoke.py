"""kvmlab.bench: the pure logic (statistics, verdicts, results files, QMP
timeouts) with synthetic figures, and smoke runs of every benchmark with tiny
repetitions on KVM. No measured figure is checked: a benchmark is not a test."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

import kvmlab.bench as bench
from kvmlab import cli
from kvmlab.bench import report, targets
from kvmlab.bench.all import QUICK
from kvmlab.bench.peers import qemu as qp
from kvmlab.bench.reset import CYCLE_OUT_OFFSET, RESET_CONFIGS, crossover, cycle_code, cycle_expected
from kvmlab.bench.restore import RESTORE_KEYS, RESTORE_METRICS
from kvmlab.bench.results import Part, Results
from kvmlab.errors import ConfigError

# -- pure logic ------------------------------------------------------------------------------


def test_one_statistics_structure():
    s = bench.Stats.of([3, 1, 2, 10, None, math.nan])
    assert (s.n, s.median, s.min, s.max) == (4, 2.5, 1, 10)
    assert (s.p50, s.p90, s.p99) == (2, 10, 10)  # nearest rank
    v = bench.Stats.of(range(1, 101))
    assert (v.p50, v.p90, v.p99) == (50, 90, 99)
    assert bench.Stats.of([]).n == 0 and math.isnan(bench.Stats.of([]).median)


def _restore_part(medians: dict[tuple[str, str, str], float], case=(256, "sparse", "counter")) -> Part:
    """A restore Part whose every (path, strategy, metric) has 3 records around the given median."""
    recs = []
    for (path, strategy, metric), med in medians.items():
        for i, x in enumerate((med * 0.9, med, med * 1.5)):
            rec = next((r for r in recs if (r["path"], r["strategy"], r["i"]) == (path, strategy, i)), None)
            if rec is None:
                rec = dict(zip(("memory_mib", "density", "guest"), case), path=path, strategy=strategy, i=i)
                recs.append(rec)
            rec[metric] = x
    return Part("restore", RESTORE_KEYS, RESTORE_METRICS, recs)


def test_restore_verdicts_are_computed_per_cell_on_the_call_against_the_fresh_floor():
    part = _restore_part({
        ("pooled", "map", "call_ns"): 140, ("pooled", "map", "total_ns"): 120, ("pooled", "map", "memory_ns"): 10,
        ("floor", "map", "call_ns"): 100, ("floor", "map", "total_ns"): 100,
        ("floor-idle", "map", "call_ns"): 130,
        ("unpooled", "map", "call_ns"): 700,
        ("pooled", "copy", "call_ns"): 1000, ("pooled", "copy", "total_ns"): 1000, ("pooled", "copy", "memory_ns"): 900,
        ("floor", "copy", "call_ns"): 600, ("floor", "copy", "total_ns"): 600,
        ("unpooled", "copy", "call_ns"): 1100,
    })
    vs = {(v["target"], v["strategy"]): v for v in targets.restore_verdicts(part.summary(), None, {"qemu": "absent"})}
    floor_map = vs["floor", "map"]
    assert floor_map["value"] == pytest.approx(1.4) and floor_map["met"] is True  # 140 / fresh floor 100
    assert "1.08x" in floor_map["also"]  # vs the idle-shell floor, beside it
    assert vs["floor", "copy"]["met"] is False  # 1000 / 600
    assert vs["pool_speedup", "map"]["value"] == pytest.approx(5.0) and vs["pool_speedup", "map"]["met"] is True
    dense_like = vs["pool_speedup", "copy"]  # every cell is judged, the page-copy case too
    assert dense_like["met"] is False and "90%" in dense_like["note"]
    assert vs["qemu", "map"]["met"] is None and "absent" in vs["qemu", "map"]["note"]
    assert vs["python", "map"]["met"] is None  # no native path in this run: said, not dropped
    assert targets.tally(list(vs.values())) == {"total": 7, "met": 2, "missed": 2, "not_judged": 3}


def test_the_qemu_restore_target_is_judged_on_the_prestarted_qemu_with_the_cold_one_beside():
    part = _restore_part({("pooled", "map", "call_ns"): 100, ("floor", "map", "call_ns"): 80})
    peers = {name: Part(name, ["memory_mib", "density"], ["restore_ns"],
                        [{"memory_mib": 256, "density": "sparse", "i": i, "restore_ns": ns} for i in range(3)]).summary()
             for name, ns in (("qemu", 50_000), ("qemu-prestarted", 8_000))}
    v = next(v for v in targets.restore_verdicts(part.summary(), peers) if v["target"] == "qemu")
    assert v["value"] == pytest.approx(80) and v["met"] is False  # 8,000 / 100, not the cold 500x
    assert "500.00x" in v["also"] and "pre-started" in v["claim"]
    failed = targets.restore_verdicts(part.summary(), {}, {}, {"qemu 256 MiB sparse": "QmpError: boom"})
    assert "boom" in next(v for v in failed if v["target"] == "qemu")["note"]  # an error is said, not dropped


def test_reset_verdicts_judge_the_call_and_leave_drop_unjudged_but_counted():
    recs = []
    for label, _s, mode, _src in RESET_CONFIGS:
        for side, call, core in (("reset", 125, 101), ("floor", 100, 100)):
            recs += [{"dirty_pages_target": 16, "config": label, "reset_mode": mode, "side": side, "i": i,
                      "call_ns": call, "total_ns": core} for i in range(3)]
    part = Part("reset", ["dirty_pages_target", "config", "reset_mode", "side"], ["call_ns", "total_ns"], recs)
    vs = targets.reset_verdicts(part.summary())
    assert len(vs) == len(RESET_CONFIGS)
    for v in vs:
        assert v["value"] == pytest.approx(1.25)  # call / floor, not the core's 1.01
        assert v["met"] is (None if "drop" in v["cell"] else True)
    assert targets.tally(vs) == {"total": 4, "met": 3, "missed": 0, "not_judged": 1}


def test_crossover_from_a_cycle_part():
    recs = [{"iterations": n, "side": side, "batch": 0, "cycle_median_ns": t}
            for n, side, t in ((1, "kvmlab", 100), (1, "unicorn", 10), (100, "kvmlab", 100), (100, "unicorn", 1000))]
    cx = crossover(Part("cycle", ["iterations", "side"], ["cycle_median_ns"], recs))
    assert cx["n"] == 100 and 1 < cx["estimate"] < 100


def _synthetic_results(scale: float = 1.0) -> Results:
    part = _restore_part({("pooled", "map", "call_ns"): 100 * scale, ("floor", "map", "call_ns"): 80,
                          ("unpooled", "map", "call_ns"): 500})
    res = Results("restore", parts={"restore": part}, host={"cpu": "test"}, versions={"kvmlab": "0"})
    res.verdicts = targets.restore_verdicts(part.summary())
    return res


def test_results_round_trip_and_compare(tmp_path):
    a, b = _synthetic_results(), _synthetic_results(scale=2.0)
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    doc = json.loads(pa.read_text())
    assert doc["schema_version"] == bench.SCHEMA_VERSION and doc["host"] == {"cpu": "test"}
    df = bench.load_results(pa)
    assert len(df) == len(a.frame()) == 9 and set(df["part"]) == {"restore"}
    assert df.attrs["benchmark"] == "restore" and df.attrs["verdicts"] == json.loads(json.dumps(a.verdicts))
    assert sorted(df["call_ns"]) == sorted(a.frame()["call_ns"])
    cmp = bench.compare(pa, b)
    row = cmp[(cmp["path"] == "pooled") & (cmp["metric"] == "call_ns")].iloc[0]
    assert (row["a"], row["b"], row["ratio"]) == (100, 200, 2.0)
    assert "pooled" in bench.markdown(a) and "| target" in bench.markdown(a)
    assert repr(a) == "<Results restore: parts restore (9); 2 of 4 targets met>"  # short: no records
    assert "<table" in a._repr_html_() and "within 1.5x" in a._repr_html_()


def test_results_files_that_cannot_be_read(tmp_path):
    bad = tmp_path / "bad.json"
    for content in ("not json", json.dumps({"x": 1}), json.dumps({"schema_version": 99, "parts": {}, "benchmark": "x"})):
        bad.write_text(content)
        with pytest.raises(ConfigError):
            bench.load_results(bad)
    with pytest.raises(ConfigError):
        bench.load_results(tmp_path / "missing.json")
    with pytest.raises(ConfigError):
        bench.compare(1, 2)


def test_docs_generator_rewrites_only_its_block(tmp_path):
    res = _synthetic_results()
    res.save(tmp_path / "r.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_START}\nold table\n{report.README_END}\nafter\n")
    report.write_docs(tmp_path / "r.json", readme, tmp_path / "docs" / "performance.md")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "pooled restore / floor, map (target ≤ 1.5x)" in text and "1.25x (met)" in text
    perf = (tmp_path / "docs" / "performance.md").read_text()
    assert perf.startswith("# Performance") and "r.json" in perf and "## Targets" in perf
    readme.write_text("no markers")
    with pytest.raises(ConfigError):
        report.write_docs(tmp_path / "r.json", readme, tmp_path / "p.md")
    Results("age").save(tmp_path / "age.json")  # a run without restores cannot make the headline
    with pytest.raises(ConfigError):
        report.write_docs(tmp_path / "age.json", readme, tmp_path / "p.md")


def test_cycle_code_and_pvh_elf():
    code = cycle_code(7)
    assert code[CYCLE_OUT_OFFSET] == 0xEF and int.from_bytes(code[11:15], "little") == 7
    assert cycle_expected(10, 2) == [55, 55]
    elf = qp.pvh_elf(123)
    assert elf[:4] == b"\x7fELF" and elf[4] == 1  # ELF32
    entry = struct.unpack_from("<I", elf, 24)[0]
    phoff, phnum = struct.unpack_from("<I", elf, 28)[0], struct.unpack_from("<H", elf, 44)[0]
    assert [struct.unpack_from("<I", elf, phoff + 32 * i)[0] for i in range(phnum)] == [1, 4]  # PT_LOAD, PT_NOTE
    note_off = struct.unpack_from("<I", elf, phoff + 32 + 4)[0]
    assert struct.unpack_from("<III", elf, note_off) == (4, 4, qp.XEN_ELFNOTE_PHYS32_ENTRY)
    assert elf[note_off + 12:note_off + 16] == b"Xen\0" and struct.unpack_from("<I", elf, note_off + 16)[0] == entry
    assert int.from_bytes(elf[entry - 0x100000 + 7:entry - 0x100000 + 11], "little") == 123


def test_unicorn_cycle_computes_the_expected_words():
    from kvmlab.bench.peers.unicorn import UnicornCycle
    from kvmlab.bench.reset import CYCLE_BASE, CYCLE_DATA, CYCLE_INPUT, CYCLE_STACK

    uc = UnicornCycle(cycle_code(3), 3, 16, CYCLE_BASE, CYCLE_BASE + CYCLE_OUT_OFFSET, CYCLE_STACK, CYCLE_DATA,
                      CYCLE_INPUT)
    assert uc.words(10) == cycle_expected(10, 3)
    assert uc.words() == [0, 0, 0]  # words(10) reset afterwards


# -- peers/qemu: QMP with a timeout, the migrate path quoted ------------------------------------


def test_qmp_read_times_out_on_a_silent_qemu():
    mine, theirs = socket.socketpair()
    with mine, theirs:
        ch = qp.QmpChannel(mine.fileno(), mine.makefile("wb"), timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(qp.QmpTimeoutError):
            ch.cmd("query-status")
        assert 0.25 < time.monotonic() - t0 < 5
        assert theirs.recv(100).startswith(b'{"execute": "query-status"}')
        theirs.sendall(b'{"event": "X"}\n{"return": {"status": "running"}}\n')  # events are skipped
        assert ch.read() == {"return": {"status": "running"}}
        theirs.sendall(b'{"error": {"desc": "no"}}\n')
        # match= on text: QmpError is the QEMU peer harness's RuntimeError (not a KvmlabError), with no check id.
        with pytest.raises(qp.QmpError, match="no"):
            ch.cmd("cont")
        theirs.close()
        with pytest.raises(qp.QmpError, match="closed"):
            ch.read()


FAKE_QEMU = r"""#!PYTHON
import json, subprocess, sys
if sys.argv[1:] == ["--version"]:
    print("QEMU emulator version 0.0 (fake QMP peer)")
    sys.exit(0)
incoming = "-incoming" in sys.argv
status = "paused" if incoming else "running"
def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n"); sys.stdout.flush()
send({"QMP": {"version": {}, "capabilities": []}})
for line in sys.stdin:
    req = json.loads(line)
    name, args = req["execute"], req.get("arguments", {})
    send({"event": "NOISE"})  # events come in between; the peer skips them
    if name == "human-monitor-command":
        send({"return": "RIP=0 HLT=1"})
    elif name == "migrate":
        subprocess.run(["/bin/sh", "-c", args["uri"][len("exec:"):]], input=b"VMSTATE", check=True)
        send({"return": {}})
    elif name == "query-migrate":
        send({"return": {"status": "completed", "ram": {"normal": 3, "duplicate": 7}}})
    elif name == "query-status":
        send({"return": {"status": status}})
    elif name == "cont":
        status = "running"
        send({"return": {}})
    elif name == "quit":
        send({"return": {}})
        break
    else:
        send({"return": {}})
"""


def test_qemu_peer_saves_and_restores_through_qmp(tmp_path):
    """The QEMU peer's whole QMP conversation (boot, halt check, stop, migrate
    to a quoted path, -incoming restore, cont) against a fake QMP peer: QEMU
    itself is not installed by kvmlab."""
    import sys

    fake = tmp_path / "qemu-fake"
    fake.write_text(FAKE_QEMU.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    work = tmp_path / "dir with 'quotes' and spaces"
    work.mkdir()
    peer = qp.QemuPeer(work, str(fake), qmp_timeout_s=10)
    assert "fake QMP peer" in peer.version
    recs = peer.measure(16, "dense", reps=2)
    assert [r["i"] for r in recs] == [0, 1] and all(r["restore_ns"] > 0 for r in recs)
    assert recs[0]["state_bytes"] == len(b"VMSTATE") and recs[0]["fill_pages"] == (16 << 20) // 4096 // 4
    assert list(work.iterdir()) == []  # kernel and state files removed


def test_a_stuck_qemu_fails_its_rows_instead_of_hanging(tmp_path):
    """A QEMU that starts but never speaks QMP: the peer gives up after its
    QMP timeout, kills the process and the error says what happened."""
    fake = tmp_path / "qemu-stuck"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'QEMU emulator version 0 (stuck)' && exit 0\n"
                    "exec sleep 60\n")
    fake.chmod(0o755)
    assert qp.qemu_problem(str(fake)) is None
    peer = qp.QemuPeer(tmp_path, str(fake), qmp_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(qp.QmpTimeoutError):
        peer.measure(16, "sparse", reps=1)
    assert time.monotonic() - t0 < 5
    pid = os.getpid()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert not [c for c in children if b"sleep" in Path(f"/proc/{c}/cmdline").read_bytes()]  # killed, reaped


def test_migrate_uri_quotes_the_path(tmp_path):
    state = tmp_path / "a b; touch $(echo pwned) 'q'.state"
    uri = qp.migrate_uri(state)
    assert uri.startswith("exec:")
    subprocess.run(["/bin/sh", "-c", uri[len("exec:"):]], input=b"STATE", check=True, cwd=tmp_path)  # as QEMU runs it
    assert state.read_bytes() == b"STATE"
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name]


# -- smoke runs on KVM ------------------------------------------------------------------------


def test_bench_subcommands_exist(capsys):
    for sub in ("restore", "first-answer", "reset", "fork", "age", "campaign", "all", "docs"):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", sub, "--help"])
        assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert bench.main(["age", "--ages-ms", "-1"]) == 2
    assert bench.main(["age", "--n", "0"]) == 2
    assert bench.main(["reset", "--dirty-pages", "0"]) == 2
    assert bench.main(["fork", "--reps", "0"]) == 2
    with pytest.raises(ConfigError):
        bench.run_all("/nonexistent/never", skip="everything")


@pytest.mark.parametrize("call", [
    lambda: bench.bench_restore([7]), lambda: bench.bench_restore([16], n=0), lambda: bench.bench_restore([16], strategies=["x"]),
    lambda: bench.bench_restore([16], dense_fraction=0), lambda: bench.bench_reset([0]),
    lambda: bench.bench_reset([1 << 20], memory_mib=16), lambda: bench.bench_reset([1], cycle_pages=5000),
    lambda: bench.bench_fork([0]), lambda: bench.bench_fork([1], reps=0), lambda: bench.bench_age([-1]),
    lambda: bench.bench_age([1], strategy="x"), lambda: bench.run_all("/nonexistent/never", n=0),
])
def test_bad_arguments_are_config_errors_before_any_work(call):
    with pytest.raises(ConfigError):
        call()


@pytest.mark.kvm
def test_bench_reset_smoke(tmp_path, capsys):
    out = tmp_path / "reset.json"
    rc = bench.main(["reset", "--dirty-pages", "1,4", "--memory-mib", "16", "--n", "2", "--warmup", "0",
                     "--cycle-iterations", "1,100", "--cycle-batches", "1", "--cycle-memory-mib", "16",
                     "--json", str(out), "--quiet"])
    assert rc == 0
    assert "Dirty-page reset vs its floor" in capsys.readouterr().out
    res = bench.load(out)
    df = res.frame("reset")
    assert len(df) == 2 * len(RESET_CONFIGS) * 2 * 2  # K x configs x n x (reset, floor)
    assert df["run_ok"].all() and (df["dirty_pages"] >= df["dirty_pages_target"]).all()
    assert len(res.verdicts) == 2 * len(RESET_CONFIGS)
    cyc = res.part("cycle")
    assert set(cyc.frame()["iterations"]) == {1, 100}
    assert all(all(sides.values()) for sides in cyc.notes["correct"].values())


@pytest.mark.kvm
def test_bench_fork_and_age_smoke(tmp_path, capsys):
    fork = bench.bench_fork([3], memory_mib=16, reps=1)
    (row,) = fork.frame().to_dict("records")
    assert row["vms"] == 3 and row["ready_ns"] > 0 and not fork.errors
    age = bench.bench_age([5, 0], n=2, warmup=0, memory_mib=16)
    s = age.summary()
    assert sorted(set(s["age_ms"])) == [0, 5] and (s["n"] == 2).all()
    figs = bench.plots(age)
    assert len(figs["age"].axes[0].lines) == 3
    assert "Restore floor vs shell age" in bench.text(age)


@pytest.mark.kvm
@pytest.mark.slow
def test_bench_all_quick_and_docs(tmp_path, capsys):
    out = tmp_path / "all"
    rc = cli.main(["bench", "all", "--quick", "--memory-mib", "16", "--fork-n", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "## Restore" in capsys.readouterr().out
    assert {p.name for p in out.glob("*.png")} == {"restore.png", "first_answer.png", "reset.png", "cycle.png", "fork.png"}
    assert "## Targets" in (out / "results.md").read_text()
    res = bench.load(out / "results.json")
    kv = res.frame("restore")
    assert set(kv["path"]) == {"pooled", "native", "unpooled", "service", "floor", "floor-idle"}
    assert (kv.groupby(["density", "path", "strategy"]).size() == 5).all()
    if importlib.util.find_spec("unicorn") is not None:  # kvmlab[bench] installs it: measured in every case
        uc = res.frame("unicorn")
        assert "unicorn" not in res.skipped and "unicorn" not in " ".join(res.errors)
        assert uc.groupby("density").size().to_dict() == {"dense": QUICK["unicorn_n"], "sparse": QUICK["unicorn_n"]}
    else:  # absent: skipped, saying how to install it

        assert "unicorn" not in res.parts and "pip install unicorn" in res.skipped["unicorn"]
    assert {"floor", "pool_speedup", "python", "reset", "first_answer_floor", "first_answer_pool",
            "first_answer_qemu"} <= {v["target"] for v in res.verdicts}
    assert not res.errors
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    assert cli.main(["bench", "docs", "--results", str(out / "results.json"), "--readme", str(readme),
                     "--performance", str(tmp_path / "performance.md")]) == 0
    assert "pooled restore, map" in readme.read_text()


@pytest.mark.kvm
def test_bench_all_skips_absent_peers(tmp_path, monkeypatch):
    from kvmlab.bench import all as all_mod

    monkeypatch.setattr(all_mod, "unicorn_available", lambda: "unicorn is not installed (test); pip install unicorn")
    res = bench.run_all(tmp_path, quick=True, memory_mib=[16], n=1, qemu="/nonexistent/qemu-system-x86_64",
                        skip=["reset", "cycle", "fork"], quiet=True)
    assert "apt-get install qemu-system-x86" in res.skipped["qemu"]
    assert "pip install unicorn" in res.skipped["unicorn"]
    assert set(res.parts) == {"restore", "first_answer"}
    md = (tmp_path / "results.md").read_text()
    assert "apt-get install qemu-system-x86" in md and "skipped" in md


@pytest.mark.checkout
def test_readme_performance_is_short_and_generated_from_the_committed_run(monkeypatch):
    """The README's Performance part stays within 40 lines, uses no internal
    labels, and its table (and docs/performance.md) is exactly what
    `kvmlab bench docs` makes of the committed run; before a run is committed
    the block says so."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    readme = Path("README.md").read_text()
    part = readme[readme.index("## Performance"):]
    part = part[:part.find("\n## ", 1) + 1] if "\n## " in part[1:] else part
    assert len(part.strip().splitlines()) <= 40
    assert "4i" not in part and "floor-idle" not in part and "1n." not in part
    block = part[part.index(report.README_START) + len(report.README_START):part.index(report.README_END)].strip()
    results = Path("docs/results/results.json")
    if not results.is_file():
        assert block == "(not generated yet: run the commands below)"
        return
    res = bench.load(results)
    assert block == report.headline(res)
    page = Path("docs/performance.md")
    assert page.read_text() == report.performance_md(res, results, page)
