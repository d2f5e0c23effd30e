"""``kvmlab bench all``: kvmlab against its peers on this machine, in one run.

For guest memory 64 and 256 MiB, sparse (``counter`` at its checkpoint) and
dense (``memtouch`` with 25% of memory touched) snapshots: every restore path
of :mod:`kvmlab.bench.restore` (pooled, native, unpooled, service, both
floors), QEMU ``-M microvm -incoming`` restoring a VM of the same size and
density (:mod:`.peers.qemu`) and unicorn's restore of the same snapshot
(:mod:`.peers.unicorn`); restore to first answer per path against QEMU cold
and pre-started (:mod:`.first_answer`); then the dirty-page reset against its floor, the
run+reset cycle against unicorn and fork density. Writes ``results.json``
(:meth:`Results.save`), ``results.md`` and PNG plots into the output directory.

    kvmlab bench all --out bench-results        # full run (minutes)
    kvmlab bench all --quick --out /tmp/quick   # reduced repetitions
    >>> res = kvmlab.bench.run_all("out", quick=True)
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..config import check_path
from ._native import reset_floor_available
from .first_answer import first_answer_part, first_answer_steps
from .fork import VM_COUNTS, fork_part
from .harness import (COUNT, DENSE_FRACTION, FIRST_ANSWER_ERRORS, FLAG, FORK_ERRORS, MEMORY_SIZES, REPS, TEXT, Arg, Progress,
                      cell_key, check_args, guard, host_info, make_service_snapshot, make_snapshot, part_errors, versions)
from .peers.unicorn import unicorn_available, unicorn_restore
from .peers.qemu import QemuPeer, qemu_problem
from .report import PEER_OF, QEMU_PARTS
from .reset import RESET_CONFIGS, cycle_part, reset_part
from .restore import PATHS, RESTORE_KEYS, RESTORE_METRICS, STRATEGIES, measure_restores
from .results import Part, Results
from .targets import first_answer_verdicts, reset_verdicts, restore_verdicts

__all__ = ["PARTS", "FULL", "QUICK", "run_all"]

#: Parts that ``skip`` can leave out.
PARTS = ("qemu", "unicorn", "first-answer", "reset", "cycle", "fork")
FULL: dict[str, Any] = {"n": 200, "warmup": 5, "qemu_n": 15, "unicorn_n": 50, "reset_k": [1, 16, 256, 4096], "reset_n": 100,
        "reset_warmup": 5, "cycle_n": [1, 10, 100, 1000, 10_000, 100_000, 1_000_000], "cycle_batches": 7,
        "cycle_batch_s": 0.1, "fork_n": [100, 1000], "fork_reps": 3, "first_n": 200, "first_qemu_n": 10}
QUICK: dict[str, Any] = {"n": 5, "warmup": 1, "qemu_n": 2, "unicorn_n": 5, "reset_k": [1, 16, 256], "reset_n": 5,
         "reset_warmup": 1, "cycle_n": [1, 100, 10_000], "cycle_batches": 2, "cycle_batch_s": 0.02,
         "fork_n": [10], "fork_reps": 1, "first_n": 5, "first_qemu_n": 2}
PEER_KEYS = ["memory_mib", "density"]


def _skipped(skip: Sequence[str], qemu: str) -> dict[str, str]:
    out = {part: f"skipped (--skip {part})" for part in skip}
    if "qemu" not in out and (why := qemu_problem(qemu)):
        out["qemu"] = why
    if "unicorn" not in out and (why := unicorn_available()):
        out["unicorn"] = why
    if "reset" not in out and not reset_floor_available():
        out["reset"] = "this native core has no reset floor (rebuild: pip install -e .)"
    return out


def _restore_parts(res: Results, sizes: Sequence[int], p: dict[str, Any], tmp: Path, qemu: str,
                   progress: Progress) -> None:
    peer = None if "qemu" in res.skipped else QemuPeer(tmp, qemu)
    kv = res.parts["restore"] = Part("restore", RESTORE_KEYS, RESTORE_METRICS,
                                     config={"n": p["n"], "warmup": p["warmup"], "dense_fraction": DENSE_FRACTION,
                                             "paths": list(PATHS), "memory_mib": list(sizes)})
    # QEMU twice: cold (process start to running) and pre-started (-incoming
    # defer, from migrate-incoming: the fair match for a pool), interleaved.
    peers = {name: Part(name, PEER_KEYS, ["restore_ns"], config={"n": p[f"{PEER_OF[name]}_n"]})
             for name in PEER_OF if PEER_OF[name] not in res.skipped}
    res.parts.update(peers)
    for mem in sizes:
        for density in ("sparse", "dense"):
            case = f"{mem} MiB {density}"
            progress.describe(f"{case}: snapshots")
            guest, snap_path, _present = make_snapshot(density, mem, tmp, DENSE_FRACTION)
            svc_path = make_service_snapshot(mem, tmp, DENSE_FRACTION if density == "dense" else 0.0)
            cell = {"memory_mib": mem, "density": density, "guest": guest}
            progress.describe(f"{case}: kvmlab restores")
            kv.records += measure_restores(snap_path, cell, paths=PATHS, strategies=STRATEGIES, n=p["n"],
                                           warmup=p["warmup"], service_path=svc_path, progress=progress)
            for name in dict.fromkeys(PEER_OF[k] for k in peers):
                progress.describe(f"{case}: {name}")
                run = (lambda: peer.measure(mem, density, p["qemu_n"], progress, modes=tuple(QEMU_PARTS))) if name == "qemu" else (  # type: ignore[union-attr]  # qemu is in peers only with a peer
                    lambda: unicorn_restore(snap_path, p["unicorn_n"], progress))
                for r in guard(res.errors, cell_key(name, mem, density), run) or []:
                    peers[QEMU_PARTS[r["mode"]] if name == "qemu" else name].records.append({"memory_mib": mem, "density": density, **r})
            for f in (snap_path, svc_path):
                Path(f).unlink(missing_ok=True)


def _total_steps(p: dict[str, Any], sizes: Sequence[int], skipped: dict[str, str]) -> int:
    cases = 2 * len(sizes)
    total = cases * (p["n"] + p["warmup"]) * len(PATHS) * len(STRATEGIES)
    total += 0 if "qemu" in skipped else cases * (len(QEMU_PARTS) * p["qemu_n"] + 1)
    total += 0 if "unicorn" in skipped else cases * p["unicorn_n"]
    total += 0 if "reset" in skipped else len(p["reset_k"]) * len(RESET_CONFIGS) * (p["reset_n"] + p["reset_warmup"]) * 2
    total += 0 if "cycle" in skipped else len(p["cycle_n"]) * p["cycle_batches"] * 2
    total += 0 if "fork" in skipped else len(p["fork_n"]) * p["fork_reps"]
    total += 0 if "first-answer" in skipped else first_answer_steps(sizes, ("sparse", "dense"), p["first_n"],
                                                                    p["warmup"], p["first_qemu_n"], "qemu" not in skipped)
    return total


def run_all(out: str | os.PathLike[str] = "bench-results", quick: bool = False, *,
            memory_mib: Sequence[int] | None = None, n: int | None = None, qemu_n: int | None = None,
            qemu: str = "qemu-system-x86_64", skip: Sequence[str] | str = (), fork_n: Sequence[int] | None = None,
            quiet: bool = False, no_plots: bool = False, command: str | None = None) -> Results:
    """Runs every benchmark (see the module doc), writes ``results.json``,
    ``results.md`` and ``*.png`` into ``out`` and returns the :class:`Results`
    (``.figures``: name -> matplotlib Figure)."""
    from .report import markdown, plots

    check_path("out", out)
    skip = [x.strip() for x in skip.split(",") if x.strip()] if isinstance(skip, str) else skip
    check_args("all", quick=(quick, FLAG), memory_mib=(memory_mib, replace(MEMORY_SIZES, optional=True)),
               n=(n, replace(REPS, optional=True)), qemu_n=(qemu_n, replace(COUNT, optional=True)),
               qemu=(qemu, Arg("text")), fork_n=(fork_n, replace(VM_COUNTS, optional=True)),
               skip=(skip, Arg("choice", choices=PARTS, many=True, min_items=0)),
               quiet=(quiet, FLAG), no_plots=(no_plots, FLAG), command=(command, TEXT))
    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in (("n", n), ("qemu_n", qemu_n), ("fork_n", fork_n and list(fork_n))) if v is not None})
    sizes = list(memory_mib or [64, 256])
    skip = list(skip)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = Results("all", host=host_info(), versions=versions(), skipped=_skipped(skip, qemu),
                  command=command or _command(out, quick, sizes, n, qemu_n, qemu, skip, fork_n))
    progress = Progress(_total_steps(p, sizes, res.skipped), quiet)
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-all-") as tmp:
            tmpd = Path(tmp)
            guard(res.errors, "restore", lambda: _restore_parts(res, sizes, p, tmpd, qemu, progress))
            if "first-answer" not in res.skipped and (part := guard(res.errors, "first-answer", lambda: first_answer_part(
                    sizes, ("sparse", "dense"), n=p["first_n"], warmup=p["warmup"], qemu_n=p["first_qemu_n"],
                    qemu=None if "qemu" in res.skipped else qemu, progress=progress, tmp_dir=tmpd,
                    skipped=res.skipped))):
                res.parts["first_answer"] = part
                res.errors.update(part_errors(part, FIRST_ANSWER_ERRORS))
            if "reset" not in res.skipped and (part := guard(res.errors, "reset", lambda: reset_part(
                    p["reset_k"], memory_mib=256, n=p["reset_n"], warmup=p["reset_warmup"], progress=progress,
                    tmp_dir=tmpd))):
                res.parts["reset"] = part
            if "cycle" not in res.skipped and (part := guard(res.errors, "cycle", lambda: cycle_part(
                    p["cycle_n"], batches=p["cycle_batches"], batch_s=p["cycle_batch_s"], progress=progress))):
                res.parts["cycle"] = part
            if "fork" not in res.skipped and (part := guard(res.errors, "fork", lambda: fork_part(
                    p["fork_n"], memory_mib=256, reps=p["fork_reps"], progress=progress, tmp_dir=tmpd))):
                res.parts["fork"] = part
                res.errors.update(part_errors(part, FORK_ERRORS))
    finally:
        progress.close()
    res.seconds = time.monotonic() - t0
    res.verdicts = all_verdicts(res)
    md = markdown(res)
    (out_dir / "results.md").write_text(md)
    res.figures = {} if no_plots else plots(res)
    for name, fig in res.figures.items():
        fig.savefig(out_dir / f"{name}.png", dpi=96)
    res.save(out_dir / "results.json")
    return res


def all_verdicts(res: Results) -> list[dict[str, Any]]:
    """Every target's verdicts for the parts ``res`` has."""
    out: list[dict[str, Any]] = []
    if "restore" in res.parts:
        peers: dict[str, Any] = {name: res.parts[name].summary() for name in QEMU_PARTS.values() if name in res.parts}
        out += restore_verdicts(res.parts["restore"].summary(), peers, res.skipped, res.errors)
    if "first_answer" in res.parts:
        out += first_answer_verdicts(res.parts["first_answer"].summary(), res.skipped, res.errors)
    if "reset" in res.parts:
        out += reset_verdicts(res.parts["reset"].summary())
    return out


def _command(out: str | os.PathLike[str], quick: bool, sizes: list[int], n: int | None, qemu_n: int | None, qemu: str,
             skip: list[str], fork_n: Sequence[int] | None) -> str:
    parts = ["kvmlab", "bench", "all", "--out", str(out)] + (["--quick"] if quick else [])
    if sizes != [64, 256]:
        parts += ["--memory-mib", ",".join(map(str, sizes))]
    for flag, v in (("--n", n), ("--qemu-n", qemu_n)):
        if v is not None:
            parts += [flag, str(v)]
    if qemu != "qemu-system-x86_64":
        parts += ["--qemu", qemu]
    if skip:
        parts += ["--skip", ",".join(skip)]
    if fork_n is not None:
        parts += ["--fork-n", ",".join(map(str, fork_n))]
    return shlex.join(parts)
