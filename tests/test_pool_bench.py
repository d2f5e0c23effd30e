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
    assert "host:" in text and "p50/p90/p99" in text and "pooled/unpooled" in text and "pooled/floor-idle" in text
    doc = json.loads(out.read_text())
    paths = {"pooled", "unpooled"} | ({"floor", "floor-idle"} if doc["config"]["floor"] else set())
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


def test_floor_into_an_idle_pooled_shell_keeps_the_accounting(tmp_path):
    """``floor_restore(snap, strategy, pool)`` takes an idle shell of ``pool``
    (kvmlab_bench_pool_take_shell), measures the bare restore into it and
    hands the shell back: the pool's stats end where a restore+release would."""
    from kvmlab import BusyError, ClosedError, PoolConfig, PoolExhaustedError, RestorePool, Snapshot, Vm, VmConfig

    cfg = VmConfig(memory_mib=16)
    with Vm.boot("counter", cfg, args={"steps": 4, "checkpoint_at": 2}) as vm:
        vm.run()
        vm.snapshot().save(tmp_path / "c.snap")
    with Snapshot.load(tmp_path / "c.snap") as snap:
        with RestorePool(cfg, PoolConfig(min_size=1, max_size=2)) as pool:
            for strategy in ("copy", "map"):
                call_ns, times = bench.floor_restore(snap, strategy, pool)
                assert call_ns >= times["total_ns"] == times["memory_ns"] + times["vcpu_ns"] + times["devices_ns"] > 0
                assert times["mapped"] == (strategy == "map")
            bench._wait_settled(pool)
            s = pool.stats()
            assert (s.in_use, s.idle, s.restores, s.hits) == (0, 1, 0, 0)
            assert s.created - s.destroyed == 1 and s.destroyed == 2  # the two used shells
        with RestorePool(cfg, PoolConfig(min_size=0, max_size=1)) as empty:
            with pytest.raises(BusyError, match="no idle shell; warm it first"):
                bench.floor_restore(snap, "copy", empty)
            assert empty.stats().in_use == 0
        with pytest.raises(ClosedError):
            bench.floor_restore(snap, "copy", empty)
        with RestorePool(cfg, PoolConfig(min_size=1, max_size=2, max_in_use=1)) as capped:
            with capped.restore_snapshot(snap):
                bench._wait_settled(capped)
                with pytest.raises(PoolExhaustedError, match="max_in_use=1"):
                    bench.floor_restore(snap, "copy", capped)
                assert capped.stats().in_use == 1
        call_ns, times = bench.floor_restore(snap, "copy")  # a fresh shell, no pool
        assert times["total_ns"] > 0
