"""``kvmlab bench all`` / ``python -m benchmarks``: kvmlab against its peers on
this machine, in one run.

Everything is measured in the same run and every figure is a median over
repetitions with its min and max; every comparison is a ratio of medians of
this run. For guest memory 64 and 256 MiB, sparse (the ``counter`` guest at
its checkpoint) and dense (``memtouch`` with 25% of memory touched) snapshots:

1. kvmlab pooled restore-to-ready, copy and map (``RestorePool.restore_snapshot``, from Python);
   also the same pooled restore driven natively (``kvmlab_bench_pool_restores``);
2. kvmlab unpooled restore (``Vm.restore``);
3. kvmlab restore + first answer of the ``service`` guest (``rvm.call(b"ping")``);
4. the floor: ``kvmlab_bench_restore_floor`` (bare ioctls and memory operations),
   into a fresh shell and into an idle shell of a settled pool (like for like);
5. QEMU ``-M microvm -accel kvm`` restoring a saved VM of the same size and
   density with ``-incoming`` (process start to running; see ``benchmarks.qemu``);
6. unicorn: ``context_restore`` + ``mem_write`` of the same snapshot's pages.

Then the dirty-page reset against its floor, the run+reset cycle against
unicorn and fork density (``kvmlab.bench``). Writes ``results.json``,
``results.md`` and PNG plots (``kvmlab.plot``) into the output directory.

    python -m benchmarks --out bench-results            # full run (~4 min here)
    python -m benchmarks --quick --out /tmp/quick       # reduced repetitions
    kvmlab bench all --quick                            # the same code
    >>> import benchmarks; res = benchmarks.run_all("out", quick=True)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run_all", "run_from_args", "main", "PARTS"]

#: Parts that --skip can leave out.
PARTS = ("qemu", "unicorn", "reset", "cycle", "fork")

FULL = {"n": 200, "warmup": 5, "qemu_n": 15, "unicorn_n": 50, "reset_k": [1, 16, 256, 4096], "reset_n": 100,
        "reset_warmup": 5, "cycle_n": [1, 10, 100, 1000, 10_000, 100_000, 1_000_000], "cycle_batches": 7,
        "cycle_batch_s": 0.1, "fork_n": [100, 1000], "fork_reps": 3}
QUICK = {"n": 5, "warmup": 1, "qemu_n": 2, "unicorn_n": 5, "reset_k": [1, 16, 256], "reset_n": 5,
         "reset_warmup": 1, "cycle_n": [1, 100, 10_000], "cycle_batches": 2, "cycle_batch_s": 0.02,
         "fork_n": [10], "fork_reps": 1}

#: Targets (ratios of medians, this run).
TARGET_QEMU_SPEEDUP = 100.0  # pooled map restore of 256 MiB vs QEMU -incoming of 256 MiB
TARGET_FLOOR_RATIO = 1.5  # pooled restore / floor into an idle pooled shell
TARGET_PY_RATIO = 1.1  # Python restore_snapshot / the same restore driven natively

ROW_LABELS = {
    "pooled-copy": "1. kvmlab pooled restore, copy",
    "pooled-map": "1. kvmlab pooled restore, map",
    "native-copy": "1n. same, driven natively, copy",
    "native-map": "1n. same, driven natively, map",
    "unpooled-copy": "2. kvmlab unpooled Vm.restore, copy",
    "unpooled-map": "2. kvmlab unpooled Vm.restore, map",
    "service-copy": "3. pooled restore + first answer, copy",
    "service-map": "3. pooled restore + first answer, map",
    "floor-copy": "4. floor (native), copy",
    "floor-map": "4. floor (native), map",
    "floor-idle-copy": "4i. floor into an idle pooled shell, copy",
    "floor-idle-map": "4i. floor into an idle pooled shell, map",
    "qemu": "5. QEMU microvm -incoming",
    "unicorn": "6. unicorn context_restore + mem_write",
}
ROW_COLORS = {"pooled": "#1f77b4", "native": "#17becf", "unpooled": "#9467bd", "service": "#2ca02c",
              "floor": "#7f7f7f", "qemu": "#ff7f0e", "unicorn": "#d62728"}


def _cases(memory_mib: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for mem in memory_mib:
        for density in ("sparse", "dense"):
            out.append({"case": f"{mem} MiB {density}", "memory_mib": mem, "density": density})
    return out


def _versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version()}
    try:
        from importlib.metadata import version

        v["kvmlab"] = version("kvmlab")
    except Exception:  # noqa: BLE001 - a source tree without an install
        v["kvmlab"] = "source tree"
    try:
        import unicorn

        v["unicorn"] = unicorn.__version__
    except ImportError:
        v["unicorn"] = None
    return v


def run_all(
    out: str | os.PathLike[str] = "bench-results",
    quick: bool = False,
    *,
    memory_mib: Sequence[int] | None = None,
    n: int | None = None,
    qemu_n: int | None = None,
    qemu: str = "qemu-system-x86_64",
    skip: Sequence[str] | str = (),
    fork_n: Sequence[int] | None = None,
    quiet: bool = False,
    no_plots: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs every benchmark (see the module doc) and writes ``results.json``,
    ``results.md`` and ``*.png`` into ``out``; returns the results dict (with
    ``"figures"``: name -> matplotlib Figure, not in the JSON)."""
    from kvmlab import bench as kb
    from kvmlab.bench import _Progress, host_info

    from . import qemu as qemu_mod
    from . import restore as rs

    p = dict(QUICK if quick else FULL)
    if n is not None:
        p["n"] = n
    if qemu_n is not None:
        p["qemu_n"] = qemu_n
    if fork_n is not None:
        p["fork_n"] = list(fork_n)
    sizes = list(memory_mib or [64, 256])
    if isinstance(skip, str):
        skip = [x.strip() for x in skip.split(",") if x.strip()]
    bad = [x for x in skip if x not in PARTS]
    if bad:
        raise ValueError(f"unknown --skip part(s) {bad}; use {', '.join(PARTS)}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = _cases(sizes)
    skipped: dict[str, str] = {}
    if "qemu" in skip:
        skipped["qemu"] = "skipped (--skip qemu)"
    else:
        why = qemu_mod.qemu_problem(qemu)
        if why:
            skipped["qemu"] = why
    if "unicorn" in skip:
        skipped["unicorn"] = "skipped (--skip unicorn)"
    else:
        why = kb.unicorn_available()
        if why:
            skipped["unicorn"] = why
    for part in ("reset", "cycle", "fork"):
        if part in skip:
            skipped[part] = f"skipped (--skip {part})"
    if "cycle" not in skipped and "unicorn" in skipped:
        pass  # the cycle still runs its kvmlab side and says unicorn was skipped
    if "reset" not in skipped and not kb.reset_floor_available():
        skipped["reset"] = "this native core has no kvmlab_bench_reset_floor (rebuild: pip install -e .)"

    paths = list(rs.KVMLAB_PATHS)
    total = len(cases) * (p["n"] + p["warmup"]) * len(paths)
    if "qemu" not in skipped:
        total += len(cases) * (p["qemu_n"] + 1)
    if "unicorn" not in skipped:
        total += len(cases) * p["unicorn_n"]
    if "reset" not in skipped:
        total += len(p["reset_k"]) * len(kb.RESET_CONFIGS) * (p["reset_n"] + p["reset_warmup"]) * 2
    if "cycle" not in skipped:
        total += len(p["cycle_n"]) * p["cycle_batches"] * 2
    if "fork" not in skipped:
        total += len(p["fork_n"]) * p["fork_reps"]
    progress = _Progress(total, quiet, unit="step")
    host = host_info()
    res: dict[str, Any] = {
        "host": host,
        "versions": _versions(),
        "command": command or _command(out, quick, sizes, n, qemu_n, qemu, skip, fork_n),
        "quick": quick,
        "params": p,
        "memory_mib": sizes,
        "skipped": skipped,
        "errors": {},
        "started_unix": time.time(),
    }
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-all-") as tmp:
            tmpd = Path(tmp)
            res["cases"] = _restore_part(cases, p, tmpd, qemu, skipped, res["errors"], progress)
            if "reset" not in skipped:
                res["reset"] = _guard(res["errors"], "reset", lambda: kb.bench_reset(
                    p["reset_k"], memory_mib=256, n=p["reset_n"], warmup=p["reset_warmup"], progress=progress, tmp_dir=tmpd))
            if "cycle" not in skipped:
                res["cycle"] = _guard(res["errors"], "cycle", lambda: kb.bench_cycle(
                    p["cycle_n"], batches=p["cycle_batches"], batch_s=p["cycle_batch_s"], progress=progress))
            if "fork" not in skipped:
                res["fork"] = _guard(res["errors"], "fork", lambda: kb.bench_fork(
                    p["fork_n"], memory_mib=256, reps=p["fork_reps"], progress=progress, tmp_dir=tmpd))
    finally:
        progress.close()
    res["seconds"] = time.monotonic() - t_start
    res["rows"] = _rows(res["cases"], skipped)
    res["ratios"], res["targets"] = _ratios_and_targets(res)
    from .report import markdown, plots

    res["markdown"] = markdown(res)
    (out_dir / "results.md").write_text(res["markdown"])
    figs = {} if no_plots else plots(res)
    for name, fig in figs.items():
        fig.savefig(out_dir / f"{name}.png", dpi=96)
    res["plots"] = sorted(f"{name}.png" for name in figs)
    doc = {k: v for k, v in res.items() if k != "figures"}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    res["figures"] = figs
    return res


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def _command(out, quick, sizes, n, qemu_n, qemu, skip, fork_n) -> str:
    parts = ["python", "-m", "kvmlab", "bench", "all", "--out", str(out)]
    if quick:
        parts.append("--quick")
    if sizes != [64, 256]:
        parts += ["--memory-mib", ",".join(map(str, sizes))]
    if n is not None:
        parts += ["--n", str(n)]
    if qemu_n is not None:
        parts += ["--qemu-n", str(qemu_n)]
    if qemu != "qemu-system-x86_64":
        parts += ["--qemu", qemu]
    if skip:
        parts += ["--skip", ",".join(skip)]
    if fork_n is not None:
        parts += ["--fork-n", ",".join(map(str, fork_n))]
    return shlex.join(parts)


def _guard(errors: dict[str, str], part: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
        errors[part] = f"{type(e).__name__}: {e}"
        print(f"benchmarks: {part} failed: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return None


def _restore_part(cases, p, tmp: Path, qemu_bin: str, skipped, errors, progress) -> list[dict[str, Any]]:
    from kvmlab.bench import make_service_snapshot, make_snapshot

    from . import restore as rs
    from .qemu import QemuPeer

    peer = None if "qemu" in skipped else QemuPeer(tmp, qemu_bin)
    out = []
    for case in cases:
        mem, density = case["memory_mib"], case["density"]
        c = dict(case)
        progress.describe(f"{case['case']}: snapshots")
        label, snap_path, present = make_snapshot(density, mem, tmp, 0.25)
        svc_path = make_service_snapshot(mem, tmp, 0.25 if density == "dense" else 0.0)
        c["guest"] = label
        progress.describe(f"{case['case']}: kvmlab restores")
        m = rs.measure_case(snap_path, svc_path, p["n"], p["warmup"], rs.KVMLAB_PATHS, progress)
        c["present_pages"] = m.pop("_present_pages")
        c["paths"] = m
        if peer is not None:
            progress.describe(f"{case['case']}: QEMU")
            c["qemu"] = _qemu_case(peer, mem, density, p["qemu_n"], progress)
        else:
            c["qemu"] = {"skipped": skipped["qemu"]}
        if "unicorn" not in skipped:
            progress.describe(f"{case['case']}: unicorn")
            try:
                c["unicorn"] = rs.unicorn_restore(snap_path, p["unicorn_n"], progress)
            except Exception as e:  # noqa: BLE001
                c["unicorn"] = {"skipped": f"failed: {type(e).__name__}: {e}"}
                errors[f"unicorn {case['case']}"] = c["unicorn"]["skipped"]
        else:
            c["unicorn"] = {"skipped": skipped["unicorn"]}
        for f in (snap_path, svc_path):
            Path(f).unlink(missing_ok=True)
        out.append(c)
    return out


def _qemu_case(peer, mem: int, density: str, reps: int, progress) -> dict[str, Any]:
    from kvmlab.bench import stats

    try:
        saved = peer.save(mem, 0.25 if density == "dense" else 0.0)
        progress.update(1)
        times = []
        for i in range(reps):
            times.append(peer.restore_once(saved, mem, check=(i == 0)))
            progress.update(1)
    except Exception as e:  # noqa: BLE001 - report exactly what fails here
        return {"skipped": f"not measurable here: {type(e).__name__}: {e}"}
    finally:
        pass
    out = dict(stats(times))
    out.update(version=peer.version, fill_pages=saved["fill_pages"], state_bytes=saved["state_bytes"],
               ram_normal_pages=saved["ram_normal_pages"], boot_s=saved["boot_s"])
    for f in (saved["state"], saved["kernel"]):
        Path(f).unlink(missing_ok=True)
    return out


def _rows(cases, skipped) -> list[dict[str, Any]]:
    rows = []
    order = list(ROW_LABELS)
    for c in cases or []:
        for key in order:
            if key in ("qemu", "unicorn"):
                st = c.get(key) or {}
            else:
                st = c["paths"].get(key)
                if st is None:
                    continue
            row = {
                "key": key, "label": ROW_LABELS[key], "case": c["case"], "memory_mib": c["memory_mib"],
                "density": c["density"], "median_ns": st.get("median", math.nan), "min_ns": st.get("min", math.nan),
                "max_ns": st.get("max", math.nan), "n": st.get("n", 0), "skipped": st.get("skipped"),
                "color": ROW_COLORS[key.split("-")[0]],
            }
            if "core" in st:
                row["core_median_ns"] = st["core"]["median"]
            rows.append(row)
    return rows


def _ratios_and_targets(res) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from kvmlab.bench import ratio

    ratios, targets = [], []
    for c in res.get("cases") or []:
        P = c["paths"]

        def med(k):
            return P[k]["median"] if k in P else math.nan

        def add(name, value, note=""):
            ratios.append({"case": c["case"], "name": name, "value": value, "note": note})

        for s in ("copy", "map"):
            add(f"pooled {s} / floor-idle {s}", ratio(med(f"pooled-{s}"), med(f"floor-idle-{s}")),
                "Python call vs bare ops into a shell as old")
            add(f"pooled {s} / floor {s}", ratio(med(f"pooled-{s}"), med(f"floor-{s}")), "Python call vs bare ops into a fresh shell")
            add(f"floor-idle {s} / floor {s}", ratio(med(f"floor-idle-{s}"), med(f"floor-{s}")),
                "what waiting in a pool costs a shell (cold kernel structures)")
            add(f"pooled {s} (core total) / floor-idle {s}",
                ratio(P[f"pooled-{s}"]["core"]["median"], P[f"floor-idle-{s}"]["core"]["median"]),
                "the core's own restore time vs bare ops")
            add(f"Python / native pooled {s}", ratio(med(f"pooled-{s}"), med(f"native-{s}")), "Python API overhead")
            add(f"unpooled {s} / pooled {s}", ratio(med(f"unpooled-{s}"), med(f"pooled-{s}")), "speedup of the pool")
        q = c.get("qemu") or {}
        u = c.get("unicorn") or {}
        add("QEMU / pooled map", ratio(q.get("median"), med("pooled-map")), "how many times faster than QEMU")
        add("QEMU / restore + first answer (map)", ratio(q.get("median"), med("service-map")), "")
        add("unicorn restore / pooled map", ratio(u.get("median"), med("pooled-map")), "")
        # Targets
        if c["memory_mib"] == 256:
            v = ratio(q.get("median"), med("pooled-map"))
            targets.append({
                "name": f"pooled map restore >= {TARGET_QEMU_SPEEDUP:g}x faster than QEMU -incoming", "case": c["case"],
                "value": v, "target": f">= {TARGET_QEMU_SPEEDUP:g}x",
                "met": None if math.isnan(v) else bool(v >= TARGET_QEMU_SPEEDUP),
                "note": q.get("skipped") or "",
            })
        for s in ("copy", "map"):
            v = ratio(med(f"pooled-{s}"), med(f"floor-idle-{s}"))
            targets.append({"name": f"pooled {s} restore within {TARGET_FLOOR_RATIO}x of the floor (idle shell)", "case": c["case"],
                            "value": v, "target": f"<= {TARGET_FLOOR_RATIO}x", "met": bool(v <= TARGET_FLOOR_RATIO),
                            "note": f"vs a fresh shell: {ratio(med(f'pooled-{s}'), med(f'floor-{s}')):.2f}x"})
        for s in ("copy", "map"):
            v = ratio(med(f"pooled-{s}"), med(f"native-{s}"))
            targets.append({"name": f"Python restore_snapshot ({s}) within {TARGET_PY_RATIO}x of native", "case": c["case"],
                            "value": v, "target": f"<= {TARGET_PY_RATIO}x", "met": bool(v <= TARGET_PY_RATIO), "note": ""})
    rz = res.get("reset")
    if rz:
        for r in rz["rows"]:
            targets.append({"name": f"reset within {rz['config']['target_ratio']}x of the floor, {r['config']}",
                            "case": f"K={r['dirty_pages_target']}", "value": r["ratio"],
                            "target": f"<= {rz['config']['target_ratio']}x", "met": r["target_met"], "note": ""})
    return ratios, targets


def run_from_args(args: argparse.Namespace) -> int:
    """Runs from parsed ``kvmlab bench all`` options; prints the Markdown report."""
    try:
        res = run_all(
            args.out, args.quick, memory_mib=args.memory_mib, n=args.n, qemu_n=args.qemu_n, qemu=args.qemu,
            skip=args.skip, fork_n=args.fork_n, quiet=args.quiet, no_plots=args.no_plots,
        )
    except ValueError as e:
        print(f"kvmlab bench all: {e}", file=sys.stderr)
        return 2
    print(res["markdown"])
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.md" + (
        ", " + ", ".join(res["plots"]) if res["plots"] else ""))
    return 1 if res["errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    from kvmlab.bench import _all_arguments

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0])
    _all_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return 130
