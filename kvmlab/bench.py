"""``kvmlab bench restore``: how fast a snapshot restore is, pooled and not,
against the floor of what this host allows.

For each memory size and strategy, the same file-backed snapshot is restored
``--n`` times on three paths, interleaved so that the machine's noise hits all
three alike:

* ``pooled``: :meth:`RestorePool.restore_snapshot` into an idle shell of a
  settled pool (the refill and the previous VM's destruction are finished
  before each restore, so each one is a hit on a quiet pool);
* ``unpooled``: :meth:`Vm.restore`, which creates the shell on demand (its
  ``acquire`` phase is the shell creation);
* ``floor``: ``kvmlab_bench_restore_floor``, only the bare ioctls and memory
  operations of a restore, into a fresh shell made beforehand (untimed).

Every path reports the same phases (integer ns): ``acquire``, ``memory``,
``vcpu``, ``devices`` and ``total``; restored VMs are then run once (to their
next checkpoint or exit) and ``first_run`` is that run's time. The summary
prints p50/p90/p99 in microseconds and the ratios of the medians of this run.

The snapshots are realistic: the ``counter`` guest at its checkpoint (sparse:
a handful of non-zero pages) and, with ``--dense``, ``memtouch`` between two
rounds with ``--dense-fraction`` of guest memory touched.

    kvmlab bench restore --memory-mib 64,256 --strategies copy,map --n 200 --json out.json
    python -c "import kvmlab.bench as b; b.main(['restore', '--n', '50'])"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["add_parser", "main", "cmd_bench_restore", "percentile", "host_info", "PHASES"]

#: Phases reported for every path, in output order.
PHASES = ("total", "acquire", "memory", "vcpu", "devices", "first_run")

#: Targets reported (never asserted) for pooled map restores of 256 MiB.
TARGET_FLOOR_RATIO = 1.5  # pooled total p50 within 1.5x of the floor
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


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one value")
    return out


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
    path: str  # pooled | unpooled | floor
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


def _wait_settled(pool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        s = pool.stats()
        if s.idle >= 1 and s.creating == 0 and s.pending_destroy == 0:
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
        getattr(_ffi.lib, "kvmlab_bench_restore_floor")
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


def _one_floor(snap, case: Case, i: int) -> Record:
    from . import _ffi
    from .snapshot import strategy_code

    ffi, lib = _ffi.ffi, _ffi.lib
    c = ffi.new("kvmlab_vm_config *", {"memory_bytes": case.memory_mib << 20, "vcpus": snap.vcpus})
    out = ffi.new("kvmlab_vm **")
    _ffi.check(lib.kvmlab_vm_new(c, out))
    t = ffi.new("kvmlab_restore_times *")
    try:
        with snap._use() as sh:
            t0 = time.perf_counter_ns()
            rc = lib.kvmlab_bench_restore_floor(out[0], sh, strategy_code(case.strategy), t)
            call = time.perf_counter_ns() - t0
            _ffi.check(rc)
    finally:
        lib.kvmlab_vm_free(out[0])
    times = {name: int(getattr(t, name)) for name, _f in ffi.typeof("kvmlab_restore_times").fields}
    rec = _timing_record("floor", case, i, times, call)
    rec.acquire_ns = None  # the shell was made beforehand, untimed
    return rec


def run_case(case: Case, n: int, warmup: int, run: bool, with_floor: bool, progress: _Progress) -> list[Record]:
    """``warmup`` + ``n`` interleaved iterations of every path; returns the ``n`` measured ones."""
    from . import PoolConfig, RestorePool, Snapshot, VmConfig

    records: list[Record] = []
    with Snapshot.load(case.path) as snap:
        case.present_pages = snap.present_pages
        with RestorePool(VmConfig(memory_mib=case.memory_mib, vcpus=snap.vcpus), PoolConfig(min_size=1, max_size=2)) as pool:
            paths: list[Callable[[int], Record]] = [
                lambda i: _one_pooled(pool, snap, case, i, run),
                lambda i: _one_unpooled(snap, case, i, run),
            ]
            if with_floor:
                paths.append(lambda i: _one_floor(snap, case, i))
            for i in range(-warmup, n):
                # Rotate the order so no path always runs right after another one.
                k = i % len(paths)
                for fn in paths[k:] + paths[:k]:
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
        "floor = bare ioctls/memory ops into a fresh shell",
    ]
    if floor_note:
        lines.append(f"floor: {floor_note}")
    cols = ["total", "acquire", "memory", "vcpu", "devices", "first_run"]
    header = ["guest", "MiB", "strategy", "path"] + cols + ["hits"]
    table = [header]
    by_key: dict[tuple, dict[str, dict]] = {}
    order = {"pooled": 0, "unpooled": 1, "floor": 2}
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
    lines.append("ratios of total p50 (this run):")
    for (guest, mem, strategy), paths in by_key.items():
        p = paths.get("pooled")
        u = paths.get("unpooled")
        f = paths.get("floor")
        if not p:
            continue
        parts = []
        if u:
            ratio = p["total"][50] / u["total"][50]
            parts.append(f"pooled/unpooled {ratio:.3f} ({u['total'][50] / p['total'][50]:.1f}x faster)")
        if f:
            parts.append(f"pooled/floor {p['total'][50] / f['total'][50]:.2f}x")
        lines.append(f"  {guest:>10} {mem:>5} MiB {strategy:<4}  " + "; ".join(parts))
    target = by_key.get(("counter", 256, "map"))
    lines.append("")
    if target and "pooled" in target:
        p = target["pooled"]["total"][50]
        msgs = []
        if "floor" in target:
            r = p / target["floor"]["total"][50]
            msgs.append(f"pooled/floor {r:.2f}x (target <= {TARGET_FLOOR_RATIO}x: {'met' if r <= TARGET_FLOOR_RATIO else 'MISSED'})")
        else:
            msgs.append("pooled/floor: no floor in this run")
        if "unpooled" in target:
            s = target["unpooled"]["total"][50] / p
            msgs.append(f"{s:.1f}x faster than unpooled (target >= {TARGET_SPEEDUP}x: {'met' if s >= TARGET_SPEEDUP else 'MISSED'})")
        lines.append("targets, pooled map restore of 256 MiB (counter): " + "; ".join(msgs))
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
    n_paths = 2 + int(with_floor)
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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``bench`` (with its subcommand ``restore``) on an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmarks", description="kvmlab benchmarks")
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    sub.required = True
    r = sub.add_parser(
        "restore",
        help="pooled vs unpooled snapshot restore, against the host's floor",
        description=(
            "Restores the same file-backed snapshot N times per memory size and strategy on three "
            "interleaved paths: pooled (an idle shell of a settled RestorePool), unpooled (Vm.restore, "
            "shell made on demand) and floor (only the bare ioctls and memory operations, into a fresh "
            "shell). Prints p50/p90/p99 of every phase and the ratios of the medians of this run."
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
    return bench


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
    p = argparse.ArgumentParser(prog="kvmlab")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    args = p.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
