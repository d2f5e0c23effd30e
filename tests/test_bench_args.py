"""kvmlab.bench entry points: bad arguments are ConfigErrors with a check id
before any work; a failing QEMU cell is recorded, not fatal; host limits are
results but bad arguments are not; nothing leaks on a failure or Ctrl-C."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading

import pytest

import kvmlab.bench as bench
from kvmlab.bench import harness
from kvmlab.bench.peers import qemu as qp
from kvmlab.errors import ConfigError, KvmError, KvmlabMemoryError
from conftest import fault_injected, fd_count
from test_bench_smoke import FAKE_QEMU

# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("call, check, argument", [
    (lambda: bench.bench_restore(64), "argument_type", "memory_mib"),
    (lambda: bench.bench_restore(["64"]), "argument_type", "memory_mib"),
    (lambda: bench.bench_restore([64], n="5"), "argument_type", "n"),
    (lambda: bench.bench_restore([63]), "argument_range", "memory_mib"),
    (lambda: bench.bench_restore([]), "argument_range", "memory_mib"),
    (lambda: bench.bench_restore([64] * 65), "argument_range", "memory_mib"),
    (lambda: bench.bench_restore([64], strategies="copy"), "argument_type", "strategies"),
    (lambda: bench.bench_restore([64], strategies=["x"]), "argument_value", "strategies"),
    (lambda: bench.bench_restore([64], dense_fraction=0), "argument_range", "dense_fraction"),
    (lambda: bench.bench_restore([64], dense_fraction=math.nan), "argument_range", "dense_fraction"),
    (lambda: bench.bench_restore([64], dense=1), "argument_type", "dense"),
    (lambda: bench.bench_restore([64], quiet="no"), "argument_type", "quiet"),
    (lambda: bench.bench_restore([64], command=5), "argument_type", "command"),
    (lambda: bench.bench_fork(5), "argument_type", "ns"),
    (lambda: bench.bench_fork([1], threads=0), "argument_range", "threads"),
    (lambda: bench.bench_fork([1], threads=1.5), "argument_type", "threads"),
    (lambda: bench.bench_fork([1], memory_mib=15), "argument_range", "memory_mib"),
    (lambda: bench.bench_fork([1], reps=0), "argument_range", "reps"),
    (lambda: bench.bench_first_answer([64], n=None), "argument_type", "n"),
    (lambda: bench.bench_first_answer([64], qemu_n=-1), "argument_range", "qemu_n"),
    (lambda: bench.bench_first_answer([64], qemu=5), "argument_type", "qemu"),
    (lambda: bench.bench_reset([1], memory_mib="x"), "argument_type", "memory_mib"),
    (lambda: bench.bench_reset([0]), "argument_range", "dirty_pages"),
    (lambda: bench.bench_reset([1], cycle_iterations=[0]), "argument_range", "cycle_iterations"),
    (lambda: bench.bench_reset([1], cycle_pages=5000), "argument_range", "cycle_pages"),
    (lambda: bench.bench_age(["1"]), "argument_type", "ages_ms"),
    (lambda: bench.bench_age([-1]), "argument_range", "ages_ms"),
    (lambda: bench.bench_age([1], strategy="x"), "argument_value", "strategy"),
    (lambda: bench.bench_campaign("1"), "argument_type", "n"),
    (lambda: bench.bench_campaign(1, memory_mib=63), "argument_range", "memory_mib"),
    (lambda: bench.bench_campaign(1, pin="yes"), "argument_type", "pin"),
])
def test_a_bad_argument_is_a_config_error_with_its_check_and_name(call, check, argument):
    with pytest.raises(ConfigError) as e:
        call()
    assert (e.value.check, e.value.argument) == (check, argument)


@pytest.mark.parametrize("call", [
    lambda: bench.bench_reset([4000], memory_mib=16),  # 16 MiB has 3072 pages above 4 MiB
    lambda: bench.bench_reset([1], cycle_pages=4096, cycle_memory_mib=16),
])
def test_arguments_that_do_not_fit_together_are_a_config_error(call):
    with pytest.raises(ConfigError) as e:
        call()
    assert e.value.check == "bench_arguments"


def test_check_args_checks_every_value_before_the_problems_between_them():
    problems_ran = []
    with pytest.raises(ConfigError) as e:
        harness.check_args("x", lambda: problems_ran.append(1) or {"never": True}, n=(None, harness.REPS))
    assert e.value.check == "argument_type" and not problems_ran  # n < 1 would have been a TypeError
    harness.check_args("x", n=(3, harness.REPS), pin=(None, harness.Arg("bool", optional=True)),
                       sizes=(range(8, 12, 2), harness.MEMORY_SIZES))
    with pytest.raises(ConfigError) as e:
        harness.check_args("x", {"a": False, "b": True}, n=(3, harness.REPS))
    assert e.value.check == "bench_arguments"


# -- guard: one failure is recorded, the rest goes on ------------------------------------------


def test_guard_records_a_failure_and_lets_ctrl_c_through(capsys):
    errors: dict[str, str] = {}
    assert harness.guard(errors, "qemu 16 MiB sparse", lambda: 1 / 0) is None
    assert harness.guard(errors, "ok", lambda: 7) == 7
    assert list(errors) == ["qemu 16 MiB sparse"] and errors["qemu 16 MiB sparse"].startswith("ZeroDivisionError")
    assert "qemu 16 MiB sparse failed" in capsys.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harness.guard(errors, "stop", interrupted)
    assert "stop" not in errors


#: A fake QEMU that fails for 16 MiB guests (it exits at once) and behaves for the others.
FAILING_QEMU = FAKE_QEMU.replace("incoming = ", 'if "16M" in sys.argv:\n    sys.exit("boom: no 16 MiB here")\n'
                                               "incoming = ", 1)


def _fake(tmp_path, text: str, name: str):
    fake = tmp_path / name
    fake.write_text(text.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    return fake


@pytest.mark.kvm
def test_a_failing_qemu_cell_keeps_every_other_figure(tmp_path):
    fake = _fake(tmp_path, FAILING_QEMU, "qemu-fails-16")
    res = bench.bench_first_answer([16, 18], dense=False, n=1, warmup=0, qemu_n=1, qemu=str(fake))
    df = res.frame()
    assert set(df[df["path"].str.startswith("qemu")]["memory_mib"]) == {18}
    kv = df[~df["path"].str.startswith("qemu")]
    assert sorted(kv.groupby("memory_mib").size().items()) == [(16, 10), (18, 10)]  # 5 paths x 2 strategies each
    assert list(res.errors) == ["first-answer qemu 16 MiB sparse"]
    assert "boom" in res.errors["first-answer qemu 16 MiB sparse"]
    assert res.parts["first_answer"].notes["errors"] == {"qemu 16 MiB sparse": res.errors["first-answer qemu 16 MiB sparse"]}
    # The cell's QEMU verdict says why it has no figure: the error, not "no figure".
    notes = [v["note"] for v in res.verdicts if v["target"] == "first_answer_qemu" and v["cell"] == "16 MiB sparse"]
    assert notes and all("boom" in note for note in notes), notes


# -- fork: a host limit is a result, a bad argument is not --------------------------------------


def test_only_host_limits_are_recorded_as_fork_results():
    from kvmlab.bench.fork import _host_limit

    assert _host_limit(ConfigError("too few fds", check="fd_limit"))
    assert _host_limit(KvmlabMemoryError("no memory")) and _host_limit(KvmError("ENOSPC"))
    assert not _host_limit(ConfigError("threads", check="argument_range"))
    assert not _host_limit(RuntimeError("a forked VM answered wrongly"))


@pytest.mark.kvm
def test_fork_part_lets_a_bad_argument_through(tmp_path):
    from kvmlab.bench.fork import fork_part

    with pytest.raises(ConfigError) as e:
        fork_part([1], memory_mib=16, reps=1, threads=0, call=False, tmp_dir=tmp_path)
    assert (e.value.check, e.value.argument) == ("argument_range", "threads")
    assert list(tmp_path.iterdir()) == []


# -- nothing leaks ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_ctrl_c_while_a_floor_shell_waits_frees_the_shell(counter_snap):
    from kvmlab.bench._native import floors_available, restore_floor

    if not floors_available():
        pytest.fail("this native core has no benchmark floors (rebuild: pip install -e .)")
    restore_floor(counter_snap, "copy")  # anything made once per process is made now
    before = fd_count()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            restore_floor(counter_snap, "copy", age_s=20.0)  # busy-waits: the signal lands in the wait
    finally:
        timer.cancel()
    assert fd_count() == before


@pytest.mark.kvm
def test_a_failing_cycle_side_closes_the_side_made_before_it(monkeypatch):
    from kvmlab.bench import reset

    def broken(*_args):
        raise RuntimeError("unicorn failed to start")

    monkeypatch.setattr(reset, "unicorn_available", lambda: None)
    monkeypatch.setattr(reset, "UnicornCycle", broken)
    reset.KvmlabCycle(1, 16).close()  # anything made once per process is made now
    before = fd_count()
    with pytest.raises(RuntimeError, match="unicorn failed") as e:
        reset.cycle_part([1], pages=1, memory_mib=16, batches=1)
    # Counted while the traceback (and the frames' locals) live: a side that
    # was only dropped, not closed, is still open here.
    assert e.traceback and fd_count() == before


#: A fake QEMU whose migration to the file fails (after the file was created).
FAILED_MIGRATION_QEMU = FAKE_QEMU.replace('send({"return": {"status": "completed", "ram": {"normal": 3, "duplicate": 7}}})',
                                          'send({"return": {"status": "failed", "error-desc": "disk full"}})')


def test_a_failed_qemu_save_leaves_no_file(tmp_path):
    assert FAILED_MIGRATION_QEMU != FAKE_QEMU
    fake = _fake(tmp_path, FAILED_MIGRATION_QEMU, "qemu-save-fails")
    work = tmp_path / "work"
    work.mkdir()
    peer = qp.QemuPeer(work, str(fake), qmp_timeout_s=10)
    with pytest.raises(qp.QmpError, match="disk full"):
        peer.measure(16, "sparse", reps=1)
    assert list(work.iterdir()) == []  # neither the kernel nor the partial state


def test_a_stuck_qemu_leaves_no_file(tmp_path):
    fake = _fake(tmp_path, "#!/bin/sh\n[ \"$1\" = --version ] && echo 'QEMU 0 (stuck)' && exit 0\nexec sleep 60\n",
                 "qemu-stuck")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(qp.QmpTimeoutError):
        qp.QemuPeer(work, str(fake), qmp_timeout_s=0.5).save(16, 0.0)
    assert list(work.iterdir()) == []


@pytest.mark.kvm
def test_a_cycle_side_whose_restore_fails_closes_its_snapshot():
    from kvmlab.bench.reset import KvmlabCycle
    from kvmlab.errors import ClosedError, KvmlabError

    # The boot's shell is made (one pass), the restore's fails.
    with fault_injected("create_vm", after=1), pytest.raises(KvmlabError) as e:
        KvmlabCycle(1, 16)
    half = next(t.frame.f_locals["self"] for t in e.traceback if isinstance(t.frame.f_locals.get("self"), KvmlabCycle))
    with pytest.raises(ClosedError) as closed:
        half.snap.to_bytes()  # closed, not left to the garbage collector
    assert closed.value.check == "snapshot_closed"
