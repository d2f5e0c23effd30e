"""Smoke test of ``kvmlab bench restore`` and of the restore floor into an
idle pooled shell. The figures themselves are not checked: a benchmark is
not a test."""

import pytest

import kvmlab.bench as bench
from kvmlab.bench import _native  # the floors (the benchmarks' only native entry)

pytestmark = pytest.mark.kvm


def test_bench_restore_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["restore", "--n", "2", "--warmup", "0", "--memory-mib", "16", "--json", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "host:" in text and "p50 / p90 / p99" in text and "Targets" in text
    df = bench.load_results(out)
    paths = {"pooled", "unpooled"} | ({"floor", "floor-idle"} if _native.floors_available() else set())
    assert set(df["path"]) == paths
    assert len(df) == 2 * 2 * len(paths)  # strategies x n x paths
    assert (df["memory_mib"] == 16).all() and set(df["strategy"]) == {"copy", "map"}
    assert (df["total_ns"] >= df["memory_ns"] + df["vcpu_ns"] + df["devices_ns"]).all()
    pooled = df[df["path"] == "pooled"]
    assert pooled["hit"].all() and (pooled["first_run_ns"] > 0).all()
    res = bench.load(out)
    assert {(v["target"], v["strategy"]) for v in res.verdicts} >= {("pool_speedup", "copy"), ("pool_speedup", "map")}
    assert bench.main(["restore", "--n", "0"]) == 2


def test_floor_into_an_idle_pooled_shell_keeps_the_accounting(tmp_path):
    """``restore_floor(snap, strategy, pool)`` takes an idle shell of ``pool``,
    measures the bare restore into it and hands the shell back: the pool's
    stats end where a restore+release would."""
    from kvmlab import BusyError, ClosedError, PoolConfig, PoolExhaustedError, RestorePool, Snapshot, Vm, VmConfig
    from kvmlab.bench.settle import wait_settled

    cfg = VmConfig(memory_mib=16)
    with Vm.boot("counter", cfg, args={"steps": 4, "checkpoint_at": 2}) as vm:
        vm.run()
        vm.snapshot().save(tmp_path / "c.snap")
    with Snapshot.load(tmp_path / "c.snap") as snap:
        with RestorePool(cfg, PoolConfig(min_size=1, max_size=2)) as pool:
            for strategy in ("copy", "map"):
                call_ns, times = _native.restore_floor(snap, strategy, pool)
                assert call_ns >= times["total_ns"] == times["memory_ns"] + times["vcpu_ns"] + times["devices_ns"] > 0
                assert times["mapped"] == (strategy == "map")
            wait_settled(pool)
            s = pool.stats()
            assert (s.in_use, s.idle, s.restores, s.hits) == (0, 1, 0, 0)
            assert s.created - s.destroyed == 1 and s.destroyed == 2  # the two used shells
        with RestorePool(cfg, PoolConfig(min_size=0, max_size=1)) as empty:
            with pytest.raises(BusyError) as e:
                _native.restore_floor(snap, "copy", empty)
            assert e.value.check == "pool_no_idle"
            assert empty.stats().in_use == 0
        with pytest.raises(ClosedError):
            _native.restore_floor(snap, "copy", empty)
        with RestorePool(cfg, PoolConfig(min_size=1, max_size=2, max_in_use=1)) as capped:
            with capped.restore_snapshot(snap):
                wait_settled(capped)
                with pytest.raises(PoolExhaustedError) as e:
                    _native.restore_floor(snap, "copy", capped)
                assert e.value.check == "pool_exhausted"
                assert capped.stats().in_use == 1
        call_ns, times = _native.restore_floor(snap, "copy")  # a fresh shell, no pool
        assert times["total_ns"] > 0
