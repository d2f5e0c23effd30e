"""``kvmlab bench ...``: the argparse commands (``kvmlab.cli`` adds them
through :func:`add_parser`); each runs a benchmark function, prints its
report and, with ``--json PATH``, saves its :class:`Results`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, KvmlabError
from ._native import reset_floor_available
from .age import AGES_MS, bench_age
from .all import PARTS, run_all
from .campaign import campaign_parser
from .first_answer import bench_first_answer
from .fork import bench_fork
from .harness import DENSE_FRACTION
from .report import markdown, text, write_docs
from .reset import bench_reset
from .restore import bench_restore
from .results import Results

__all__ = ["add_parser", "main"]


def _number_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            out = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not out:
            raise argparse.ArgumentTypeError("expected at least one value")
        return out

    return parse


def _strategy_list(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or any(x not in ("copy", "map") for x in out):
        raise argparse.ArgumentTypeError(f"strategies are copy and/or map, got {text!r}")
    return out


def _command(args: argparse.Namespace) -> str:
    """The command line that repeats this run, every option spelled out."""
    parts = ["kvmlab", "bench", args.bench_command]
    for key, value in vars(args).items():
        if key in ("func", "command", "bench_command", "json", "quiet") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value != "":
            parts += [flag, ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)
                      if isinstance(value, list) else str(value)]
    return shlex.join(parts)


def _finish(name: str, run: Callable[[], Results], args: argparse.Namespace,
            show: Callable[[Results], str] = text) -> int:
    """Runs one benchmark; prints ``show(results)`` (the text report); saves
    it with --json. Exit code 2 for a bad argument, 1 (message on stderr) if
    the core raised or a part failed."""
    try:
        res = run()
    except ConfigError as e:  # a bad argument: a usage error
        print(f"{e}", file=sys.stderr)
        return 2
    except KvmlabError as e:
        print(f"kvmlab bench {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(show(res))
    if getattr(args, "json", None):
        res.save(args.json)
        print(f"wrote {args.json}")
    return 1 if res.errors else 0


def cmd_restore(args: argparse.Namespace) -> int:
    return _finish("restore", lambda: bench_restore(
        args.memory_mib, strategies=args.strategies, n=args.n, warmup=args.warmup, dense=args.dense,
        dense_fraction=args.dense_fraction, run_first=not args.no_run, floor=not args.no_floor, quiet=args.quiet,
        command=_command(args)), args)


def cmd_reset(args: argparse.Namespace) -> int:
    if not reset_floor_available():
        print("kvmlab bench reset: this native core has no reset floor (rebuild: pip install -e .)", file=sys.stderr)
        return 1
    return _finish("reset", lambda: bench_reset(
        args.dirty_pages, memory_mib=args.memory_mib, n=args.n, warmup=args.warmup,
        cycle_iterations=[] if args.no_cycle else args.cycle_iterations, cycle_pages=args.cycle_pages,
        cycle_memory_mib=args.cycle_memory_mib, cycle_batches=args.cycle_batches, quiet=args.quiet,
        command=_command(args)), args)


def cmd_fork(args: argparse.Namespace) -> int:
    return _finish("fork", lambda: bench_fork(args.n, memory_mib=args.memory_mib, reps=args.reps, threads=args.threads,
                                              call=not args.no_call, quiet=args.quiet, command=_command(args)), args)


def cmd_first_answer(args: argparse.Namespace) -> int:
    return _finish("first-answer", lambda: bench_first_answer(
        args.memory_mib, dense=not args.no_dense, n=args.n, warmup=args.warmup, qemu_n=args.qemu_n,
        qemu=None if args.no_qemu else args.qemu, quiet=args.quiet, command=_command(args)), args)


def cmd_age(args: argparse.Namespace) -> int:
    return _finish("age", lambda: bench_age(args.ages_ms, memory_mib=args.memory_mib, strategy=args.strategy, n=args.n,
                                            warmup=args.warmup, quiet=args.quiet, command=_command(args)), args)


def cmd_all(args: argparse.Namespace) -> int:
    def show(res: Results) -> str:
        plots = "".join(f", {name}.png" for name in res.figures)
        return f"{markdown(res)}\nwrote {Path(args.out) / 'results.json'}, results.md{plots}"

    return _finish("all", lambda: run_all(
        args.out, args.quick, memory_mib=args.memory_mib, n=args.n, qemu_n=args.qemu_n, qemu=args.qemu, skip=args.skip,
        fork_n=args.fork_n, quiet=args.quiet, no_plots=args.no_plots, command=_command(args)), args, show)


def cmd_docs(args: argparse.Namespace) -> int:
    try:
        write_docs(args.results, args.readme, args.performance)
    except KvmlabError as e:
        print(f"kvmlab bench docs: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote the headline table into {args.readme} and {args.performance} from {args.results}")
    return 0


def _common(p: argparse.ArgumentParser, json: bool = True) -> None:
    if json:
        p.add_argument("--json", metavar="PATH", help="save the results (JSON; kvmlab.bench.load_results reads it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def _restore_parser(sub: Any) -> None:
    r = sub.add_parser("restore", help="pooled vs unpooled snapshot restore, against the host's floor", description=(
        "Restores the same file-backed snapshot N times per memory size and strategy on four interleaved paths: "
        "pooled (an idle shell of a settled RestorePool), unpooled (Vm.restore, shell made on the call), floor "
        "(only the bare restore operations, into a fresh shell) and the floor into an idle pooled shell. Prints "
        "the targets (computed per cell), median (min-max) and p50/p90/p99 of every phase."))
    r.add_argument("--memory-mib", type=_number_list(int), default=[64, 256], metavar="LIST",
                   help="guest memory sizes in MiB, comma-separated (default 64,256)")
    r.add_argument("--strategies", type=_strategy_list, default=["copy", "map"], metavar="LIST",
                   help="restore strategies, comma-separated: copy,map (default both)")
    r.add_argument("--n", type=int, default=200, help="measured restores per path and case (default 200)")
    r.add_argument("--warmup", type=int, default=3, help="unmeasured restores first (default 3)")
    r.add_argument("--dense", action="store_true", help="also a dense snapshot: memtouch with --dense-fraction touched")
    r.add_argument("--dense-fraction", type=float, default=DENSE_FRACTION,
                   help=f"fraction of memory touched (default {DENSE_FRACTION})")
    r.add_argument("--no-run", action="store_true", help="do not run restored VMs (no first_run figures)")
    r.add_argument("--no-floor", action="store_true", help="skip the floor paths")
    _common(r)
    r.set_defaults(func=cmd_restore)


def _reset_parser(sub: Any) -> None:
    rs = sub.add_parser("reset", help="dirty-page reset vs its floor, and a run+reset cycle against unicorn",
                        description=(
        "For each K in --dirty-pages: memtouch (pages=K rounds=2) restored resettable at round 1's checkpoint; "
        "each iteration runs it and either resets it or takes the native reset floor, alternating on the same VM; "
        "the target (call / floor) is computed per K and configuration. Then the run+reset cycle of the same raw "
        "x86-64 loop in kvmlab (reset_loop) and in unicorn, per N iterations."))
    rs.add_argument("--dirty-pages", type=_number_list(int), default=[1, 16, 256, 4096], metavar="LIST",
                    help="pages written per run, comma-separated (default 1,16,256,4096)")
    rs.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    rs.add_argument("--n", type=int, default=100, help="resets and floors per row (default 100)")
    rs.add_argument("--warmup", type=int, default=5, help="unmeasured iterations first (default 5)")
    rs.add_argument("--cycle-iterations", type=_number_list(int), default=[1, 10, 100, 1000, 10_000, 100_000, 1_000_000],
                    metavar="LIST", help="N of the kvmlab/unicorn cycle (default 1,10,...,1000000)")
    rs.add_argument("--cycle-pages", type=int, default=4, help="pages the cycle guest writes per iteration (default 4)")
    rs.add_argument("--cycle-memory-mib", type=int, default=64, help="memory of the cycle guest (default 64)")
    rs.add_argument("--cycle-batches", type=int, default=7, help="batches per N and side (default 7)")
    rs.add_argument("--no-cycle", action="store_true", help="skip the kvmlab/unicorn cycle")
    _common(rs)
    rs.set_defaults(func=cmd_reset)


def _other_parsers(sub: Any) -> None:
    fk = sub.add_parser("fork", help="fork density: time and host memory to have n VMs ready (fork_many)",
                        description="For each n: kvmlab.fork_many of a service snapshot: time until all n VMs are "
                                    "ready and host memory per VM, before and after every VM answered one request.")
    fk.add_argument("--n", type=_number_list(int), default=[100, 1000], metavar="LIST", help="VM counts (default 100,1000)")
    fk.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    fk.add_argument("--reps", type=int, default=3, help="repetitions per n (default 3)")
    fk.add_argument("--threads", type=int, default=None, help="fork_many threads (default: its own)")
    fk.add_argument("--no-call", action="store_true", help="do not send every VM a request")
    _common(fk)
    fk.set_defaults(func=cmd_fork)

    fa = sub.add_parser("first-answer", help="restore to first answer: unpooled, pooled shell, prepared, QEMU",
                        description="The service guest restored and asked one request, per path (unpooled, pooled "
                                    "shell, prepared, prepared with warmup, the warm-call floor), copy and map, "
                                    "interleaved; QEMU -incoming cold and pre-started (-incoming defer) beside. "
                                    "Prints p50/p99, ratios and the targets (computed per cell).")
    fa.add_argument("--memory-mib", type=_number_list(int), default=[64, 256], metavar="LIST",
                    help="guest memory sizes in MiB, comma-separated (default 64,256)")
    fa.add_argument("--n", type=int, default=200, help="measured restores per path and case (default 200)")
    fa.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    fa.add_argument("--no-dense", action="store_true", help="sparse snapshots only")
    fa.add_argument("--qemu-n", type=int, default=10, help="QEMU restores per mode and case (default 10)")
    fa.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY", help="the QEMU binary")
    fa.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    _common(fa)
    fa.set_defaults(func=cmd_first_answer)

    ag = sub.add_parser("age", help="what waiting costs a shell: the restore floor into shells that waited 0..100 ms",
                        description="The restore floor into a fresh shell that first waits AGE ms, for every age, "
                                    "interleaved: why pooled restores are also compared with an idle pooled shell.")
    ag.add_argument("--ages-ms", type=_number_list(float), default=list(AGES_MS), metavar="LIST",
                    help="shell ages in ms, comma-separated (default 0,1,3,10,30,100)")
    ag.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    ag.add_argument("--strategy", choices=["copy", "map"], default="map", help="memory strategy (default map)")
    ag.add_argument("--n", type=int, default=40, help="restores per age (default 40)")
    ag.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    _common(ag)
    ag.set_defaults(func=cmd_age)

    al = sub.add_parser("all", help="every benchmark against its peers (QEMU, unicorn): JSON, Markdown, PNG plots",
                        description="Runs every benchmark on this machine in one go (restore paths, QEMU and unicorn "
                                    "restores, reset vs floor, the kvmlab/unicorn cycle, fork density) and writes "
                                    "results.json, results.md and PNG plots into --out.")
    al.add_argument("--out", default="bench-results", metavar="DIR", help="output directory (default ./bench-results)")
    al.add_argument("--quick", action="store_true", help="reduced repetitions (seconds, not minutes)")
    al.add_argument("--memory-mib", type=_number_list(int), default=None, metavar="LIST", help="guest sizes (default 64,256)")
    al.add_argument("--n", type=int, default=None, help="repetitions of each kvmlab restore path (default 200; quick 5)")
    al.add_argument("--qemu-n", type=int, default=None, help="QEMU restores per case (default 15; quick 2)")
    al.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY", help="the QEMU binary")
    al.add_argument("--skip", default="", metavar="LIST", help=f"parts to leave out, comma-separated: {','.join(PARTS)}")
    al.add_argument("--fork-n", type=_number_list(int), default=None, metavar="LIST", help="fork counts (default 100,1000)")
    al.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    _common(al, json=False)
    al.set_defaults(func=cmd_all)

    dc = sub.add_parser("docs", help="generate the README headline table and docs/performance.md from a saved run",
                        description="Rewrites the generated block of the README's Performance part and "
                                    "docs/performance.md from the results.json of a `kvmlab bench all` run.")
    dc.add_argument("--results", default="docs/results/results.json",
                    help="a saved run (default docs/results/results.json, from kvmlab bench all --out docs/results)")
    dc.add_argument("--readme", default="README.md", help="the README to update (default README.md)")
    dc.add_argument("--performance", default="docs/performance.md", help="the page to write (default docs/performance.md)")
    dc.set_defaults(func=cmd_docs)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``bench`` and its subcommands on an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmarks", description="kvmlab benchmarks")
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    sub.required = True
    _restore_parser(sub)
    _reset_parser(sub)
    _other_parsers(sub)
    campaign_parser(sub, _finish, _common, _command)
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    """``main(["restore", "--n", "100"])``: the same as ``kvmlab bench restore --n 100``."""
    from ..cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
