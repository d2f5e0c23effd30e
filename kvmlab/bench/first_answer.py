"""``kvmlab bench first-answer``: restore to first answer, the figure a
snapshot pool exists for (issue 14).

The ``service`` guest at its service checkpoint (sparse; dense: 25% of its
pages written first, like the other dense snapshots) is restored and asked
``call(b"ping")``; ``answer_ns`` is the time from the restore call to the
answer. Paths, interleaved in a new random order every iteration, each timed
only after every pool's background work is done:

* ``unpooled``: :meth:`Vm.restore` then the call;
* ``pooled``: :meth:`RestorePool.restore_snapshot` into an idle shell;
* ``prepared``: a VM :meth:`RestorePool.prepare` kept restored;
* ``prepared-warmup``: the same, prepared with a warmup (one call, then reset);
* ``warm-call``: one more call on a VM that has answered before (the floor);
* ``qemu-cold``: QEMU ``-M microvm -incoming`` of a saved VM of the same size
  and density, process start to running;
* ``qemu-prestarted``: a QEMU already started with ``-incoming defer``, from
  QMP ``migrate-incoming`` to running (QEMU's pooled analogue).

QEMU's guest has no service protocol: its figure is "running", before any
answer, so the ratios against it favour QEMU.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .harness import (COUNT, DENSE_FRACTION, FIRST_ANSWER_ERRORS, FLAG, MEMORY_SIZES, REPS, TEXT, Progress, cell_key,
                      check_args, guard, make_service_snapshot, measure, part_errors)
from .peers.qemu import QemuPeer, qemu_problem
from .results import Part, Results
from .settle import settle
from .targets import first_answer_verdicts

if TYPE_CHECKING:
    from ..pool import RestorePool
    from ..snapshot import Snapshot

__all__ = ["FIRST_PATH_LABELS", "FIRST_KEYS", "FIRST_METRICS", "QEMU_MODES", "first_answer_part", "bench_first_answer"]

#: Every path, in report order, with what it is in words.
FIRST_PATH_LABELS = {
    "unpooled": "Vm.restore, then the first call",
    "pooled": "pooled shell: restore_snapshot into an idle shell, then the first call",
    "prepared": "prepared VM (RestorePool.prepare): take, then the first call",
    "prepared-warmup": "prepared with a warmup (one call, then reset): take, then the first call",
    "warm-call": "floor: one more call on a VM that answered before",
    "qemu-cold": "QEMU microvm -incoming: process start to running",
    "qemu-prestarted": "QEMU started with -incoming defer: migrate-incoming to running",
}
FIRST_KEYS = ["memory_mib", "density", "path", "strategy"]
FIRST_METRICS = ["answer_ns", "restore_ns", "call_ns"]
STRATEGIES = ("copy", "map")
#: QEMU's modes (peers/qemu) by path.
QEMU_MODES = {"qemu-cold": "cold", "qemu-prestarted": "prestarted"}
_KVMLAB_PATHS = ("unpooled", "pooled", "prepared", "prepared-warmup", "warm-call")
_READY_S = 30.0


def _ping(vm: Any) -> None:
    if vm.call(b"ping") != b"ping":
        raise RuntimeError("the service guest answered wrongly")


def _timed(restore: Callable[[], Any], done: Callable[[Any], None]) -> dict[str, Any]:
    """Times ``restore()`` and the first call on what it returned; ``done`` gives it back (untimed)."""
    t0 = time.perf_counter_ns()
    vm = restore()
    t1 = time.perf_counter_ns()
    try:
        answer = vm.call(b"ping")
        t2 = time.perf_counter_ns()
        strategy = vm.restore_timing["strategy"]
    finally:
        done(vm)
    if answer != b"ping":
        raise RuntimeError(f"the restored service guest answered {answer!r}")
    return {"answer_ns": t2 - t0, "restore_ns": t1 - t0, "call_ns": t2 - t1, "took": strategy}


def _wait_prepared(pool: RestorePool, snap: Snapshot) -> None:
    """Until a prepared VM of ``snap`` is ready again (a release is reset off the caller's thread)."""
    deadline = time.monotonic() + _READY_S
    while pool.prepared_count(snap) < 1 and time.monotonic() < deadline:
        time.sleep(0.0005)


def _measure_cell(svc_path: Path, cell: dict[str, Any], n: int, warmup: int,
                  progress: Progress | None) -> list[dict[str, Any]]:
    """``warmup`` + ``n`` interleaved iterations of every kvmlab path and strategy."""
    from .. import PoolConfig, RestorePool, Snapshot, Vm

    combos = [(p, s) for p in _KVMLAB_PATHS for s in STRATEGIES]
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        snap = stack.enter_context(Snapshot.load(svc_path))
        pools = {(p, s): stack.enter_context(RestorePool(snap.config, PoolConfig(min_size=1, max_size=3)))
                 for p, s in combos if p in ("pooled", "prepared", "prepared-warmup")}
        for s in STRATEGIES:
            pools["prepared", s].prepare(snap, 1, strategy=s)
            pools["prepared-warmup", s].prepare(snap, 1, strategy=s, warmup=_ping)
        warm = {s: stack.enter_context(Vm.restore(snap, s)) for s in STRATEGIES}
        for vm in warm.values():
            _ping(vm)

        def warm_call(s: str) -> dict[str, Any]:
            t0 = time.perf_counter_ns()
            _ping(warm[s])
            took = time.perf_counter_ns() - t0
            return {"answer_ns": took, "call_ns": took, "took": "warm"}

        # Each restore is bound before the clock starts (functools.partial:
        # no Python frame of ours between the clock and the user's call).
        release = operator.methodcaller("release")
        fns: dict[str, Callable[[str], dict[str, Any]]] = {
            "unpooled": lambda s: _timed(functools.partial(Vm.restore, snap, s), operator.methodcaller("close")),
            "pooled": lambda s: _timed(functools.partial(pools["pooled", s].restore_snapshot, snap, s), release),
            "prepared": lambda s: _timed(functools.partial(pools["prepared", s].restore_snapshot, snap), release),
            "prepared-warmup": lambda s: _timed(functools.partial(pools["prepared-warmup", s].restore_snapshot, snap),
                                                release),
            "warm-call": warm_call,
        }
        for i in range(-warmup, n):
            for path, strategy in random.Random(i).sample(combos, len(combos)):
                settle(*pools.values())
                for (p, s), pool in pools.items():
                    if p.startswith("prepared"):
                        _wait_prepared(pool, snap)
                rec = fns[path](strategy)
                if path.startswith("prepared") and rec["took"] != "prepared":
                    # Never count a fallback restore as a prepared take.
                    raise RuntimeError(f"{path} {strategy}: the take was a {rec['took']!r} restore, not a prepared "
                                       f"VM (none was ready again within {_READY_S:g} s)")
                if i >= 0:
                    records.append({**cell, "path": path, "strategy": strategy, "i": i, **rec})
                if progress is not None:
                    progress.update(1)
    return records


def first_answer_part(memory_mib: Sequence[int], densities: Sequence[str], *, n: int, warmup: int, qemu_n: int,
                      qemu: str | None, progress: Progress, tmp_dir: Path,
                      skipped: dict[str, str]) -> Part:
    """The ``first_answer`` Part: every kvmlab path per cell, and QEMU's two
    modes (``qemu`` None, or QEMU absent: recorded in ``skipped["qemu"]``).
    A cell that fails (kvmlab's or QEMU's) is recorded in ``notes["errors"]``
    (key ``kvmlab <cell>`` or ``qemu <cell>``) and the run goes on: the
    figures measured beside it are kept."""
    if qemu is not None and "qemu" not in skipped and (why := qemu_problem(qemu)):
        skipped["qemu"] = why
    peer = QemuPeer(tmp_dir, qemu) if qemu is not None and "qemu" not in skipped else None
    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for mem in memory_mib:
        for density in densities:
            progress.describe(f"first answer {mem} MiB {density}")
            cell = {"memory_mib": mem, "density": density}
            svc = make_service_snapshot(mem, tmp_dir, DENSE_FRACTION if density == "dense" else 0.0)
            try:  # a failed cell (a take that was not a prepared VM...) is recorded; the others are kept
                records += guard(errors, cell_key("kvmlab", mem, density),
                                 functools.partial(_measure_cell, svc, cell, n, warmup, progress)) or []
            finally:
                svc.unlink(missing_ok=True)
            if peer is not None:
                qemu_recs = guard(errors, cell_key("qemu", mem, density), functools.partial(
                    peer.measure, mem, density, qemu_n, progress, modes=tuple(QEMU_MODES.values())))
                for r in qemu_recs or []:
                    path = next(p for p, m in QEMU_MODES.items() if m == r["mode"])
                    records.append({**cell, "path": path, "strategy": "-", "i": r["i"], "answer_ns": r["restore_ns"],
                                    "version": r["version"]})
    return Part("first_answer", FIRST_KEYS, FIRST_METRICS, records, config={
        "memory_mib": list(memory_mib), "densities": list(densities), "n": n, "warmup": warmup, "qemu_n": qemu_n,
        "dense_fraction": DENSE_FRACTION, "paths": list(FIRST_PATH_LABELS)}, notes={"errors": errors})


def first_answer_steps(memory_mib: Sequence[int], densities: Sequence[str], n: int, warmup: int, qemu_n: int,
                       qemu: bool) -> int:
    """Progress steps of :func:`first_answer_part`."""
    cells = len(memory_mib) * len(densities)
    return cells * ((n + warmup) * len(_KVMLAB_PATHS) * len(STRATEGIES) + (qemu_n * len(QEMU_MODES) + 1 if qemu else 0))


def bench_first_answer(memory_mib: Sequence[int] = (64, 256), *, dense: bool = True, n: int = 200, warmup: int = 3,
                       qemu_n: int = 10, qemu: str | None = "qemu-system-x86_64", quiet: bool = True,
                       command: str | None = None) -> Results:
    """``kvmlab bench first-answer`` as a function (see the module doc);
    ``qemu=None`` leaves QEMU out. The verdicts are computed per cell."""
    check_args("first-answer", memory_mib=(memory_mib, MEMORY_SIZES), dense=(dense, FLAG), n=(n, REPS),
               warmup=(warmup, COUNT), qemu_n=(qemu_n, COUNT), qemu=(qemu, TEXT), quiet=(quiet, FLAG),
               command=(command, TEXT))
    densities = ["sparse"] + (["dense"] if dense else [])
    skipped: dict[str, str] = {} if qemu is not None else {"qemu": "skipped (--no-qemu)"}

    def run(progress: Progress) -> dict[str, Part]:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-first-") as tmp:
            return {"first_answer": first_answer_part(memory_mib, densities, n=n, warmup=warmup, qemu_n=qemu_n,
                                                      qemu=qemu, progress=progress, tmp_dir=Path(tmp),
                                                      skipped=skipped)}

    steps = first_answer_steps(memory_mib, densities, n, warmup, qemu_n, qemu is not None)
    res = measure("first-answer", steps, quiet, command, run)
    res.skipped.update(skipped)
    res.errors.update(part_errors(res.parts["first_answer"], FIRST_ANSWER_ERRORS))
    res.verdicts = first_answer_verdicts(res.parts["first_answer"].summary(), res.skipped, res.errors)
    return res
