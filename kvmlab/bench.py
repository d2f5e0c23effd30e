"""``kvmlab bench restore``: how fast a snapshot restore is, pooled and not,
against the floor of what this host allows.

For each memory size and strategy, the same file-backed snapshot is restored
``--n`` times on four paths, interleaved so that the machine's noise hits all
of them alike:

* ``pooled``: :meth:`RestorePool.restore_snapshot` into an idle shell of a
  settled pool (the refill and the previous VM's destruction are finished
  before each restore, so each one is a hit on a quiet pool);
* ``unpooled``: :meth:`Vm.restore`, which creates the shell on demand (its
  ``acquire`` phase is the shell creation);
* ``floor``: ``kvmlab_bench_restore_floor``, only the bare ioctls and memory
  operations of a restore, into a fresh shell made beforehand (untimed);
* ``floor-idle``: the same bare operations into an idle shell of a second
  settled pool, which has waited as long as the pooled path's shells (the
  like-for-like floor of a pooled restore: see :func:`floor_restore`).

Every path reports the same phases (integer ns): ``acquire``, ``memory``,
``vcpu``, ``devices`` and ``total``; restored VMs are then run once (to their
next checkpoint or exit) and ``first_run`` is that run's time. The summary
prints p50/p90/p99 in microseconds and the ratios of the medians of this run.

The snapshots are realistic: the ``counter`` guest at its checkpoint (sparse:
a handful of non-zero pages) and, with ``--dense``, ``memtouch`` between two
rounds with ``--dense-fraction`` of guest memory touched.

    kvmlab bench restore --memory-mib 64,256 --strategies copy,map --n 200 --json out.json
    python -c "import kvmlab.bench as b; b.main(['restore', '--n', '50'])"

The other subcommands (each prints a table; ``--json PATH`` keeps everything):

* ``kvmlab bench reset --dirty-pages 1,16,256,4096``: dirty-page reset of a
  restored ``memtouch`` VM against the native reset floor
  (``kvmlab_bench_reset_floor``) measured on the same VM in the same run, per
  K, for copy and map restores (reset modes copy and drop); then the run+reset
  cycle of one raw x86-64 loop in kvmlab (``reset_loop``) and in unicorn, per
  loop count N, and where kvmlab overtakes unicorn (:func:`bench_reset`,
  :func:`bench_cycle`).
* ``kvmlab bench fork --n 100,1000``: ``fork_many`` of a 256 MiB service
  snapshot: time until n VMs are ready and host memory per VM (:func:`bench_fork`).
* ``kvmlab bench age --ages-ms 0,1,3,10,30,100``: the restore floor into a
  fresh shell that first waited that long: what waiting in a pool costs a
  shell (:func:`bench_shell_age`), the reason for the ``floor-idle`` path.
* ``kvmlab bench all``: everything against QEMU and unicorn, with JSON,
  Markdown and PNG output; the code is the ``benchmarks`` package of the
  source tree (``python -m benchmarks``), :func:`run_all` from Python.

Note on the reset floor: ``kvmlab_bench_reset_floor`` restores memory, the
KVM vCPU/VM state and kvmlab's host-side vCPU status, but not the console
kept from the snapshot, so a VM is reset once more, untimed, after each floor
(that reset finds no dirty page).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "add_parser",
    "main",
    "cmd_bench_restore",
    "percentile",
    "host_info",
    "PHASES",
    "bench_reset",
    "bench_cycle",
    "bench_fork",
    "bench_shell_age",
    "floor_restore",
    "stats",
    "run_all",
]

#: Phases reported for every path, in output order.
PHASES = ("total", "acquire", "memory", "vcpu", "devices", "first_run")

#: Targets reported (never asserted) for pooled map restores of 256 MiB.
TARGET_FLOOR_RATIO = 1.5  # pooled total p50 within 1.5x of the floor-idle p50
TARGET_SPEEDUP = 3.0  # unpooled / pooled total p50 at least 3

_PAGE = 4096
_FREE_BASE = 0x400000  # first byte the guests may use (docs/guest-protocol.md)


# -- small helpers ------------------------------------------------------------------------


def percentile(values: Sequence[int | float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return float(s[k])


def _number_list(text: str, kind: type = int) -> list:
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one value")
    return out


def _int_list(text: str) -> list[int]:
    return _number_list(text, int)


def _float_list(text: str) -> list[float]:
    return _number_list(text, float)


def _strategy_list(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in ("copy", "map")]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"strategies are copy and/or map, got {text!r}")
    return out


def host_info() -> dict[str, Any]:
    """CPU model, kernel, CPU count and the KVM modules loaded."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mods = [m for m in ("kvm_pvm", "kvm_intel", "kvm_amd", "kvm") if Path("/sys/module", m).exists()]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kvm_modules": mods,
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


class _Progress:
    """tqdm on stderr when available, else a line every 10%."""

    def __init__(self, total: int, quiet: bool, unit: str = "restore") -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self._bar = None
        self._next = 0.1
        if not quiet:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        elif not self.quiet:
            print(f"bench: {text} ...", file=sys.stderr, flush=True)

    def update(self, k: int = 1) -> None:
        self.done += k
        if self._bar is not None:
            self._bar.update(k)
        elif not self.quiet and self.total and self.done / self.total >= self._next:
            print(f"bench: {100 * self.done // self.total}% ({self.done}/{self.total})", file=sys.stderr, flush=True)
            self._next += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- the measurement -----------------------------------------------------------------------


@dataclass
class Case:
    guest: str  # "counter" (sparse) or "memtouch25" (dense)
    memory_mib: int
    strategy: str
    path: Path
    present_pages: int = 0


@dataclass
class Record:
    path: str  # pooled | unpooled | floor | floor-idle
    guest: str
    memory_mib: int
    strategy: str
    i: int
    acquire_ns: int | None
    memory_ns: int
    vcpu_ns: int
    devices_ns: int
    total_ns: int
    call_ns: int  # wall time of the Python call (pooled, unpooled) or of the native call (floor)
    first_run_ns: int | None = None
    hit: bool | None = None
    mapped: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_snapshot(kind: str, memory_mib: int, out_dir: Path, dense_fraction: float) -> tuple[str, Path, int]:
    """Boots a guest to a checkpoint and saves its snapshot; returns (label, path, present pages)."""
    from . import Vm, VmConfig

    cfg = VmConfig(memory_mib=memory_mib)
    if kind == "sparse":
        label, guest, args = "counter", "counter", {"steps": 20, "checkpoint_at": 10}
    else:
        total_pages = memory_mib * (1 << 20) // _PAGE
        pages = min(int(total_pages * dense_fraction), (memory_mib * (1 << 20) - _FREE_BASE) // _PAGE)
        label, guest, args = f"memtouch{round(dense_fraction * 100)}", "memtouch", {"pages": max(1, pages), "rounds": 2}
    with Vm.boot(guest, cfg, args=args) as vm:
        r = vm.run(timeout_s=120)
        if r.reason != "checkpoint":
            raise RuntimeError(f"{guest} did not reach its checkpoint ({r.reason}): {r.console[-200:]}")
        snap = vm.snapshot()
    try:
        path = snap.save(out_dir / f"{label}-{memory_mib}mib.kvmsnap")
        return label, path, snap.present_pages
    finally:
        snap.close()


def settle(*pools, timeout_s: float = 60.0) -> None:
    """Waits until every pool's background work is done (see _wait_settled)."""
    for pool in pools:
        _wait_settled(pool, timeout_s)


def _wait_settled(pool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        s = pool.stats()
        if s.idle >= min(1, s.min_size) and s.creating == 0 and s.pending_destroy == 0:
            return
        if time.monotonic() > deadline:
            return  # measured anyway; the record says whether it was a hit
        time.sleep(0.0005)


def _timing_record(path: str, case: Case, i: int, t: dict[str, int], call_ns: int) -> Record:
    return Record(
        path=path,
        guest=case.guest,
        memory_mib=case.memory_mib,
        strategy=case.strategy,
        i=i,
        acquire_ns=int(t["acquire_ns"]),
        memory_ns=int(t["memory_ns"]),
        vcpu_ns=int(t["vcpu_ns"]),
        devices_ns=int(t["devices_ns"]),
        total_ns=int(t["total_ns"]),
        call_ns=call_ns,
        mapped=bool(t.get("mapped", 0)),
    )


def floor_available() -> bool:
    from . import _ffi

    try:
        getattr(_ffi.testing, "kvmlab_bench_restore_floor")
        getattr(_ffi.testing, "kvmlab_bench_pool_take_shell")
        getattr(_ffi.lib, "kvmlab_vm_new")
        getattr(_ffi.lib, "kvmlab_vm_free")
    except AttributeError:
        return False
    return True


def _one_pooled(pool, snap, case: Case, i: int, run: bool) -> Record:
    _wait_settled(pool)
    t0 = time.perf_counter_ns()
    rvm = pool.restore_snapshot(snap, case.strategy)
    call = time.perf_counter_ns() - t0
    try:
        rec = _timing_record("pooled", case, i, rvm.restore_timing, call)
        rec.hit = bool(rvm.restore_timing.get("hit", 0))
        if run:
            rec.first_run_ns = rvm.run(timeout_s=120).elapsed_ns
    finally:
        rvm.release()
    return rec


def _one_unpooled(snap, case: Case, i: int, run: bool) -> Record:
    from . import Vm

    t0 = time.perf_counter_ns()
    vm = Vm.restore(snap, case.strategy)
    call = time.perf_counter_ns() - t0
    try:
        rec = _timing_record("unpooled", case, i, vm.restore_timing, call)
        if run:
            rec.first_run_ns = vm.run(timeout_s=120).elapsed_ns
    finally:
        vm.close()  # destruction on this thread, untimed
    return rec


def floor_restore(snap, strategy: str, pool=None, age_s: float = 0.0) -> tuple[int, dict[str, int]]:
    """The restore floor of ``snap`` (``kvmlab_bench_restore_floor``: only the
    bare ioctls and memory operations) into an empty shell: an idle shell of
    ``pool`` (a settled pool of the snapshot's shape, like a pooled restore
    gets) or, without ``pool``, a fresh shell made just before (``age_s``: it
    waits that long first). Getting and freeing the shell are untimed.
    Returns (Python call ns, the core's phase ns).

    Why both: the same ioctls cost more in a shell that has waited in a pool
    than in one made a moment ago (its kernel structures have gone cold: on
    this kind of machine 1.2-1.4x after 10 ms: ``kvmlab bench age``), so only
    the idle-shell floor isolates what a pooled restore adds."""
    from . import _ffi
    from .snapshot import strategy_code

    ffi, lib = _ffi.ffi, _ffi.lib
    out = ffi.new("kvmlab_vm **")
    t = ffi.new("kvmlab_restore_times *")
    if pool is None:
        c = ffi.new("kvmlab_vm_config *", {"memory_bytes": snap.memory_bytes, "vcpus": snap.vcpus})
        _ffi.check(lib.kvmlab_vm_new(c, out))
        free = lib.kvmlab_vm_free
        # Busy-wait, not sleep: an idle CPU would cool this thread's caches
        # too, and only the shell's waiting is to be measured.
        end = time.perf_counter() + age_s
        while time.perf_counter() < end:
            pass
    else:
        _wait_settled(pool)
        ph = pool._enter()
        try:
            _ffi.check(_ffi.testing.kvmlab_bench_pool_take_shell(ph, out))
        except BaseException:
            pool._exit()
            raise
        free = lambda vm: (lib.kvmlab_pool_release(ph, vm), pool._exit())  # noqa: E731
    try:
        with snap._use() as sh:
            t0 = time.perf_counter_ns()
            rc = _ffi.testing.kvmlab_bench_restore_floor(out[0], sh, strategy_code(strategy), t)
            call = time.perf_counter_ns() - t0
            _ffi.check(rc)
    finally:
        free(out[0])
    return call, _ffi.as_dict(t, "kvmlab_restore_times")


def _one_floor(snap, case: Case, i: int, pool=None) -> Record:
    call, times = floor_restore(snap, case.strategy, pool)
    rec = _timing_record("floor" if pool is None else "floor-idle", case, i, times, call)
    rec.acquire_ns = None  # the shell was made or taken beforehand, untimed
    return rec


def run_case(case: Case, n: int, warmup: int, run: bool, with_floor: bool, progress: _Progress) -> list[Record]:
    """``warmup`` + ``n`` interleaved iterations of every path; returns the ``n`` measured ones."""
    from . import PoolConfig, RestorePool, Snapshot, VmConfig

    records: list[Record] = []
    with Snapshot.load(case.path) as snap:
        case.present_pages = snap.present_pages
        cfg, pool_cfg = VmConfig(memory_mib=case.memory_mib, vcpus=snap.vcpus), PoolConfig(min_size=1, max_size=2)
        # The idle-shell floor has a pool of its own, used once per iteration
        # like the pooled path's, so its shells wait as long as those do.
        with RestorePool(cfg, pool_cfg) as pool, RestorePool(cfg, pool_cfg) as floor_pool:
            paths: list[Callable[[int], Record]] = [
                lambda i: _one_pooled(pool, snap, case, i, run),
                lambda i: _one_unpooled(snap, case, i, run),
            ]
            if with_floor:
                paths.append(lambda i: _one_floor(snap, case, i))
                paths.append(lambda i: _one_floor(snap, case, i, floor_pool))
            for i in range(-warmup, n):
                rng = random.Random(i)  # a new order every iteration, the same in every run
                for fn in rng.sample(paths, len(paths)):
                    # The previous path's background work (a VM being
                    # destroyed, a shell being made) is over before any path is timed.
                    settle(pool, floor_pool)
                    rec = fn(i)
                    if i >= 0:
                        records.append(rec)
                progress.update(len(paths))
    return records


# -- the report ------------------------------------------------------------------------------


def _values(recs: Iterable[Record], phase: str) -> list[int]:
    key = f"{phase}_ns"
    return [getattr(r, key) for r in recs if getattr(r, key) is not None]


def summarize(records: list[Record]) -> list[dict[str, Any]]:
    """One row per (guest, memory, strategy, path): p50/p90/p99 per phase (ns) and hit count."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.guest, r.memory_mib, r.strategy, r.path), []).append(r)
    rows = []
    for (guest, mem, strategy, path), recs in groups.items():
        row: dict[str, Any] = {"guest": guest, "memory_mib": mem, "strategy": strategy, "path": path, "n": len(recs)}
        for ph in PHASES + ("call",):
            v = _values(recs, ph)
            row[ph] = {q: percentile(v, q) for q in (50, 90, 99)} if v else None
        if path == "pooled":
            row["hits"] = sum(1 for r in recs if r.hit)
        rows.append(row)
    return rows


def _us(ns: float | None) -> str:
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return "-"
    us = ns / 1000
    if us >= 1000:
        return f"{us:,.0f}"
    if us >= 100:
        return f"{us:.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def _cell(p: dict[float, float] | None) -> str:
    if not p:
        return "-"
    return f"{_us(p[50])}/{_us(p[90])}/{_us(p[99])}"


def format_report(host: dict[str, Any], rows: list[dict[str, Any]], n: int, floor_note: str | None) -> str:
    lines = [
        f"host: {host['cpu']} ({host['cpus']} CPUs), kernel {host['kernel']}, "
        f"KVM modules: {', '.join(host['kvm_modules']) or 'none'}",
        f"numbers: p50/p90/p99 in microseconds over n={n} restores per row, all of this run; "
        "ratios compare medians (p50) of this run",
        "pooled = idle shell of a settled pool; unpooled = Vm.restore (shell made on demand: 'acquire'); "
        "floor = bare ioctls/memory ops into a fresh shell; floor-idle = the same into an idle shell of a settled pool",
        "call = around the Python call (floors: around the bare native call); total = the core's own restore time",
    ]
    if floor_note:
        lines.append(f"floor: {floor_note}")
    cols = ["call", "total", "acquire", "memory", "vcpu", "devices", "first_run"]
    header = ["guest", "MiB", "strategy", "path"] + cols + ["hits"]
    table = [header]
    by_key: dict[tuple, dict[str, dict]] = {}
    order = {"pooled": 0, "unpooled": 1, "floor": 2, "floor-idle": 3}
    for row in sorted(rows, key=lambda r: (r["guest"], r["memory_mib"], r["strategy"], order.get(r["path"], 9))):
        by_key.setdefault((row["guest"], row["memory_mib"], row["strategy"]), {})[row["path"]] = row
        table.append(
            [row["guest"], str(row["memory_mib"]), row["strategy"], row["path"]]
            + [_cell(row.get(c)) for c in cols]
            + [f"{row['hits']}/{row['n']}" if "hits" in row else ""]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines.append("")
    for k, r in enumerate(table):
        lines.append("  ".join(c.rjust(widths[i]) if i >= 4 else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("ratios of p50 (this run); call = around the Python call (restore to ready as your code sees it; "
                 "for the floors, around their bare native call), core = the core's own total:")
    for (guest, mem, strategy), paths in by_key.items():
        p = paths.get("pooled")
        if not p:
            continue
        for measure, label in (("call", "call"), ("total", "core")):
            parts = []
            if "unpooled" in paths:
                u = paths["unpooled"][measure][50]
                parts.append(f"pooled/unpooled {p[measure][50] / u:.3f} ({u / p[measure][50]:.1f}x faster)")
            for other in ("floor-idle", "floor"):
                if other in paths:
                    parts.append(f"pooled/{other} {p[measure][50] / paths[other][measure][50]:.2f}x")
            if "floor" in paths and "floor-idle" in paths:
                parts.append(f"floor-idle/floor {paths['floor-idle'][measure][50] / paths['floor'][measure][50]:.2f}x (cold shell)")
            lines.append(f"  {guest:>10} {mem:>5} MiB {strategy:<4} {label}  " + "; ".join(parts))
    target = by_key.get(("counter", 256, "map"))
    lines.append("")
    if target and "pooled" in target:
        # Judged on the Python call (restore to ready), against the floor into
        # a shell as old as the pooled path's; the other readings alongside.
        p = target["pooled"]
        msgs = []
        if "floor-idle" in target:
            r = p["call"][50] / target["floor-idle"]["call"][50]
            also = [f"core {p['total'][50] / target['floor-idle']['total'][50]:.2f}x"]
            if "floor" in target:
                also.append(f"vs the fresh-shell floor: call {p['call'][50] / target['floor']['call'][50]:.2f}x, "
                            f"core {p['total'][50] / target['floor']['total'][50]:.2f}x")
            msgs.append(f"pooled/floor-idle {r:.2f}x (target <= {TARGET_FLOOR_RATIO}x: {'met' if r <= TARGET_FLOOR_RATIO else 'MISSED'}; "
                        + "; ".join(also) + ")")
        else:
            msgs.append("pooled/floor: no floor in this run")
        if "unpooled" in target:
            sp = target["unpooled"]["call"][50] / p["call"][50]
            msgs.append(f"{sp:.1f}x faster than unpooled (target >= {TARGET_SPEEDUP}x: {'met' if sp >= TARGET_SPEEDUP else 'MISSED'})")
        lines.append("targets, pooled map restore of 256 MiB (counter), Python call: " + "; ".join(msgs))
    else:
        lines.append("targets: need --memory-mib with 256 and --strategies with map to report them")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------


def cmd_bench_restore(args: argparse.Namespace) -> int:
    from .errors import KvmlabError

    host = host_info()
    with_floor = not args.no_floor and floor_available()
    floor_note = None
    if args.no_floor:
        floor_note = "skipped (--no-floor)"
    elif not with_floor:
        floor_note = "skipped: this native core has no kvmlab_bench_restore_floor (rebuild: pip install -e .)"
        print(f"bench: {floor_note}", file=sys.stderr)
    kinds = ["sparse"] + (["dense"] if args.dense else [])
    n_paths = 2 + 2 * int(with_floor)
    total = len(kinds) * len(args.memory_mib) * len(args.strategies) * (args.n + args.warmup) * n_paths
    progress = _Progress(total, args.quiet)
    records: list[Record] = []
    cases: list[Case] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-") as tmp:
            for mem in args.memory_mib:
                for kind in kinds:
                    progress.describe(f"snapshot {kind} {mem} MiB")
                    label, path, _present = make_snapshot(kind, mem, Path(tmp), args.dense_fraction)
                    for strategy in args.strategies:
                        case = Case(label, mem, strategy, path)
                        cases.append(case)
                        progress.describe(f"{label} {mem} MiB {strategy}")
                        records += run_case(case, args.n, args.warmup, not args.no_run, with_floor, progress)
    except KvmlabError as e:
        progress.close()
        print(f"kvmlab bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    progress.close()
    rows = summarize(records)
    print(format_report(host, rows, args.n, floor_note))
    if args.json:
        doc = {
            "host": host,
            "config": {
                "memory_mib": args.memory_mib,
                "strategies": args.strategies,
                "n": args.n,
                "warmup": args.warmup,
                "run": not args.no_run,
                "dense": args.dense,
                "dense_fraction": args.dense_fraction,
                "floor": with_floor,
            },
            "snapshots": [
                {"guest": c.guest, "memory_mib": c.memory_mib, "strategy": c.strategy, "present_pages": c.present_pages}
                for c in cases
            ],
            "summary": rows,
            "records": [asdict(r) for r in records],
            "unix_time": time.time(),
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0



# == shared helpers for reset / cycle / fork / all ==========================================


def stats(values: Sequence[int | float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n"}`` of ``values`` (NaN when empty)."""
    v = [float(x) for x in values]
    if not v:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    s = sorted(v)
    mid = len(s) // 2
    med = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return {"median": med, "min": s[0], "max": s[-1], "n": len(s)}


def fmt_time(ns: float | None) -> str:
    """Nanoseconds as a short human figure (``"83.5 µs"``, ``"1.73 ms"``, ``"2.1 s"``)."""
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            x = ns / scale
            return f"{x:.3g} {unit}" if x < 1000 else f"{x:,.0f} {unit}"
    return f"{ns:.0f} ns"


def fmt_stat(st: dict[str, Any] | None) -> str:
    """``"83.5 µs (80.1–95.2)"``: median (min–max)."""
    if not st or st.get("n", 0) == 0:
        return "-"
    return f"{fmt_time(st['median'])} ({fmt_time(st['min'])}–{fmt_time(st['max'])})"


def ratio(a: float | None, b: float | None) -> float:
    try:
        if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
            return math.nan
        return a / b
    except TypeError:
        return math.nan


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    """A plain-text table (for the terminal)."""
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    out = []
    for k, r in enumerate(table):
        out.append("  ".join(c.rjust(widths[i]) if i >= right_from else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _host_line(host: dict[str, Any]) -> str:
    mods = ", ".join(host["kvm_modules"]) or "none"
    nested = " (nested, paravirtual)" if "kvm_pvm" in host["kvm_modules"] else ""
    return f"host: {host['cpu']} ({host['cpus']} CPUs), kernel {host['kernel']}, KVM modules: {mods}{nested}"


def _write_json(path: str | os.PathLike[str] | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1, default=str))


# == kvmlab bench reset =========================================================================

#: Target: median reset within this factor of the reset floor measured in the same run.
TARGET_RESET_FLOOR_RATIO = 1.3

#: (label, restore strategy, reset mode, snapshot source) of the reset configurations.
RESET_CONFIGS = (
    ("copy/copy", "copy", "copy", "file"),
    ("copy/copy mem-snap", "copy", "copy", "memory"),
    ("map/copy", "map", "copy", "file"),
    ("map/drop", "map", "drop", "file"),
)


def reset_floor_once(vm) -> dict[str, int]:
    """``kvmlab_bench_reset_floor`` on ``vm`` (resettable, stopped after a run):
    the bare dirty-log read, page copies and vCPU/VM state ioctls, timed
    natively (the phases) and around the bare native call (``call_ns``).

    The floor leaves the console as the run left it (see the module notes), so
    the VM is reset once more right after it, untimed (that reset finds no
    dirty page)."""
    from . import _ffi

    ffi, lib = _ffi.ffi, _ffi.lib
    out = ffi.new("kvmlab_reset_times *")
    with vm._lock:
        h = vm._live()
        t0 = time.perf_counter_ns()
        rc = _ffi.testing.kvmlab_bench_reset_floor(h, out)
        call = time.perf_counter_ns() - t0
        _ffi.check(rc)
    t = _ffi.as_dict(out, "kvmlab_reset_times")
    t["call_ns"] = call
    vm.reset("copy")  # untimed fix-up (finds no dirty page): puts back the snapshot's console
    return t


def reset_floor_available() -> bool:
    from . import _ffi

    return hasattr(_ffi.testing, "kvmlab_bench_reset_floor")


def make_memtouch_snapshot(pages: int, memory_mib: int, out_dir: Path):
    """memtouch (pages=K, rounds=2) stopped at round 1's checkpoint, saved and
    loaded back (file-backed). Returns the loaded Snapshot."""
    from . import Snapshot, Vm, VmConfig

    with Vm.boot("memtouch", VmConfig(memory_mib=memory_mib), args={"pages": pages, "rounds": 2}) as vm:
        r = vm.run(timeout_s=120)
        if r.reason != "checkpoint" or r.checkpoint_tag != 1:
            raise RuntimeError(f"memtouch pages={pages} did not stop at round 1's checkpoint: {r}")
        with vm.snapshot() as snap:
            path = snap.save(out_dir / f"memtouch-{pages}p-{memory_mib}mib.kvmsnap")
    return Snapshot.load(path)


def bench_reset(
    dirty_pages: Sequence[int] = (1, 16, 256, 4096),
    *,
    memory_mib: int = 256,
    n: int = 100,
    warmup: int = 5,
    configs: Sequence[str] | None = None,
    progress: "_Progress | None" = None,
    tmp_dir: Path | None = None,
) -> dict[str, Any]:
    """For each K in ``dirty_pages`` and each reset configuration (restore
    strategy / reset mode): a resettable VM restored from memtouch (pages=K,
    rounds=2) at round 1's checkpoint; each iteration runs it to its exit
    (round 2 writes K pages) and then either resets it (``vm.reset``) or
    takes the reset floor (``kvmlab_bench_reset_floor``), alternating, so the
    two see the same work. Returns ``{"rows": [...], "config": {...}}`` with
    per-row stats (ns) of the reset (core ``total_ns`` and the Python call),
    the floor and the run, and ``ratio`` = median reset / median floor."""
    from . import Snapshot

    chosen = [c for c in RESET_CONFIGS if configs is None or c[0] in configs]
    own_progress = progress is None
    if progress is None:
        progress = _Progress(len(dirty_pages) * len(chosen) * (n + warmup) * 2, True, unit="run")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvmlab-bench-reset-", dir=tmp_dir) as tmp:
        for k in dirty_pages:
            progress.describe(f"reset: snapshot memtouch pages={k}")
            snap = make_memtouch_snapshot(k, memory_mib, Path(tmp))
            mem_snap = None
            try:
                for label, strategy, mode, source in chosen:
                    if source == "memory":
                        if mem_snap is None:
                            mem_snap = Snapshot.from_bytes(snap.to_bytes())
                        src = mem_snap
                    else:
                        src = snap
                    progress.describe(f"reset K={k} {label}")
                    rows.append(_reset_case(src, k, label, strategy, mode, source, n, warmup, progress))
            finally:
                if mem_snap is not None:
                    mem_snap.close()
                snap.close()
    if own_progress:
        progress.close()
    return {
        "config": {"dirty_pages": list(dirty_pages), "memory_mib": memory_mib, "n": n, "warmup": warmup,
                   "target_ratio": TARGET_RESET_FLOOR_RATIO},
        "rows": rows,
    }


def _reset_case(snap, k: int, label: str, strategy: str, mode: str, source: str, n: int, warmup: int, progress) -> dict[str, Any]:
    from . import Vm

    vm = Vm.restore(snap, strategy, resettable=True)
    reset_core, reset_call, floor, floor_call, run_after_reset, dirty, floor_dirty = [], [], [], [], [], [], []
    bad = 0
    try:
        for i in range(-2 * warmup, 2 * n):
            r = vm.run(timeout_s=60)
            if r.reason != "exit" or r.exit_code != 0 or "round 2" not in r.console:
                bad += 1
            if i % 2 == 0:  # a real reset
                t0 = time.perf_counter_ns()
                t = vm.reset(mode)
                call = time.perf_counter_ns() - t0
                if i >= 0:
                    reset_core.append(t.total_ns)
                    reset_call.append(call)
                    dirty.append(t.dirty_pages)
            else:  # the floor on the same VM after the same run
                f = reset_floor_once(vm)
                if i >= 0:
                    floor.append(f["total_ns"])
                    floor_call.append(f["call_ns"])
                    floor_dirty.append(f["dirty_pages"])
            if i >= 1 and i % 2 == 1:  # this run followed a real reset (i - 1)
                run_after_reset.append(r.elapsed_ns)
            progress.update(1)
    finally:
        vm.close()
    row = {
        "dirty_pages_target": k,
        "config": label,
        "strategy": strategy,
        "reset_mode": mode,
        "snapshot": source,
        "dirty_pages": int(stats(dirty)["median"]) if dirty else 0,
        "floor_dirty_pages": int(stats(floor_dirty)["median"]) if floor_dirty else 0,
        "reset": stats(reset_core),
        "reset_call": stats(reset_call),
        "floor": stats(floor),
        "floor_call": stats(floor_call),
        "run": stats(run_after_reset),
        "bad_runs": bad,
    }
    row["ratio"] = ratio(row["reset"]["median"], row["floor"]["median"])
    # Like for like: the Python call of reset() against the bare native call of the floor.
    row["ratio_call"] = ratio(row["reset_call"]["median"], row["floor_call"]["median"])
    row["cycle"] = row["run"]["median"] + row["reset"]["median"] if run_after_reset and reset_core else math.nan
    row["target_met"] = bool(row["ratio"] <= TARGET_RESET_FLOOR_RATIO)
    return row


def format_reset(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"reset vs floor: memtouch pages=K rounds=2, restored at round 1's checkpoint, {cfg['memory_mib']} MiB, "
        f"n={cfg['n']} resets and n floors per row (alternating on the same VM), median (min–max)",
        "config = restore strategy / reset mode; 'mem-snap' = an in-memory (not file-backed) snapshot",
        "reset = core total_ns of vm.reset(); call = the Python call; floor = kvmlab_bench_reset_floor; "
        "run = the run after a reset (round 2 + exit)",
        "",
    ]
    header = ["K", "config", "dirty", "reset", "floor", "reset/floor", "call/floor", "run", "target"]
    rows = []
    for r in result["rows"]:
        rows.append([
            str(r["dirty_pages_target"]), r["config"], str(r["dirty_pages"]), fmt_stat(r["reset"]), fmt_stat(r["floor"]),
            f"{r['ratio']:.2f}x", f"{r['ratio_call']:.2f}x", fmt_time(r["run"]["median"]),
            ("met" if r["target_met"] else "MISSED") + (f" ({r['bad_runs']} bad runs)" if r["bad_runs"] else ""),
        ])
    lines += _table(header, rows, right_from=2)
    met = sum(1 for r in result["rows"] if r["target_met"])
    lines.append("")
    lines.append(f"target: reset within {cfg['target_ratio']}x of the floor: met in {met} of {len(result['rows'])} rows")
    return "\n".join(lines)


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
CYCLE_INPUT = 0x400008
CYCLE_STACK = 0x100000


def cycle_code(pages: int) -> bytes:
    """The cycle guest writing ``pages`` pages per iteration."""
    if not 1 <= pages <= 4096:
        raise ValueError("pages must be in 1..4096")
    code = bytearray(CYCLE_CODE)
    code[CYCLE_K_OFFSET:CYCLE_K_OFFSET + 4] = pages.to_bytes(4, "little")
    return bytes(code)


def cycle_expected(iterations: int, pages: int) -> list[int]:
    """The qword at offset 0 of each page after one run from the entry state."""
    total = iterations * (iterations + 1) // 2 % (1 << 64)
    return [total] * pages


def unicorn_available() -> str | None:
    """None when the ``unicorn`` package imports, else why not."""
    try:
        import unicorn  # noqa: F401
    except ImportError as e:
        return f"unicorn is not installed ({e}); pip install unicorn (or pip install 'kvmlab[bench]')"
    return None


class UnicornCycle:
    """The cycle guest in unicorn (UC_MODE_64), driven from Python: the same
    bytes at 0x100000, memory of the same size mapped at 0, run from the entry
    until the exit ``out`` (``emu_start(..., until=out)``); reset =
    ``context_restore`` + ``mem_write`` of each of the K dirty pages from a
    golden copy (unicorn has no dirty log: the pages are known)."""

    def __init__(self, pages: int, memory_mib: int) -> None:
        from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
        from unicorn.x86_const import UC_X86_REG_RFLAGS, UC_X86_REG_RIP, UC_X86_REG_RSP

        import unicorn

        self.version = unicorn.__version__
        self.pages = pages
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map(0, memory_mib << 20)
        self.uc.mem_write(CYCLE_BASE, cycle_code(pages))
        self.uc.reg_write(UC_X86_REG_RIP, CYCLE_BASE)
        self.uc.reg_write(UC_X86_REG_RSP, CYCLE_STACK)
        self.uc.reg_write(UC_X86_REG_RFLAGS, 0x3002)
        self.ctx = self.uc.context_save()
        self.golden = [(CYCLE_DATA + p * 4096, bytes(self.uc.mem_read(CYCLE_DATA + p * 4096, 4096))) for p in range(pages)]
        self.end = CYCLE_BASE + CYCLE_OUT_OFFSET

    def run(self, inp: bytes) -> None:
        self.uc.mem_write(CYCLE_INPUT, inp)
        self.uc.emu_start(CYCLE_BASE, self.end)

    def reset(self) -> None:
        self.uc.context_restore(self.ctx)
        for addr, data in self.golden:
            self.uc.mem_write(addr, data)

    def cycles(self, inp: bytes, count: int) -> tuple[int, list[int]]:
        """``count`` run+reset cycles; returns (wall ns, ns of each cycle)."""
        uc, ctx, golden, end = self.uc, self.ctx, self.golden, self.end
        clock = time.perf_counter_ns
        each = []
        t0 = clock()
        for _ in range(count):
            c0 = clock()
            uc.mem_write(CYCLE_INPUT, inp)
            uc.emu_start(CYCLE_BASE, end)
            uc.context_restore(ctx)
            for addr, data in golden:
                uc.mem_write(addr, data)
            each.append(clock() - c0)
        return clock() - t0, each

    def words(self) -> list[int]:
        return [int.from_bytes(self.uc.mem_read(CYCLE_DATA + p * 4096, 8), "little") for p in range(self.pages)]


class KvmlabCycle:
    """The cycle guest in kvmlab: ``Vm.boot(bytes)`` at CPL3, snapshot at the
    entry (before the first run), a resettable copy restore of it; cycles go
    through ``vm.reset_loop`` (input = N at 0x400008, run to the exit, reset)."""

    def __init__(self, pages: int, memory_mib: int) -> None:
        from . import Vm, VmConfig

        with Vm.boot(cycle_code(pages), VmConfig(memory_mib=memory_mib), cpl=3) as boot:
            self.snap = boot.snapshot()
        self.vm = Vm.restore(self.snap, "copy", resettable=True)
        self.pages = pages

    def cycles(self, inp: bytes, count: int) -> tuple[int, list]:
        t0 = time.perf_counter_ns()
        res = self.vm.reset_loop([inp] * count, input_gpa=CYCLE_INPUT, run_timeout_s=30.0, mode="copy")
        return time.perf_counter_ns() - t0, res

    def check(self, iterations: int) -> list[int]:
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


def bench_cycle(
    iterations: Sequence[int] = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000),
    *,
    pages: int = 4,
    memory_mib: int = 64,
    batches: int = 7,
    batch_s: float = 0.1,
    max_count: int = 2000,
    progress: "_Progress | None" = None,
) -> dict[str, Any]:
    """Per N in ``iterations``: time per run+reset cycle of the same guest
    work (N iterations writing ``pages`` pages) in kvmlab (``reset_loop``) and
    in unicorn (from Python). ``batches`` batches per side, alternating, each
    as many cycles as fit in about ``batch_s`` (at most ``max_count``).
    ``kvmlab`` / ``unicorn``: stats over every cycle (kvmlab: the loop's
    run_ns + reset_ns; unicorn: each cycle timed in Python);
    ``*_batch_mean``: stats over batches of wall time / cycles (includes the
    Python call and the tail of slow cycles). Both sides are checked to leave
    the same memory words."""
    unicorn_missing = unicorn_available()
    own = progress is None
    if progress is None:
        progress = _Progress(len(iterations) * batches * 2, True, unit="batch")
    kv = KvmlabCycle(pages, memory_mib)
    uc = None if unicorn_missing else UnicornCycle(pages, memory_mib)
    rows = []
    try:
        for n_it in iterations:
            progress.describe(f"cycle N={n_it}")
            inp = n_it.to_bytes(8, "little")
            want = cycle_expected(n_it, pages)
            got_kv = kv.check(n_it)
            row: dict[str, Any] = {"iterations": n_it, "pages": pages, "correct_kvmlab": got_kv == want}
            if uc is not None:
                uc.run(inp)
                row["correct_unicorn"] = uc.words() == want
                uc.reset()
            # Size the batches from one probe cycle each.
            t_kv, _ = kv.cycles(inp, 1)
            counts = {"kvmlab": max(1, min(max_count, int(batch_s * 1e9 / max(t_kv, 1))))}
            if uc is not None:
                t_uc, _ = uc.cycles(inp, 1)
                counts["unicorn"] = max(1, min(max_count, int(batch_s * 1e9 / max(t_uc, 1))))
            kv_each, kv_mean, uc_each, uc_mean, run_ns, reset_ns, dirty = [], [], [], [], [], [], []
            for b in range(batches):
                order = ["kvmlab", "unicorn"] if b % 2 == 0 else ["unicorn", "kvmlab"]
                for who in order:
                    if who == "kvmlab":
                        wall, res = kv.cycles(inp, counts["kvmlab"])
                        bad = [x for x in res if x.reason != "exit" or x.exit_code != 0 or x.crashed]
                        if bad:
                            raise RuntimeError(f"kvmlab cycle N={n_it}: a run did not exit 0: {bad[0]}")
                        kv_mean.append(wall / len(res))
                        kv_each += [x.run_ns + x.reset_ns for x in res]
                        run_ns += [x.run_ns for x in res]
                        reset_ns += [x.reset_ns for x in res]
                        dirty += [x.dirty_pages for x in res]
                        progress.update(1)
                    elif uc is not None:
                        wall, each = uc.cycles(inp, counts["unicorn"])
                        uc_mean.append(wall / len(each))
                        uc_each += each
                        progress.update(1)
            row.update(
                kvmlab=stats(kv_each),
                kvmlab_batch_mean=stats(kv_mean),
                kvmlab_run=stats(run_ns),
                kvmlab_reset=stats(reset_ns),
                dirty_pages=int(stats(dirty)["median"]),
                unicorn=stats(uc_each) if uc is not None else None,
                unicorn_batch_mean=stats(uc_mean) if uc is not None else None,
                counts=counts,
            )
            row["unicorn_over_kvmlab"] = ratio(row["unicorn"]["median"], row["kvmlab"]["median"]) if uc is not None else math.nan
            row["unicorn_over_kvmlab_mean"] = (
                ratio(row["unicorn_batch_mean"]["median"], row["kvmlab_batch_mean"]["median"]) if uc is not None else math.nan
            )
            rows.append(row)
    finally:
        kv.close()
        if own:
            progress.close()
    return {
        "config": {"iterations": list(iterations), "pages": pages, "memory_mib": memory_mib, "batches": batches,
                   "batch_s": batch_s, "unicorn": None if unicorn_missing else uc.version},
        "unicorn_skipped": unicorn_missing,
        "rows": rows,
        "crossover": crossover(rows),
        "crossover_mean": crossover(rows, key="batch_mean"),
    }


def crossover(rows: list[dict[str, Any]], key: str = "") -> dict[str, Any]:
    """Where kvmlab's median cycle becomes faster than unicorn's: the first N
    from which kvmlab stays faster, and a log-log interpolation between the
    two bracketing N. ``key="batch_mean"`` compares the per-batch means."""
    kk, ku = ("kvmlab_batch_mean", "unicorn_batch_mean") if key == "batch_mean" else ("kvmlab", "unicorn")
    pts = [(r["iterations"], r[kk]["median"], r[ku]["median"]) for r in rows if r.get(ku)]
    if not pts:
        return {"n": None, "estimate": None, "text": "unicorn not measured"}
    first = None
    for i in range(len(pts)):
        if all(k < u for _n, k, u in pts[i:]):
            first = i
            break
    if first is None:
        return {"n": None, "estimate": None, "text": f"kvmlab never becomes faster up to N={pts[-1][0]}"}
    if first == 0:
        return {"n": pts[0][0], "estimate": None, "text": f"kvmlab is faster already at N={pts[0][0]}"}
    (n0, k0, u0), (n1, k1, u1) = pts[first - 1], pts[first]
    # log(u/k) goes from >= 0 at n0 to < 0 at n1; interpolate its zero in log N.
    d0, d1 = math.log(u0 / k0), math.log(u1 / k1)
    frac = d0 / (d0 - d1) if d0 != d1 else 0.5
    est = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
    return {"n": n1, "estimate": est,
            "text": f"kvmlab overtakes unicorn between N={n0} and N={n1} (log-interpolated N≈{est:,.0f})"}


def format_cycle(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"run+reset cycle: N iterations writing {cfg['pages']} pages, {cfg['memory_mib']} MiB; kvmlab = Vm.boot(bytes) "
        "at CPL3, snapshot at entry, copy restore, vm.reset_loop; unicorn "
        f"{cfg['unicorn'] or '(absent)'} = emu_start to the exit + context_restore + mem_write of the dirty pages, "
        f"from Python; time per cycle: median (min–max) over all cycles of {cfg['batches']} batches per side; "
        "'mean' = median over batches of wall time / cycles (includes the Python call and slow outliers)",
    ]
    if result.get("unicorn_skipped"):
        lines.append(f"unicorn: skipped: {result['unicorn_skipped']}")
    lines.append("")
    header = ["N", "kvmlab", "(run | reset)", "unicorn", "unicorn/kvmlab", "mean kvmlab", "mean unicorn", "ratio of means", "same result"]
    rows = []
    for r in result["rows"]:
        same = "yes" if r["correct_kvmlab"] and r.get("correct_unicorn", True) else "NO"
        rows.append([
            f"{r['iterations']:,}", fmt_stat(r["kvmlab"]),
            f"{fmt_time(r['kvmlab_run']['median'])} | {fmt_time(r['kvmlab_reset']['median'])}",
            fmt_stat(r["unicorn"]) if r.get("unicorn") else "skipped",
            f"{r['unicorn_over_kvmlab']:.2f}x" if not math.isnan(r["unicorn_over_kvmlab"]) else "-",
            fmt_time(r["kvmlab_batch_mean"]["median"]),
            fmt_time(r["unicorn_batch_mean"]["median"]) if r.get("unicorn_batch_mean") else "-",
            f"{r['unicorn_over_kvmlab_mean']:.2f}x" if not math.isnan(r["unicorn_over_kvmlab_mean"]) else "-", same,
        ])
    lines += _table(header, rows)
    lines.append("")
    lines.append("crossover (medians per cycle): " + result["crossover"]["text"])
    lines.append("crossover (means per batch): " + result["crossover_mean"]["text"])
    return "\n".join(lines)


def cmd_bench_reset(args: argparse.Namespace) -> int:
    from .errors import KvmlabError

    if not reset_floor_available():
        print("kvmlab bench reset: this native core has no kvmlab_bench_reset_floor (rebuild: pip install -e .)", file=sys.stderr)
        return 1
    host = host_info()
    iters = [] if args.no_cycle else args.cycle_iterations
    total = len(args.dirty_pages) * len(RESET_CONFIGS) * (args.n + args.warmup) * 2 + len(iters) * args.cycle_batches * 2
    progress = _Progress(total, args.quiet, unit="step")
    doc: dict[str, Any] = {"host": host, "unix_time": time.time()}
    try:
        doc["reset"] = bench_reset(args.dirty_pages, memory_mib=args.memory_mib, n=args.n, warmup=args.warmup, progress=progress)
        if iters:
            doc["cycle"] = bench_cycle(iters, pages=args.cycle_pages, memory_mib=args.cycle_memory_mib,
                                       batches=args.cycle_batches, progress=progress)
    except KvmlabError as e:
        progress.close()
        print(f"kvmlab bench reset: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    progress.close()
    print(_host_line(host))
    print(format_reset(doc["reset"]))
    if "cycle" in doc:
        print()
        print(format_cycle(doc["cycle"]))
    if args.json:
        _write_json(args.json, doc)
        print(f"\nwrote {args.json}")
    return 0


# == kvmlab bench fork =========================================================================

#: zeroboot's published figure (bare-metal KVM, 256 MiB guest): 1,000 forks in 815 ms, ~265 KB each.
ZEROBOOT_REFERENCE = {"n": 1000, "ready_ms": 815, "kb_per_vm": 265}


def make_service_snapshot(memory_mib: int, out_dir: Path, dense_fraction: float = 0.0) -> Path:
    """The ``service`` guest at its service checkpoint, saved to a file. With
    ``dense_fraction`` > 0 the host first writes one non-zero word into that
    fraction of guest pages (from 0x400000), so the snapshot is dense."""
    from . import Vm, VmConfig
    from .vm import SERVICE_TAG

    with Vm.boot("service", VmConfig(memory_mib=memory_mib)) as vm:
        r = vm.run(timeout_s=60)
        if r.reason != "checkpoint" or r.checkpoint_tag != SERVICE_TAG:
            raise RuntimeError(f"the service guest did not reach its checkpoint: {r}")
        if dense_fraction > 0:
            _fill_pages(vm, memory_mib, dense_fraction)
        with vm.snapshot() as snap:
            tag = f"-dense{round(dense_fraction * 100)}" if dense_fraction > 0 else ""
            return snap.save(out_dir / f"service{tag}-{memory_mib}mib.kvmsnap")


def _fill_pages(vm, memory_mib: int, fraction: float) -> int:
    total = memory_mib * (1 << 20) // _PAGE
    pages = min(int(total * fraction), (memory_mib * (1 << 20) - _FREE_BASE) // _PAGE)
    chunk = 4096  # pages per write
    for first in range(0, pages, chunk):
        cnt = min(chunk, pages - first)
        buf = bytearray(cnt * _PAGE)
        for p in range(cnt):
            buf[p * _PAGE:p * _PAGE + 8] = ((first + p) * 0x9E3779B97F4A7C15 % (1 << 64) | 1).to_bytes(8, "little")
        vm.write_memory(_FREE_BASE + first * _PAGE, buf)
    return pages


def bench_fork(
    ns: Sequence[int] = (100, 1000),
    *,
    memory_mib: int = 256,
    reps: int = 3,
    threads: int | None = None,
    call: bool = True,
    progress: "_Progress | None" = None,
    tmp_dir: Path | None = None,
) -> dict[str, Any]:
    """For each n: ``reps`` times ``kvmlab.fork_many(snap, n)`` of the service
    guest at its checkpoint (``memory_mib``, 1 vCPU): wall time until all n
    are ready, this process's RSS/PSS growth and the host's MemAvailable drop,
    each divided by n; then (``call``) every VM answers one request and the
    memory is measured again; then the VMs are closed (timed)."""
    import gc

    from . import Snapshot, fork_many
    from .fork import memory_usage

    own = progress is None
    if progress is None:
        progress = _Progress(len(ns) * reps, True, unit="fork set")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmlab-bench-fork-", dir=tmp_dir) as tmp:
        progress.describe(f"fork: snapshot service {memory_mib} MiB")
        path = make_service_snapshot(memory_mib, Path(tmp))
        with Snapshot.load(path) as snap:
            present = snap.present_pages
            for n in ns:
                ready, rss, pss, host, rss_c, pss_c, host_c, close_ns, call_ns = ([] for _ in range(9))
                error = None
                for _rep in range(reps):
                    progress.describe(f"fork n={n}")
                    gc.collect()
                    try:
                        vms = fork_many(snap, n, threads=threads)
                    except Exception as e:  # noqa: BLE001 - a host limit is a result here
                        error = f"{type(e).__name__}: {e}"
                        break
                    try:
                        st = vms.stats
                        ready.append(st.ready_ns)
                        rss.append(st.rss_bytes_per_vm)
                        pss.append(st.pss_bytes_per_vm)
                        host.append(st.host_bytes_per_vm)
                        if call:
                            before = memory_usage()
                            t0 = time.perf_counter_ns()
                            for vm in vms:
                                if vm.call(b"ping") != b"ping":
                                    raise RuntimeError("a forked VM answered wrongly")
                            call_ns.append((time.perf_counter_ns() - t0) / n)
                            after = memory_usage()
                            rss_c.append((after["rss_bytes"] - before["rss_bytes"]) / n + st.rss_bytes_per_vm)
                            pss_c.append((after["pss_bytes"] - before["pss_bytes"]) / n + st.pss_bytes_per_vm)
                            host_c.append((before["available_bytes"] - after["available_bytes"]) / n + st.host_bytes_per_vm)
                    finally:
                        t0 = time.perf_counter_ns()
                        vms.close()
                        close_ns.append(time.perf_counter_ns() - t0)
                    progress.update(1)
                rows.append({
                    "n": n, "error": error, "threads": threads or min(8, (os.cpu_count() or 2) * 2),
                    "ready": stats(ready), "ready_per_vm": stats([x / n for x in ready]),
                    "rss_per_vm": stats(rss), "pss_per_vm": stats(pss), "host_per_vm": stats(host),
                    "after_call": {"rss_per_vm": stats(rss_c), "pss_per_vm": stats(pss_c), "host_per_vm": stats(host_c),
                                   "call": stats(call_ns)} if call else None,
                    "close": stats(close_ns),
                })
    if own:
        progress.close()
    return {"config": {"ns": list(ns), "memory_mib": memory_mib, "reps": reps, "guest": "service",
                       "present_pages": present, "reference": ZEROBOOT_REFERENCE,
                       "limits": fork_limits()},
            "rows": rows}


def fork_limits() -> dict[str, Any]:
    """The host limits that bound how many VMs one process can hold."""
    import resource

    from . import _ffi

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"nofile_soft": soft, "nofile_hard": hard}
    try:
        out["max_map_count"] = int(Path("/proc/sys/vm/max_map_count").read_text())
    except OSError:
        pass
    try:
        info = _ffi.ffi.new("kvmlab_host_info *")
        _ffi.check(_ffi.lib.kvmlab_host_info_get(info))
        out["kvm_memslots_per_vm"] = int(info.nr_memslots)
    except Exception:  # noqa: BLE001
        pass
    return out


def _kb(b: float) -> str:
    if b is None or math.isnan(b):
        return "-"
    return f"{b / 1024:,.0f} KiB"


def format_fork(result: dict[str, Any]) -> str:
    cfg = result["config"]
    ref = cfg["reference"]
    lim = cfg["limits"]
    lines = [
        f"fork density: kvmlab.fork_many of the service guest at its checkpoint, {cfg['memory_mib']} MiB, 1 vCPU, "
        f"{cfg['present_pages']} present pages; median (min–max) over {cfg['reps']} repetitions",
        "memory per VM = growth / n of this process's RSS and PSS, and the drop of MemAvailable "
        "(includes KVM's kernel allocations); 'after call' = once every VM answered one request",
        "",
    ]
    header = ["n", "ready (all n)", "per VM", "RSS/VM", "PSS/VM", "MemAvail/VM", "after call PSS/VM", "MemAvail/VM", "close"]
    rows = []
    for r in result["rows"]:
        if r["error"] and not r["ready"]["n"]:
            rows.append([str(r["n"]), f"FAILED: {r['error']}"] + [""] * 7)
            continue
        ac = r["after_call"] or {}
        rows.append([
            str(r["n"]), fmt_stat(r["ready"]), fmt_time(r["ready_per_vm"]["median"]),
            _kb(r["rss_per_vm"]["median"]), _kb(r["pss_per_vm"]["median"]), _kb(r["host_per_vm"]["median"]),
            _kb(ac.get("pss_per_vm", {}).get("median", math.nan)) if ac else "-",
            _kb(ac.get("host_per_vm", {}).get("median", math.nan)) if ac else "-",
            fmt_time(r["close"]["median"]),
        ])
    lines += _table(header, rows)
    lines.append("")
    lines.append(f"reference (zeroboot, bare-metal KVM, 256 MiB): {ref['n']:,} forks in {ref['ready_ms']} ms, ~{ref['kb_per_vm']} KB each")
    for r in result["rows"]:
        if r["n"] == ref["n"] and r["ready"]["n"]:
            lines.append(f"  this run, n={r['n']}: {r['ready']['median'] / 1e6:,.0f} ms "
                         f"({r['ready']['median'] / 1e6 / ref['ready_ms']:.2f}x the reference time), "
                         f"{r['host_per_vm']['median'] / 1000:,.0f} KB/VM by MemAvailable, "
                         f"{r['pss_per_vm']['median'] / 1000:,.0f} KB/VM by PSS")
    lines.append(
        f"limits: open files {lim.get('nofile_soft')}/{lim.get('nofile_hard')} (soft/hard; each VM holds 1 + vCPUs fds, plus 1 for a map-restored snapshot file, "
        "raised up to the hard limit automatically; raise the hard one with ulimit -Hn or /etc/security/limits.conf), "
        f"vm.max_map_count {lim.get('max_map_count', '?')} (each VM maps its memory and vCPU run area; "
        "raise with sysctl vm.max_map_count=N), "
        f"KVM memory slots per VM {lim.get('kvm_memslots_per_vm', '?')} (kvmlab uses 1 per VM, not a per-host limit)"
    )
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"n={r['n']} stopped: {r['error']}")
    return "\n".join(lines)


def _run_and_report(name: str, args: argparse.Namespace, progress: "_Progress",
                    run: Callable[["_Progress"], dict[str, Any]], fmt: Callable[[dict[str, Any]], str]) -> dict[str, Any] | None:
    """One ``kvmlab bench NAME`` measurement: ``run(progress)``, then the host
    line and ``fmt(result)`` on stdout and, with ``--json``, the result under
    ``NAME``. None (message on stderr) if the core raised."""
    from .errors import KvmlabError

    host = host_info()
    try:
        res = run(progress)
    except KvmlabError as e:
        progress.close()
        print(f"kvmlab bench {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    progress.close()
    print(_host_line(host))
    print(fmt(res))
    if args.json:
        _write_json(args.json, {"host": host, "unix_time": time.time(), name: res})
        print(f"\nwrote {args.json}")
    return res


def cmd_bench_fork(args: argparse.Namespace) -> int:
    res = _run_and_report(
        "fork", args, _Progress(len(args.n) * args.reps, args.quiet, unit="fork set"),
        lambda progress: bench_fork(args.n, memory_mib=args.memory_mib, reps=args.reps, threads=args.threads,
                                    call=not args.no_call, progress=progress),
        format_fork,
    )
    return 1 if res is None or any(r["error"] for r in res["rows"]) else 0


# == kvmlab bench age ========================================================================

#: Shell ages (ms) measured by default: a fresh shell up to one that waited ~1/10 s.
AGES_MS = (0, 1, 3, 10, 30, 100)


def bench_shell_age(
    ages_ms: Sequence[float] = AGES_MS,
    *,
    memory_mib: int = 256,
    strategy: str = "map",
    n: int = 40,
    warmup: int = 2,
    progress: "_Progress | None" = None,
    tmp_dir: Path | None = None,
) -> dict[str, Any]:
    """What waiting costs a shell: the restore floor (:func:`floor_restore`)
    of a ``counter`` snapshot into a fresh shell that first sleeps ``age``
    ms (busy-waiting), for every age, in a new random order each round,
    ``n`` times each.
    Returns per age the stats (ns) of ``total``, ``memory``, ``vcpu`` and
    ``devices`` and the ratio of the medians to age 0 (this run)."""
    from . import Snapshot

    ages = sorted(set(float(a) for a in ages_ms))
    own = progress is None
    if progress is None:
        progress = _Progress(len(ages) * (n + warmup), True)
    samples: dict[float, dict[str, list[int]]] = {a: {k: [] for k in ("total", "memory", "vcpu", "devices")} for a in ages}
    with tempfile.TemporaryDirectory(prefix="kvmlab-bench-age-", dir=tmp_dir) as tmp:
        progress.describe(f"age: snapshot counter {memory_mib} MiB")
        _label, path, _present = make_snapshot("sparse", memory_mib, Path(tmp), 0.25)
        with Snapshot.load(path) as snap:
            progress.describe(f"age: {strategy} floor into shells of {len(ages)} ages")
            for i in range(-warmup, n):
                for age in random.Random(i).sample(ages, len(ages)):
                    _call, t = floor_restore(snap, strategy, age_s=age / 1000)
                    if i >= 0:
                        for key in samples[age]:
                            samples[age][key].append(t[f"{key}_ns"])
                    progress.update(1)
    if own:
        progress.close()
    base = {key: stats(samples[ages[0]][key])["median"] for key in samples[ages[0]]}
    rows = []
    for age in ages:
        row: dict[str, Any] = {"age_ms": age}
        for key, v in samples[age].items():
            row[key] = stats(v)
            row[f"{key}_ratio"] = ratio(row[key]["median"], base[key])
        rows.append(row)
    return {"config": {"memory_mib": memory_mib, "strategy": strategy, "n": n, "warmup": warmup}, "rows": rows}


def format_age(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"restore floor ({cfg['strategy']}, {cfg['memory_mib']} MiB counter snapshot) into a fresh shell that "
        f"waited 'age' ms first; n={cfg['n']} per age, interleaved; median (min-max); ratio = median / median at the "
        "first age (this run)",
        "",
    ]
    header = ["age", "total", "memory", "vcpu", "devices", "total ratio", "memory ratio", "vcpu ratio"]
    body = [
        [f"{r['age_ms']:g} ms", fmt_stat(r["total"]), fmt_stat(r["memory"]), fmt_stat(r["vcpu"]), fmt_stat(r["devices"]),
         f"{r['total_ratio']:.2f}x", f"{r['memory_ratio']:.2f}x", f"{r['vcpu_ratio']:.2f}x"]
        for r in result["rows"]
    ]
    lines += _table(header, body)
    return "\n".join(lines)


def cmd_bench_age(args: argparse.Namespace) -> int:
    if args.n < 1 or args.warmup < 0 or not args.ages_ms or min(args.ages_ms) < 0 or max(args.ages_ms) > 10_000:
        print("kvmlab bench age: --n >= 1, --warmup >= 0, ages in 0..10000 ms", file=sys.stderr)
        return 2
    res = _run_and_report(
        "age", args, _Progress(len(set(args.ages_ms)) * (args.n + args.warmup), args.quiet),
        lambda progress: bench_shell_age(args.ages_ms, memory_mib=args.memory_mib, strategy=args.strategy,
                                         n=args.n, warmup=args.warmup, progress=progress),
        format_age,
    )
    return 1 if res is None else 0


# == kvmlab bench all ========================================================================


def _benchmarks_module():
    """The ``benchmarks`` package of the source tree (``kvmlab bench all`` and
    ``python -m benchmarks`` run the same code)."""
    try:
        import benchmarks  # noqa: F401

        return benchmarks
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks" / "__init__.py").is_file():
        sys.path.insert(0, str(root))
        import benchmarks

        return benchmarks
    raise ImportError(
        "kvmlab bench all needs the benchmarks/ package of the kvmlab source tree; "
        "run it from a checkout (python -m benchmarks, or pip install -e . there)"
    )


def run_all(out: str | os.PathLike[str] = "bench-results", quick: bool = False, **options: Any) -> dict[str, Any]:
    """``kvmlab bench all`` as a function (e.g. from a notebook): runs it,
    writes ``results.json``, ``results.md`` and the PNG plots into ``out`` and
    returns the results (a dict; ``["figures"]`` holds the matplotlib
    Figures). ``options`` are the command's options with underscores
    (``memory_mib=[64]``, ``skip=["fork"]``, ``quiet=True``, ...)."""
    return _benchmarks_module().run_all(out=out, quick=quick, **options)


def cmd_bench_all(args: argparse.Namespace) -> int:
    try:
        mod = _benchmarks_module()
    except ImportError as e:
        print(f"kvmlab bench all: {e}", file=sys.stderr)
        return 1
    return mod.run_from_args(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``bench`` (with its subcommand ``restore``) on an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmarks", description="kvmlab benchmarks")
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    sub.required = True
    r = sub.add_parser(
        "restore",
        help="pooled vs unpooled snapshot restore, against the host's floor",
        description=(
            "Restores the same file-backed snapshot N times per memory size and strategy on four "
            "interleaved paths: pooled (an idle shell of a settled RestorePool), unpooled (Vm.restore, "
            "shell made on demand), floor (only the bare ioctls and memory operations, into a fresh "
            "shell) and floor-idle (the same into an idle shell of a settled pool, the like-for-like "
            "floor of a pooled restore). Prints p50/p90/p99 of every phase and the ratios of the "
            "medians of this run."
        ),
    )
    r.add_argument("--memory-mib", type=_int_list, default=[64, 256], metavar="LIST",
                   help="guest memory sizes in MiB, comma-separated (default 64,256)")
    r.add_argument("--strategies", type=_strategy_list, default=["copy", "map"], metavar="LIST",
                   help="restore strategies, comma-separated: copy,map (default both)")
    r.add_argument("--n", type=int, default=200, help="measured restores per path and case (default 200)")
    r.add_argument("--warmup", type=int, default=3, help="unmeasured restores first (default 3)")
    r.add_argument("--dense", action="store_true",
                   help="also a dense snapshot: memtouch with --dense-fraction of memory touched")
    r.add_argument("--dense-fraction", type=float, default=0.25, help="fraction of memory touched (default 0.25)")
    r.add_argument("--no-run", action="store_true", help="do not run restored VMs (no first_run figures)")
    r.add_argument("--no-floor", action="store_true", help="skip the floor path")
    r.add_argument("--json", metavar="PATH", help="write every record and the summary as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    r.set_defaults(func=_checked(cmd_bench_restore))

    rs = sub.add_parser(
        "reset",
        help="dirty-page reset vs its floor, and a run+reset cycle against unicorn",
        description=(
            "For each K in --dirty-pages: memtouch (pages=K rounds=2) restored resettable at round 1's "
            "checkpoint; each iteration runs it (round 2 writes K pages) and resets it, alternating with "
            "the native reset floor (kvmlab_bench_reset_floor) on the same VM; reports median reset / "
            "floor per K for copy and map restores (reset modes copy and drop). Then the run+reset cycle "
            "of the same raw x86-64 guest work in kvmlab (reset_loop) and in unicorn, per N iterations."
        ),
    )
    rs.add_argument("--dirty-pages", type=_int_list, default=[1, 16, 256, 4096], metavar="LIST",
                    help="pages written per run, comma-separated (default 1,16,256,4096)")
    rs.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    rs.add_argument("--n", type=int, default=100, help="resets and floors per row (default 100)")
    rs.add_argument("--warmup", type=int, default=5, help="unmeasured iterations first (default 5)")
    rs.add_argument("--cycle-iterations", type=_int_list, default=[1, 10, 100, 1000, 10_000, 100_000, 1_000_000],
                    metavar="LIST", help="N of the kvmlab/unicorn cycle (default 1,10,...,1000000)")
    rs.add_argument("--cycle-pages", type=int, default=4, help="pages the cycle guest writes per iteration (default 4)")
    rs.add_argument("--cycle-memory-mib", type=int, default=64, help="memory of the cycle guest (default 64)")
    rs.add_argument("--cycle-batches", type=int, default=7, help="batches per N and side (default 7)")
    rs.add_argument("--no-cycle", action="store_true", help="skip the kvmlab/unicorn cycle")
    rs.add_argument("--json", metavar="PATH", help="write the results as JSON")
    rs.add_argument("--quiet", action="store_true", help="no progress on stderr")
    rs.set_defaults(func=_checked_reset(cmd_bench_reset))

    fk = sub.add_parser(
        "fork",
        help="fork density: time and host memory to have n VMs ready (fork_many)",
        description=(
            "For each n: kvmlab.fork_many of a 256 MiB snapshot of the service guest at its checkpoint "
            "(1 vCPU): wall time until all n VMs are ready, and host memory per VM (RSS/PSS growth and "
            "MemAvailable drop divided by n), before and after every VM answered one request."
        ),
    )
    fk.add_argument("--n", type=_int_list, default=[100, 1000], metavar="LIST", help="VM counts (default 100,1000)")
    fk.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    fk.add_argument("--reps", type=int, default=3, help="repetitions per n (default 3)")
    fk.add_argument("--threads", type=int, default=None, help="fork_many threads (default: its own)")
    fk.add_argument("--no-call", action="store_true", help="do not send every VM a request")
    fk.add_argument("--json", metavar="PATH", help="write the results as JSON")
    fk.add_argument("--quiet", action="store_true", help="no progress on stderr")
    fk.set_defaults(func=_checked_fork(cmd_bench_fork))

    ag = sub.add_parser(
        "age",
        help="what waiting costs a shell: the restore floor into shells that waited 0..100 ms",
        description=(
            "The restore floor (bare ioctls and memory operations) into a fresh shell that first waits "
            "AGE ms, for every age, interleaved: shows why a pooled restore is compared with the floor "
            "into an idle pooled shell (floor-idle in kvmlab bench restore)."
        ),
    )
    ag.add_argument("--ages-ms", type=_float_list, default=list(AGES_MS), metavar="LIST",
                    help="shell ages in ms, comma-separated (default 0,1,3,10,30,100)")
    ag.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    ag.add_argument("--strategy", choices=["copy", "map"], default="map", help="memory strategy (default map)")
    ag.add_argument("--n", type=int, default=40, help="restores per age (default 40)")
    ag.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    ag.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ag.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ag.set_defaults(func=cmd_bench_age)

    al = sub.add_parser(
        "all",
        help="every benchmark against its peers (QEMU, unicorn) in one run: JSON, Markdown, PNG plots",
        description=(
            "Runs, on this machine in one go: pooled/unpooled/floor/native restores, restore + first "
            "answer, QEMU microvm -incoming and unicorn restores for 64/256 MiB sparse and dense "
            "snapshots, the reset-vs-floor table, the kvmlab/unicorn cycle and fork density; writes "
            "results.json, results.md and PNG plots into --out. The same as python -m benchmarks."
        ),
    )
    _all_arguments(al)
    al.set_defaults(func=cmd_bench_all)
    return bench


def _all_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmlab bench all`` / ``python -m benchmarks``."""
    p.add_argument("--out", default="bench-results", metavar="DIR", help="output directory (default ./bench-results)")
    p.add_argument("--quick", action="store_true", help="reduced repetitions (seconds, not minutes): for notebooks and tests")
    p.add_argument("--memory-mib", type=_int_list, default=None, metavar="LIST", help="guest sizes (default 64,256)")
    p.add_argument("--n", type=int, default=None, help="repetitions of each kvmlab restore row (default 200; quick 5)")
    p.add_argument("--qemu-n", type=int, default=None, help="QEMU restores per size (default 15; quick 2)")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY", help="the QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--skip", default="", metavar="LIST",
                   help="parts to leave out, comma-separated: qemu,unicorn,reset,cycle,fork")
    p.add_argument("--fork-n", type=_int_list, default=None, metavar="LIST", help="fork counts (default 100,1000; quick 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")


def _checked_reset(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.n < 1 or args.warmup < 0 or args.cycle_batches < 1:
            print("kvmlab bench reset: --n and --cycle-batches must be >= 1, --warmup >= 0", file=sys.stderr)
            return 2
        if any(k < 1 for k in args.dirty_pages) or not 1 <= args.cycle_pages <= 4096:
            print("kvmlab bench reset: page counts must be >= 1 (cycle pages at most 4096)", file=sys.stderr)
            return 2
        free = (args.memory_mib << 20) - _FREE_BASE
        if max(args.dirty_pages) * _PAGE > free:
            print(f"kvmlab bench reset: {max(args.dirty_pages)} pages do not fit in {args.memory_mib} MiB", file=sys.stderr)
            return 2
        if any(n < 1 for n in args.cycle_iterations):
            print("kvmlab bench reset: --cycle-iterations must be >= 1", file=sys.stderr)
            return 2
        return fn(args)

    return run


def _checked_fork(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if any(n < 1 for n in args.n) or args.reps < 1:
            print("kvmlab bench fork: --n values and --reps must be >= 1", file=sys.stderr)
            return 2
        return fn(args)

    return run


def _checked(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.n < 1 or args.warmup < 0:
            print("kvmlab bench: --n must be >= 1 and --warmup >= 0", file=sys.stderr)
            return 2
        if not 0 < args.dense_fraction <= 1:
            print("kvmlab bench: --dense-fraction must be in (0, 1]", file=sys.stderr)
            return 2
        if any(m < 8 or m % 2 for m in args.memory_mib):
            print("kvmlab bench: --memory-mib values must be even and >= 8", file=sys.stderr)
            return 2
        return fn(args)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """``main(["restore", "--n", "100"])``: the same as ``kvmlab bench restore --n 100``."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
