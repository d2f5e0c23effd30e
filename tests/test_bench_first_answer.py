"""kvmlab bench first-answer (issue 14 item 4): its verdicts from synthetic
figures, and a smoke run of every path on KVM (QEMU through the fake QMP peer
of test_bench_smoke). No measured figure is checked: a benchmark is not a test."""

from __future__ import annotations

import json
import sys

import pytest

import kvmlab.bench as bench
from kvmlab import cli
from kvmlab.bench import report, targets
from kvmlab.bench.first_answer import FIRST_KEYS, FIRST_METRICS, FIRST_PATH_LABELS
from kvmlab.bench.results import Part
from kvmlab.errors import ConfigError
from test_bench_smoke import FAKE_QEMU, _synthetic_results


def _part(medians: dict[tuple[str, str], float]) -> Part:
    recs = [{"memory_mib": 256, "density": "sparse", "path": path, "strategy": strategy, "i": i, "answer_ns": x}
            for (path, strategy), med in medians.items() for i, x in enumerate((med * 0.9, med, med * 1.2))]
    return Part("first_answer", FIRST_KEYS, FIRST_METRICS, recs)


def test_first_answer_verdicts_per_cell():
    part = _part({("prepared-warmup", "map"): 100, ("prepared", "map"): 150, ("warm-call", "map"): 60,
                  ("pooled", "map"): 600, ("unpooled", "map"): 3000, ("qemu-prestarted", "-"): 16_000,
                  ("qemu-cold", "-"): 56_000, ("prepared-warmup", "copy"): 200, ("warm-call", "copy"): 60,
                  ("pooled", "copy"): 500})
    vs = {(v["target"], v["strategy"]): v for v in targets.first_answer_verdicts(part.summary())}
    assert len(vs) == 6  # three targets for each strategy of the cell
    floor = vs["first_answer_floor", "map"]
    assert floor["value"] == pytest.approx(100 / 60) and floor["met"] is True and "2.50x" in floor["also"]
    assert vs["first_answer_floor", "copy"]["met"] is False  # 200 / 60
    assert vs["first_answer_pool", "map"]["value"] == pytest.approx(6.0) and vs["first_answer_pool", "map"]["met"]
    assert vs["first_answer_pool", "copy"]["met"] is False  # 2.5x
    q = vs["first_answer_qemu", "map"]
    assert q["value"] == pytest.approx(160.0) and q["met"] is True and "560" in q["also"]  # the cold one beside
    # Without QEMU the target is reported, not judged, with the reason.
    part = _part({("prepared-warmup", "map"): 100, ("warm-call", "map"): 60, ("pooled", "map"): 600})
    v = [v for v in targets.first_answer_verdicts(part.summary(), {"qemu": "absent here"})
         if v["target"] == "first_answer_qemu"]
    assert v[0]["met"] is None and "absent here" in v[0]["note"]


def test_readme_headline_uses_the_prestarted_qemu_and_shows_first_answer_per_path():
    """The headline's QEMU ratio is against the pre-started QEMU with the cold
    one beside it, and it has a restore -> first answer row per path, each
    against the warm-call floor (issue 14 item 4)."""
    part = _part({("prepared-warmup", "map"): 100, ("prepared", "map"): 150, ("warm-call", "map"): 50,
                  ("pooled", "map"): 600, ("unpooled", "map"): 3000, ("qemu-prestarted", "-"): 16_000,
                  ("qemu-cold", "-"): 56_000})
    res = _synthetic_results()
    res.parts["first_answer"] = part
    res.verdicts += targets.first_answer_verdicts(part.summary())
    rows = {r.split("|")[1].strip(): r.split("|")[2].strip() for r in report.headline(res).splitlines()[2:] if "|" in r}
    assert rows["restore -> first answer, unpooled, map (/ floor)"] == "3 µs (60.00x)"
    assert rows["restore -> first answer, pooled shell, map (/ floor)"] == "600 ns (12.00x)"
    assert rows["restore -> first answer, prepared, map (/ floor)"] == "150 ns (3.00x)"
    assert rows["restore -> first answer, prepared + warmup, map (/ floor)"] == "100 ns (2.00x)"
    assert rows["restore -> first answer, warm call (the floor), map"] == "50 ns"
    assert rows["QEMU pre-started (migrate-incoming to running); cold"] == "16 µs; 56 µs"
    assert rows["first answer: pre-started QEMU / prepared + warmup (target ≥ 100x)"] == "160.00x (met); cold 560.00x"
    assert rows["first answer: pooled shell / prepared + warmup (target ≥ 4x)"] == "6.00x (met)"


@pytest.mark.kvm
def test_bench_first_answer_smoke(tmp_path):
    fake = tmp_path / "qemu-fake"
    fake.write_text(FAKE_QEMU.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    res = bench.bench_first_answer([16], dense=False, n=2, warmup=0, qemu_n=1, qemu=str(fake))
    df = res.frame()
    assert set(df["path"]) == set(FIRST_PATH_LABELS)
    kv = df[~df["path"].str.startswith("qemu")]
    assert len(kv) == 2 * 5 * 2  # n x kvmlab paths x strategies
    assert (kv["answer_ns"] > 0).all()
    prepared = kv[kv["path"].str.startswith("prepared")]
    assert set(prepared["took"]) == {"prepared"}  # every prepared path took a prepared VM
    assert set(kv[kv["path"] == "pooled"]["took"]) <= {"copy", "map"}
    assert len(res.verdicts) == 3 * 2 and all(v["met"] in (True, False) for v in res.verdicts)
    assert "Restore to first answer" in bench.text(res)
    assert "first_answer" in report.plots(res)
    # A saved run reads back with every record.
    assert len(bench.load_results(res.save(tmp_path / "r.json"))) == len(df)


@pytest.mark.kvm
def test_first_answer_cli_and_arguments(tmp_path, capsys):
    out = tmp_path / "fa.json"
    rc = cli.main(["bench", "first-answer", "--memory-mib", "16", "--n", "1", "--warmup", "0", "--no-dense",
                   "--no-qemu", "--quiet", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "first-answer" and "qemu" in doc["skipped"]
    assert "--no-qemu" in doc["command"]
    for bad in (lambda: bench.bench_first_answer([7]), lambda: bench.bench_first_answer([16], n=0)):
        with pytest.raises(ConfigError):
            bad()
