"""Smoke test of ``kvmlab bench restore`` (kvmlab/bench.py): it runs and
writes well-formed records. The figures themselves are not checked: a
benchmark is not a test."""

import json

import pytest

import kvmlab.bench as bench
from kvmlab import cli

pytestmark = pytest.mark.kvm


def test_percentile():
    v = list(range(1, 101))
    assert (bench.percentile(v, 50), bench.percentile(v, 90), bench.percentile(v, 99)) == (50, 90, 99)
    assert bench.percentile([7], 99) == 7
    assert bench.percentile([], 50) != bench.percentile([], 50)  # NaN


def test_bench_restore_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["restore", "--n", "2", "--warmup", "0", "--memory-mib", "16", "--json", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "host:" in text and "p50/p90/p99" in text and "pooled/unpooled" in text
    doc = json.loads(out.read_text())
    paths = {"pooled", "unpooled"} | ({"floor"} if doc["config"]["floor"] else set())
    assert {r["path"] for r in doc["records"]} == paths
    assert len(doc["records"]) == 2 * 2 * len(paths)  # strategies x n x paths
    for r in doc["records"]:
        assert r["memory_mib"] == 16 and r["strategy"] in ("copy", "map")
        assert r["total_ns"] >= r["memory_ns"] + r["vcpu_ns"] + r["devices_ns"] > 0
        if r["path"] == "pooled":
            assert r["hit"] is True and r["first_run_ns"] > 0
    assert {row["path"] for row in doc["summary"]} == paths


def test_bench_is_a_cli_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "restore", "--help"])
    assert e.value.code == 0
    assert "--memory-mib" in capsys.readouterr().out
    assert bench.main(["restore", "--n", "0"]) == 2
