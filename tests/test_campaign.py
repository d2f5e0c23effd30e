"""Campaigns on Dask (kvmlab.distributed) against real KVM: a LocalCluster of two
worker processes runs the built-in parser guest's inputs; results must match
the parser's specification (kvmlab.guests.parser_outcome, computed in Python)
and a plain local reset_loop; planted crashes and hangs are found; a worker
killed mid-run or a host failure in one batch changes nothing else.

Bounded: one cluster for the module; hang inputs use a short run timeout."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from conftest import MiB
from kvmlab import ConfigError, GuestCrashError, Snapshot, Vm, VmConfig, distributed
from kvmlab.guests import parser_outcome

pytestmark = pytest.mark.kvm

MEMORY_MIB = 16
#: A hang costs this much; a normal input takes well under a millisecond.
TIMEOUT_S = 0.4
#: Columns that must not depend on where or when an input ran. (dirty_pages
#: does: a VM's first run also dirties the page-table page whose dirty bit
#: the CPU sets; later runs find it cached in the TLB.)
STABLE = ["input_index", "reason", "exit_code", "checkpoint_tag", "console", "message",
          *(f"crash_{r}" for r in distributed.CRASH_REGISTERS)]


def record(kind: int, payload: bytes) -> bytes:
    return bytes([kind, len(payload)]) + payload


def make_inputs(n: int, seed: int, hangs: int = 2, crashes: int = 5) -> list[bytes]:
    """Random record streams (some cut short), with planted crashes and hangs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        recs = b"".join(record(rng.choice([0x01, 0x02, 0x7F, 0x3C, 0x10]), rng.randbytes(rng.randint(1, 32)))
                        for _ in range(rng.randint(0, 6)))
        out.append(recs[: rng.randint(0, len(recs))] if rng.random() < 0.2 else recs)
    for i in rng.sample(range(n), crashes):
        out[i] = record(0x01, b"ok") + record(0x7F, rng.randbytes(rng.randint(33, 255)))
    for i in rng.sample(range(n), hangs):
        out[i] = record(0x3C, b"")
    return out


def expected(inputs: list[bytes]) -> list[tuple[str, int | None]]:
    return [parser_outcome(x) for x in inputs]


def outcomes(df) -> list[tuple[str, int | None]]:
    return [(r, None if c is None or c != c else int(c)) for r, c in
            zip(df["reason"].astype(str), df["exit_code"].astype(object).where(df["exit_code"].notna(), None))]


@pytest.fixture(scope="module")
def snap():
    s = distributed.parser_snapshot(memory_mib=MEMORY_MIB)
    yield s
    s.close()


@pytest.fixture(scope="module")
def dask():
    return pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster(dask):
    with dask.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster, dask):
    with dask.Client(cluster) as c:
        c.wait_for_workers(2)
        yield c


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(600, seed=1)


@pytest.fixture(scope="module")
def campaign(snap, client, inputs):
    return distributed.run_inputs(snap, inputs, client=client, batch_size=64, run_timeout_s=TIMEOUT_S)


def test_parser_guest_follows_its_rule_in_a_local_reset_loop(snap, inputs):
    """The guest alone (no Dask): the native variable-length loop against the
    parser's specification, input by input."""
    with Vm.restore(snap, resettable=True) as vm:
        local = vm.reset_loop(inputs, input_gpa=distributed.INPUT_GPA, run_timeout_s=TIMEOUT_S, length_prefix=True)
    got = [("crash", None) if r.crashed else (r.reason, r.exit_code if r.reason == "exit" else None) for r in local]
    assert got == expected(inputs)


def test_matches_the_parser_rule(campaign, inputs):
    assert list(campaign.columns) == list(distributed.COLUMNS)
    assert campaign["input_index"].tolist() == list(range(len(inputs)))
    assert outcomes(campaign) == expected(inputs)
    assert campaign["worker"].nunique() == 2  # both workers took batches


def test_matches_a_local_reset_loop(campaign, snap, inputs):
    with Vm.restore(snap, resettable=True) as vm:
        local = vm.reset_loop(inputs, input_gpa=distributed.INPUT_GPA, run_timeout_s=TIMEOUT_S, length_prefix=True)
    assert len(local) == len(inputs)
    for row, r in zip(campaign.itertuples(), local):
        want = "crash" if r.crashed else {"halt": "timeout"}.get(r.reason, r.reason)
        assert row.reason == want, row.input_index
        if want == "exit":
            assert row.exit_code == r.exit_code


def test_planted_crashes_and_hangs_found(campaign, inputs):
    want = expected(inputs)
    crashes = campaign[campaign["reason"] == "crash"]
    hangs = campaign[campaign["reason"] == "timeout"]
    assert sorted(crashes["input_index"]) == [i for i, w in enumerate(want) if w[0] == "crash"]
    assert sorted(hangs["input_index"]) == [i for i, w in enumerate(want) if w[0] == "timeout"]
    assert len(crashes) >= 5 and len(hangs) == 2
    # The overflow faults on the first byte past guest memory, in the same instruction.
    assert (crashes["crash_cr2"] == MEMORY_MIB * MiB).all()
    assert crashes["crash_rip"].nunique() == 1
    assert crashes["message"].str.contains("triple fault").all()
    assert (hangs["run_ns"] >= TIMEOUT_S * 1e9 * 0.9).all()


def test_replay_of_a_crash_on_a_fresh_vm(campaign, snap, inputs):
    row = campaign[campaign["reason"] == "crash"].iloc[0]
    data = inputs[int(row["input_index"])]
    with Vm.restore(snap) as vm:
        vm.write_memory(distributed.INPUT_GPA, len(data).to_bytes(4, "little") + data)
        with pytest.raises(GuestCrashError):
            vm.run(timeout_s=5)
        regs = vm.registers(0)
    for r in distributed.CRASH_REGISTERS:
        assert regs[r] == row[f"crash_{r}"], r


def test_results_equal_the_in_process_run(campaign, snap, inputs):
    local = distributed.local_run(snap, inputs, batch_size=64, run_timeout_s=TIMEOUT_S)
    assert local[STABLE].equals(campaign[STABLE])


def test_console_is_kept_per_input_and_a_path_works(client, tmp_path):
    # counter resumed from its checkpoint prints its last step and "done"; the
    # input goes where counter does not look.
    with Vm.boot("counter", VmConfig(memory_mib=MEMORY_MIB), args={"steps": 2, "checkpoint_at": 1}) as vm:
        assert vm.run(timeout_s=10).reason == "checkpoint"
        path = vm.snapshot().save(tmp_path / "counter.kvmsnap")
    with Snapshot.load(path) as snap, Vm.restore(snap) as ref:
        want = ref.run(timeout_s=10).console
    assert "step 2 checksum" in want and len(want) <= distributed.CONSOLE_BYTES
    df = distributed.run_inputs(path, [b"", b"abc"], client=client, input_gpa=8 * MiB)
    assert df["console"].tolist() == [want, want]
    assert df["reason"].tolist() == ["exit", "exit"]


def test_map_vms_each_call_sees_the_snapshot(snap, client):
    probe = distributed.INPUT_GPA + 0x10000

    def fn(vm, item):  # runs on a worker (pickled by value: defined in a test)
        before = vm.read_memory(probe, 1)[0]
        vm.write_memory(probe, bytes([item]))
        data = bytes([1, 1, item])
        vm.write_memory(distributed.INPUT_GPA, len(data).to_bytes(4, "little") + data)
        return before, vm.run(timeout_s=5).exit_code

    got = distributed.map_vms(snap, fn, list(range(1, 40)), client=client, batch_size=8)
    assert got == [(0, 1)] * 39  # never sees a previous call's write

    def bad(vm, item):
        if item == 3:
            raise ValueError("item 3")
        return item

    with pytest.raises(ValueError):
        distributed.map_vms(snap, bad, range(10), client=client, batch_size=2)


def test_host_failure_in_a_batch_gives_error_rows(client):
    # A snapshot no worker has yet: the next VM each worker makes is its first.
    with distributed.parser_snapshot(memory_mib=MEMORY_MIB + 2) as fresh:
        victim = sorted(client.scheduler_info()["workers"])[0]
        from kvmlab import _ffi

        def arm():  # the core's test switch (testing export group): the next VM creation fails
            return _ffi.testing.kvmlab_fault_inject(_ffi.enum_values("kvmlab_fault_site")["create_vm"], 0)

        assert client.run(arm, workers=[victim]) == {victim: 0}
        inputs = make_inputs(256, seed=2, hangs=0)
        df = distributed.run_inputs(fresh, inputs, client=client, batch_size=32, run_timeout_s=TIMEOUT_S)
    bad = df[df["reason"] == "error"]
    assert len(bad) == 32 and bad["input_index"].iloc[0] % 32 == 0
    assert bad["message"].str.startswith("KvmError:").all()  # the error class names the failure
    good = df[df["reason"] != "error"]
    assert outcomes(good) == [expected(inputs)[i] for i in good["input_index"]]


def test_killed_worker_changes_nothing(snap, client, inputs, campaign):
    # Batches that each hold a hang take >= TIMEOUT_S: the run lasts long enough to kill a worker in it.
    slow = [x if i % 50 else record(0x3C, b"") for i, x in enumerate(inputs)]
    pids = client.run(os.getpid)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("df", distributed.run_inputs(
        snap, slow, client=client, batch_size=50, run_timeout_s=TIMEOUT_S)))
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if any("kvmlab-batch" in str(k) for k in keys)]
        done = sum(1 for k in client.who_has() if "kvmlab-batch" in str(k))
        if busy and done >= 1:
            break
        time.sleep(0.02)
    victim = busy[0]
    os.kill(pids[victim], signal.SIGKILL)
    killed_mid_run = runner.is_alive()
    runner.join(timeout=120)
    assert killed_mid_run and not runner.is_alive()
    df = result["df"]
    hang = df["input_index"] % 50 == 0
    assert (df.loc[hang, "reason"] == "timeout").all()
    # Every other row as in the undisturbed campaign of the same inputs.
    assert df.loc[~hang, STABLE].equals(campaign.loc[~hang, STABLE])
    assert victim not in set(client.scheduler_info()["workers"]) or pids[victim] not in client.run(os.getpid).values()


def test_local_cluster_pins_each_worker_to_a_cpu(snap, inputs, campaign):
    """kvmlab's LocalCluster for campaigns (run_inputs without a client, the
    benchmark): pinned, worker i on the i-th CPU, every thread; Dask's worker
    profiler off; the same rows as any cluster. Unpinned by default while a
    CPU is spare."""
    def placement(dask_worker):
        import dask

        threads = os.listdir("/proc/self/task")
        return (int(dask_worker.name), sorted({c for t in threads for c in os.sched_getaffinity(int(t))}),
                dask.config.get("distributed.worker.profile.enabled"))

    cpus = sorted(os.sched_getaffinity(0))
    with distributed.local_cluster(2, pin=True, dashboard=False) as c:
        got = sorted(c.run(placement).values())
        df = distributed.run_inputs(snap, inputs, client=c, batch_size=64, run_timeout_s=TIMEOUT_S)
    assert got == [(i, [cpus[i % len(cpus)]], False) for i in range(2)]
    assert df[STABLE].equals(campaign[STABLE])
    if len(cpus) > 1:
        with distributed.local_cluster(1, dashboard=False) as c:
            assert list(c.run(placement).values()) == [(0, cpus, False)]
    with pytest.raises(ConfigError) as e:
        with distributed.local_cluster(0):
            pass
    assert (e.value.check, e.value.argument) == ("argument_range", "n_workers")


def test_bad_arguments_fail_before_any_cluster(snap):
    cases = [
        ({"batch_size": 0}, "argument_range", "batch_size"),
        ({"batch_size": "64"}, "argument_type", "batch_size"),
        ({"max_input_bytes": -1}, "argument_range", "max_input_bytes"),
        ({"input_gpa": MEMORY_MIB * MiB}, "argument_range", "input_gpa"),
        ({"run_timeout_s": 0}, "argument_range", "run_timeout_s"),
        ({"run_timeout_s": None}, "argument_range", "run_timeout_s"),
        ({"inputs": [b"", "text"]}, "argument_type", "inputs"),
        ({"inputs": [bytes(5000)]}, "argument_range", "inputs"),
        ({"inputs": b"one bytes object"}, "argument_type", "inputs"),
        ({"snap": 42}, "argument_type", "snap"),
    ]
    for bad, check, argument in cases:
        kwargs = {"snap": snap, "inputs": [b""], **bad}
        with pytest.raises(ConfigError) as e:
            distributed.run_inputs(kwargs.pop("snap"), kwargs.pop("inputs"), **kwargs)
        assert (e.value.check, e.value.argument) == (check, argument), bad
    with pytest.raises(ConfigError) as e:
        distributed.map_vms(snap, "not callable", [1])
    assert e.value.argument == "fn"


def test_cli_campaign_writes_parquet(snap, cluster, tmp_path, capsys):
    from kvmlab import cli

    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = snap.save(tmp_path / "parser.kvmsnap")
    inputs = make_inputs(100, seed=3, hangs=1)
    (tmp_path / "inputs.txt").write_text("".join(x.hex() + "\n" for x in inputs))
    out = tmp_path / "results.parquet"
    rc = cli.main(["campaign", str(path), str(tmp_path / "inputs.txt"), "--scheduler", cluster.scheduler_address,
                   "--out", str(out), "--batch-size", "16", "--run-timeout-s", str(TIMEOUT_S)])
    assert rc == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == list(distributed.COLUMNS)
    assert outcomes(df) == expected(inputs)
    assert "100 inputs" in capsys.readouterr().out


def test_read_inputs(tmp_path):
    from kvmlab.campaign import read_inputs

    (tmp_path / "hex.txt").write_text("0100\n\nFF\n")
    assert read_inputs(tmp_path / "hex.txt") == [b"\x01\x00", b"", b"\xff"]
    (tmp_path / "b64.txt").write_text("AQA=\n/w==\n")
    assert read_inputs(tmp_path / "b64.txt") == [b"\x01\x00", b"\xff"]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b").write_bytes(b"2")
    (tmp_path / "dir" / "a").write_bytes(b"1")
    assert read_inputs(tmp_path / "dir") == [b"1", b"2"]
    (tmp_path / "bad.txt").write_text("0100\nnot base64!\n")
    for bad in ((tmp_path / "bad.txt", "auto"), (tmp_path / "hex.txt", "rot13"), (tmp_path / "missing", "auto")):
        with pytest.raises(ConfigError):
            read_inputs(*bad)


@pytest.mark.slow
def test_bench_campaign_smoke(tmp_path, capsys):
    """`kvmlab bench campaign` end to end on a tiny run: every path measured,
    the three targets computed (their values are not judged here)."""
    from kvmlab import cli
    from kvmlab.bench import load

    out = tmp_path / "campaign.json"
    rc = cli.main(["bench", "campaign", "--n", "300", "--reps", "1", "--batch-size", "100", "--memory-mib", "16",
                   "--quiet", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for path in ("native loop", "1 worker", "2 workers", "cold worker, first batch", "fresh worker process"):
        assert path in text
    res = load(out)
    verdicts = {v["target"]: v for v in res.verdicts}
    assert set(verdicts) == {"campaign_scale", "campaign_worker", "campaign_cold"}
    assert all(v["value"] > 0 and v["met"] in (True, False) for v in verdicts.values())


def test_native_variable_loop_refuses_bad_offsets(snap):
    """The checks of kvmlab_vm_reset_loop_var (the core refuses, Python does not crash)."""
    import array

    from kvmlab import BoundsError

    with Vm.restore(snap, resettable=True) as vm:
        for offsets in ([0, 2, 1, 3], [0, 1, 4], [0, 1], []):  # decreasing; past the inputs; short; none
            with pytest.raises(ConfigError):
                vm._reset_loop_var(b"abc", array.array("Q", offsets), distributed.INPUT_GPA, 10**9)
        with pytest.raises(ConfigError):  # one input over 1 MiB
            vm._reset_loop_var(bytes((1 << 20) + 1), array.array("Q", [0, (1 << 20) + 1]), distributed.INPUT_GPA, 10**9)
        with pytest.raises(BoundsError):  # the input would end past guest memory
            vm._reset_loop_var(b"abc", array.array("Q", [0, 3]), MEMORY_MIB * MiB - 4, 10**9)
        # Still usable: the empty input exits with 0 records.
        out, _console, done = vm._reset_loop_var(b"", array.array("Q", [0, 0]), distributed.INPUT_GPA, 10**9)
        assert done == 1 and (out[0].reason, out[0].exit_code) == (0, 0)
