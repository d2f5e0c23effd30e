"""``kvmlab bench reset``: the dirty-page reset against its floor, and the
run+reset cycle of one raw x86-64 loop in kvmlab (``reset_loop``) against
unicorn (:mod:`kvmlab.bench.peers.unicorn`).

Reset: for each K in ``dirty_pages`` and each configuration (restore strategy
/ reset mode / snapshot source), a resettable VM restored from memtouch
(pages=K, rounds=2) at round 1's checkpoint; each iteration runs it to its
exit (round 2 writes K pages), then either resets it (``vm.reset``) or takes
the reset floor (bare dirty-log read, page copies, state ioctls), alternating
on the same VM, so both see the same work.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ._native import reset_floor
from ..config import MAX_MEMORY_MIB
from .harness import (COUNT, FLAG, FREE_BASE, MEMORY_MIB, PAGE_BYTES, REPS, TEXT, Arg, Progress, check_args,
                      make_memtouch_snapshot, measure, part_progress)
from .peers.unicorn import UnicornCycle, unicorn_available
from .results import Part, Results
from .stats import median
from .targets import reset_verdicts

if TYPE_CHECKING:
    from ..snapshot import Snapshot

__all__ = ["RESET_CONFIGS", "CYCLE_CODE", "cycle_code", "cycle_expected", "KvmlabCycle", "bench_reset",
           "reset_part", "cycle_part", "crossover"]

#: (label, restore strategy, reset mode, snapshot source) of the reset configurations.
RESET_CONFIGS = (
    ("copy/copy", "copy", "copy", "file"),
    ("copy/copy mem-snap", "copy", "copy", "memory"),
    ("map/copy", "map", "copy", "file"),
    ("map/drop", "map", "drop", "file"),
)
RESET_KEYS = ["dirty_pages_target", "config", "reset_mode", "side"]
RESET_METRICS = ["call_ns", "total_ns", "next_run_ns"]


def _reset_records(snap: Snapshot, k: int, label: str, strategy: str, mode: str, n: int, warmup: int,
                   progress: Progress) -> list[dict[str, Any]]:
    from .. import Vm

    vm = Vm.restore(snap, strategy, resettable=True)
    recs: list[dict[str, Any]] = []
    prev: dict[str, Any] | None = None
    try:
        for i in range(-2 * warmup, 2 * n):
            r = vm.run(timeout_s=60)
            ok = r.reason == "exit" and r.exit_code == 0 and "round 2" in r.console
            if prev is not None:
                prev["next_run_ns"], prev["next_run_ok"] = r.elapsed_ns, ok
            if i % 2 == 0:  # a real reset
                t0 = time.perf_counter_ns()
                t = vm.reset(mode)
                rec = {"side": "reset", "call_ns": time.perf_counter_ns() - t0, "total_ns": t.total_ns,
                       "dirty_pages": t.dirty_pages}
            else:  # the floor on the same VM after the same run
                f = reset_floor(vm)
                vm.reset("copy")  # untimed fix-up (finds no dirty page): puts back the snapshot's console
                rec = {"side": "floor", "call_ns": f["call_ns"], "total_ns": f["total_ns"], "dirty_pages": f["dirty_pages"]}
            rec.update(dirty_pages_target=k, config=label, strategy=strategy, reset_mode=mode, i=i // 2,
                       run_ok=ok, next_run_ns=None, next_run_ok=None)
            prev = rec if i >= 0 else None
            if i >= 0:
                recs.append(rec)
            progress.update(1)
    finally:
        vm.close()
    return recs


def reset_part(dirty_pages: Sequence[int] = (1, 16, 256, 4096), *, memory_mib: int = 256, n: int = 100,
               warmup: int = 5, progress: Progress | None = None, tmp_dir: Path | None = None) -> Part:
    """The reset-vs-floor measurements (see the module doc) as a Part."""
    from .. import Snapshot

    records: list[dict[str, Any]] = []
    with part_progress(progress, len(dirty_pages) * len(RESET_CONFIGS) * (n + warmup) * 2) as progress:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-reset-", dir=tmp_dir) as tmp:
            for k in dirty_pages:
                progress.describe(f"reset K={k}")
                snap = make_memtouch_snapshot(k, memory_mib, Path(tmp))
                mem_snap = None
                try:
                    for label, strategy, mode, source in RESET_CONFIGS:
                        if source == "memory" and mem_snap is None:
                            mem_snap = Snapshot.from_bytes(snap.to_bytes())
                        src = mem_snap if source == "memory" else snap
                        records += _reset_records(src, k, label, strategy, mode, n, warmup, progress)  # type: ignore[arg-type]  # set above
                finally:
                    if mem_snap is not None:
                        mem_snap.close()
                    snap.close()
    bad = sum(1 for r in records if not r["run_ok"])
    return Part("reset", RESET_KEYS, RESET_METRICS, records,
                config={"dirty_pages": list(dirty_pages), "memory_mib": memory_mib, "n": n, "warmup": warmup},
                notes={"bad_runs": bad})


# == run+reset cycle: kvmlab vs unicorn ===========================================================

#: The cycle guest (x86-64, position-dependent, loaded at 0x100000):
#:
#:     mov rcx, [0x400008]        ; N, written by the host before each run
#:     mov r8, K                  ; imm32 at offset 11
#:   outer:
#:     mov rdx, 0x400000
#:     mov rsi, r8
#:   inner:
#:     add [rdx], rcx             ; one write to each of K pages ...
#:     add rdx, 0x1000
#:     dec rsi
#:     jnz inner
#:     dec rcx                    ; ... N times
#:     jnz outer
#:     mov dx, 0x500              ; exit(0): out dx, eax  (offset 0x33)
#:     xor eax, eax
#:     out dx, eax
CYCLE_CODE = bytes.fromhex(
    "488b0c2508004000" "49c7c004000000" "48c7c200004000" "4c89c6" "48010a" "4881c200100000" "48ffce" "75f1"
    "48ffc9" "75e2" "66ba0005" "31c0" "ef"
)
CYCLE_K_OFFSET = 11
CYCLE_OUT_OFFSET = 0x33
CYCLE_BASE = 0x100000
CYCLE_DATA = 0x400000
assert CYCLE_DATA == FREE_BASE  # _free_pages counts the cycle guest's pages from there too
CYCLE_INPUT = 0x400008
CYCLE_STACK = 0x100000
CYCLE_KEYS = ["iterations", "side"]
CYCLE_METRICS = ["cycle_median_ns", "cycle_min_ns", "cycle_max_ns", "mean_ns", "run_ns", "reset_ns"]


#: Most pages the cycle guest writes per iteration (its K is an imm32; more is not a cycle any more).
MAX_CYCLE_PAGES = 4096
#: Most iterations N of one cycle run (one run must end within its 30 s run timeout).
MAX_CYCLE_ITERATIONS = 100_000_000


def _free_pages(memory_mib: int) -> int:
    """Pages of ``memory_mib`` MiB above FREE_BASE (where memtouch and the cycle guest write)."""
    return ((memory_mib << 20) - FREE_BASE) // PAGE_BYTES


def cycle_code(pages: int) -> bytes:
    """The cycle guest writing ``pages`` pages per iteration."""
    if not 1 <= pages <= MAX_CYCLE_PAGES:
        raise ValueError(f"pages must be in 1..{MAX_CYCLE_PAGES}")
    code = bytearray(CYCLE_CODE)
    code[CYCLE_K_OFFSET:CYCLE_K_OFFSET + 4] = pages.to_bytes(4, "little")
    return bytes(code)


def cycle_expected(iterations: int, pages: int) -> list[int]:
    """The qword at offset 0 of each page after one run from the entry state."""
    total = iterations * (iterations + 1) // 2 % (1 << 64)
    return [total] * pages


class KvmlabCycle:
    """The cycle guest in kvmlab: ``Vm.boot(bytes)`` at CPL3, snapshot at the
    entry, a resettable copy restore of it; cycles go through
    ``vm.reset_loop`` (input = N at 0x400008, run to the exit, reset)."""

    def __init__(self, pages: int, memory_mib: int) -> None:
        from .. import Vm, VmConfig

        with Vm.boot(cycle_code(pages), VmConfig(memory_mib=memory_mib), cpl=3) as boot:
            self.snap = boot.snapshot()
        try:
            self.vm = Vm.restore(self.snap, "copy", resettable=True)
        except BaseException:
            self.snap.close()
            raise
        self.pages = pages

    def batch(self, inp: bytes, count: int) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        res = self.vm.reset_loop([inp] * count, input_gpa=CYCLE_INPUT, run_timeout_s=30.0, mode="copy")
        wall = time.perf_counter_ns() - t0
        bad = [x for x in res if x.reason != "exit" or x.exit_code != 0 or x.crashed]
        if bad:
            raise RuntimeError(f"kvmlab cycle: a run did not exit 0: {bad[0]}")
        each = sorted(x.run_ns + x.reset_ns for x in res)
        return {"cycles": count, "wall_ns": wall, "each": each,
                "run_ns": median([x.run_ns for x in res]), "reset_ns": median([x.reset_ns for x in res])}

    def words(self, iterations: int) -> list[int]:
        """One run (outside the loop), the words it left, then a reset."""
        self.vm.write_memory(CYCLE_INPUT, iterations.to_bytes(8, "little"))
        r = self.vm.run(timeout_s=30)
        if r.reason != "exit" or r.exit_code != 0:
            raise RuntimeError(f"the cycle guest did not exit 0: {r}")
        words = [int.from_bytes(self.vm.read_memory(CYCLE_DATA + p * 4096, 8), "little") for p in range(self.pages)]
        self.vm.reset("copy")
        return words

    def close(self) -> None:
        self.vm.close()
        self.snap.close()


def _batch_record(n_it: int, side: str, b: int, got: dict[str, Any]) -> dict[str, Any]:
    each = got.pop("each")
    return {"iterations": n_it, "side": side, "batch": b, "cycle_median_ns": median(each), "cycle_min_ns": each[0],
            "cycle_max_ns": each[-1], "mean_ns": got["wall_ns"] / got["cycles"], **got}


def cycle_part(iterations: Sequence[int] = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000), *, pages: int = 4,
               memory_mib: int = 64, batches: int = 7, batch_s: float = 0.1, max_count: int = 2000,
               progress: Progress | None = None) -> Part:
    """Per N: run+reset cycles of the same guest work in kvmlab and unicorn,
    ``batches`` batches per side, alternating, each as many cycles as fit in
    about ``batch_s`` (at most ``max_count``). One record per batch: the
    median/min/max cycle in it and ``mean_ns`` = wall time / cycles (which
    includes the Python call and slow cycles). Both sides must leave the
    same memory words (``notes["correct"]``)."""
    missing = unicorn_available()
    records, correct = [], {}
    uc = None
    # Every side made is closed whatever fails or is interrupted after it (the next side's constructor too).
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(part_progress(progress, len(iterations) * batches * 2))
        kv = KvmlabCycle(pages, memory_mib)
        stack.callback(kv.close)
        if not missing:
            uc = UnicornCycle(cycle_code(pages), pages, memory_mib, CYCLE_BASE, CYCLE_BASE + CYCLE_OUT_OFFSET,
                              CYCLE_STACK, CYCLE_DATA, CYCLE_INPUT)
        sides: dict[str, KvmlabCycle | UnicornCycle] = {"kvmlab": kv} if uc is None else {"kvmlab": kv, "unicorn": uc}
        for n_it in iterations:
            progress.describe(f"cycle N={n_it}")
            inp = n_it.to_bytes(8, "little")
            want = cycle_expected(n_it, pages)
            correct[str(n_it)] = {name: side.words(n_it) == want for name, side in sides.items()}
            # Size the batches from one probe cycle each.
            counts = {name: max(1, min(max_count, int(batch_s * 1e9 / max(side.batch(inp, 1)["wall_ns"], 1))))
                      for name, side in sides.items()}
            for b in range(batches):
                for name in (list(sides) if b % 2 == 0 else list(sides)[::-1]):
                    records.append(_batch_record(n_it, name, b, sides[name].batch(inp, counts[name])))
                    progress.update(1)
    part = Part("cycle", CYCLE_KEYS, CYCLE_METRICS, records,
                config={"iterations": list(iterations), "pages": pages, "memory_mib": memory_mib, "batches": batches,
                        "batch_s": batch_s, "unicorn": None if uc is None else uc.version},
                notes={"unicorn_skipped": missing, "correct": correct})
    part.notes["crossover"] = crossover(part, "cycle_median_ns")
    part.notes["crossover_mean"] = crossover(part, "mean_ns")
    return part


def crossover(part: Part, metric: str = "cycle_median_ns") -> dict[str, Any]:
    """Where kvmlab's median ``metric`` becomes lower than unicorn's: the first
    N from which kvmlab stays faster, and a log-log interpolation between the
    two bracketing N."""
    s = part.summary()
    s = s[s["metric"] == metric]
    med = {(r.iterations, r.side): r.median for r in s.itertuples()}
    pts = [(n, med[n, "kvmlab"], med[n, "unicorn"]) for n in sorted({k[0] for k in med}) if (n, "unicorn") in med]
    if not pts:
        return {"n": None, "estimate": None, "text": "unicorn not measured"}
    first = next((i for i in range(len(pts)) if all(k < u for _n, k, u in pts[i:])), None)
    if first is None:
        return {"n": None, "estimate": None, "text": f"kvmlab never becomes faster up to N={pts[-1][0]:,}"}
    if first == 0:
        return {"n": pts[0][0], "estimate": None, "text": f"kvmlab is faster already at N={pts[0][0]:,}"}
    (n0, k0, u0), (n1, k1, u1) = pts[first - 1], pts[first]
    # log(u/k) goes from >= 0 at n0 to < 0 at n1; interpolate its zero in log N.
    d0, d1 = math.log(u0 / k0), math.log(u1 / k1)
    frac = d0 / (d0 - d1) if d0 != d1 else 0.5
    est = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
    return {"n": n1, "estimate": est,
            "text": f"kvmlab overtakes unicorn between N={n0:,} and N={n1:,} (log-interpolated N≈{est:,.0f})"}


def bench_reset(dirty_pages: Sequence[int] = (1, 16, 256, 4096), *, memory_mib: int = 256, n: int = 100,
                warmup: int = 5, cycle_iterations: Sequence[int] = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000),
                cycle_pages: int = 4, cycle_memory_mib: int = 64, cycle_batches: int = 7, quiet: bool = True,
                command: str | None = None) -> Results:
    """``kvmlab bench reset`` as a function: the reset part, then (unless
    ``cycle_iterations`` is empty) the cycle part; verdicts of the reset target."""
    check_args("reset", lambda: {
        f"dirty pages must fit in {memory_mib} MiB ({_free_pages(memory_mib)} pages above 0x{FREE_BASE:x})":
            max(dirty_pages) > _free_pages(memory_mib),
        f"{cycle_pages} cycle pages do not fit in {cycle_memory_mib} MiB ({_free_pages(cycle_memory_mib)} pages above "
        f"0x{CYCLE_DATA:x})": cycle_pages > _free_pages(cycle_memory_mib),
    }, dirty_pages=(dirty_pages, Arg("int", 1, _free_pages(MAX_MEMORY_MIB), many=True)), memory_mib=(memory_mib, MEMORY_MIB),
        n=(n, REPS), warmup=(warmup, COUNT),
        cycle_iterations=(cycle_iterations, Arg("int", 1, MAX_CYCLE_ITERATIONS, many=True, min_items=0)),
        cycle_pages=(cycle_pages, Arg("int", 1, MAX_CYCLE_PAGES)), cycle_memory_mib=(cycle_memory_mib, MEMORY_MIB),
        cycle_batches=(cycle_batches, REPS), quiet=(quiet, FLAG), command=(command, TEXT))

    def run(progress: Progress) -> dict[str, Part]:
        parts = {"reset": reset_part(dirty_pages, memory_mib=memory_mib, n=n, warmup=warmup, progress=progress)}
        if cycle_iterations:
            parts["cycle"] = cycle_part(cycle_iterations, pages=cycle_pages, memory_mib=cycle_memory_mib,
                                        batches=cycle_batches, progress=progress)
        return parts

    total = len(dirty_pages) * len(RESET_CONFIGS) * (n + warmup) * 2 + len(cycle_iterations) * cycle_batches * 2
    res = measure("reset", total, quiet, command, run)
    res.verdicts = reset_verdicts(res.parts["reset"].summary())
    return res
