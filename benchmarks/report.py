"""Markdown report and plots of a ``run_all`` result."""

from __future__ import annotations

import math
from typing import Any

from kvmlab.bench import fmt_stat, fmt_time

__all__ = ["markdown", "plots"]


def _x(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}x" if v < 1000 else f"{v:,.0f}x"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _met(m: bool | None) -> str:
    return "not measured" if m is None else ("met" if m else "**MISSED**")


def markdown(res: dict[str, Any]) -> str:
    from . import ROW_LABELS

    h = res["host"]
    v = res["versions"]
    kvm = ", ".join(h["kvm_modules"]) or "none"
    nested = " — nested, paravirtual KVM" if "kvm_pvm" in h["kvm_modules"] else ""
    p = res["params"]
    lines = [
        "# kvmlab benchmarks",
        "",
        f"- host: {h['cpu']}, {h['cpus']} CPUs, kernel {h['kernel']}, KVM modules: {kvm}{nested}",
        f"- software: Python {v['python']}, kvmlab {v['kvmlab']}, unicorn {v.get('unicorn') or 'absent'}, "
        f"QEMU {_qemu_version(res) or 'absent'}",
        f"- command: `{res['command']}`{' (quick: reduced repetitions)' if res['quick'] else ''}; took {res['seconds']:.0f} s",
        f"- every figure: median (min–max) over the repetitions of this run; kvmlab rows n={p['n']}, "
        f"QEMU n={p['qemu_n']}, unicorn n={p['unicorn_n']}; ratios are of medians of this run",
        "",
        "## Restore",
        "",
    ]
    cases = res.get("cases") or []
    names = [c["case"] for c in cases]
    by = {(r["key"], r["case"]): r for r in res["rows"]}
    rows = []
    for key, label in ROW_LABELS.items():
        cells = []
        for c in names:
            r = by.get((key, c))
            if r is None:
                cells.append("-")
            elif r.get("skipped"):
                cells.append("skipped")
            else:
                cells.append(fmt_stat({"median": r["median_ns"], "min": r["min_ns"], "max": r["max_ns"], "n": r["n"]}))
        rows.append([label] + cells)
    lines += _md_table(["row"] + names, rows)
    lines.append("")
    lines.append("Snapshots: sparse = `counter` at its checkpoint, dense = `memtouch` with 25% of the pages touched; "
                 "row 3 uses the `service` guest of the same size (dense: 25% of its pages filled by the host before "
                 "the snapshot). Present (non-zero) pages: "
                 + ", ".join(f"{c['case']} {c['present_pages']:,}" for c in cases) + ".")
    lines.append("Rows 1, 2 and 3 are timed around the Python call; 1n natively; 4 and 4i around their bare native call (from Python, no wrapper). Row 5 is timed from QEMU's "
                 "process start to QMP `query-status` = running (a PVH guest of the same memory size that "
                 "filled 25% of its RAM when dense, saved stopped with QMP `migrate`); row 6 is "
                 "`context_restore` + `mem_write` of the snapshot's present pages, from Python.")
    for c in cases:
        for key in ("qemu", "unicorn"):
            if (c.get(key) or {}).get("skipped"):
                lines.append(f"- {key} ({c['case']}): {c[key]['skipped']}")
    lines += ["", "## Ratios (medians, this run)", ""]
    rnames: list[str] = []
    for r in res["ratios"]:
        if r["name"] not in rnames:
            rnames.append(r["name"])
    rt = {(r["name"], r["case"]): r["value"] for r in res["ratios"]}
    lines += _md_table(["ratio"] + names, [[n] + [_x(rt.get((n, c))) for c in names] for n in rnames])
    lines += ["", "## Targets", ""]
    lines += _md_table(
        ["target", "case", "this run", "target", "result"],
        [[t["name"], t["case"], _x(t["value"]), t["target"], _met(t["met"]) + (f" ({t['note']})" if t.get("note") else "")]
         for t in res["targets"]],
    )
    missed = [t for t in res["targets"] if t["met"] is False]
    lines.append("")
    lines.append(f"{len(res['targets']) - len(missed)} of {len(res['targets'])} targets met" +
                 (f"; missed: {len(missed)}" if missed else ""))
    rz = res.get("reset")
    if rz:
        cfg = rz["config"]
        lines += ["", "## Dirty-page reset vs its floor", "",
                  f"memtouch pages=K rounds=2 restored at round 1's checkpoint, {cfg['memory_mib']} MiB; per row "
                  f"n={cfg['n']} resets and n floors alternating on the same VM after the same run. Config = restore "
                  "strategy / reset mode ('mem-snap': an in-memory snapshot, the others are file-backed). "
                  "reset / floor = the core's reset time / the floor's; call / floor = around the Python call of reset() / around "
                  "the floor's bare native call; run = the next run (round 2 + exit).", ""]
        lines += _md_table(
            ["K", "config", "dirty pages", "reset", "floor", "reset / floor", "call / floor", "run", f"≤ {cfg['target_ratio']}x"],
            [[str(r["dirty_pages_target"]), r["config"], str(r["dirty_pages"]), fmt_stat(r["reset"]), fmt_stat(r["floor"]),
              _x(r["ratio"]), _x(r["ratio_call"]), fmt_time(r["run"]["median"]), _met(r["target_met"])]
             for r in rz["rows"]],
        )
    cy = res.get("cycle")
    if cy:
        cfg = cy["config"]
        lines += ["", "## Run + reset cycle: kvmlab vs unicorn", "",
                  f"The same x86-64 bytes (a loop of N iterations adding to one word in each of {cfg['pages']} pages, "
                  "then `out` to the exit port) run in kvmlab (Vm.boot(bytes) at CPL3, snapshot at entry, resettable "
                  f"copy restore, `vm.reset_loop`) and in unicorn {cfg['unicorn'] or '(absent)'} (UC_MODE_64, "
                  f"{cfg['memory_mib']} MiB mapped, `emu_start` to the `out`, reset = `context_restore` + `mem_write` "
                  "of the dirty pages, from Python). Per cycle: median (min–max) over every cycle of "
                  f"{cfg['batches']} batches per side; 'mean' = median over batches of wall time / cycles.", ""]
        lines += _md_table(
            ["N", "kvmlab", "unicorn", "unicorn / kvmlab", "kvmlab mean", "unicorn mean", "ratio of means"],
            [[f"{r['iterations']:,}", fmt_stat(r["kvmlab"]), fmt_stat(r["unicorn"]) if r.get("unicorn") else "skipped",
              _x(r["unicorn_over_kvmlab"]), fmt_time(r["kvmlab_batch_mean"]["median"]),
              fmt_time(r["unicorn_batch_mean"]["median"]) if r.get("unicorn_batch_mean") else "-",
              _x(r["unicorn_over_kvmlab_mean"])] for r in cy["rows"]],
        )
        lines += ["", f"Crossover (medians): {cy['crossover']['text']}. Crossover (means): {cy['crossover_mean']['text']}."]
    fk = res.get("fork")
    if fk:
        cfg = fk["config"]
        ref = cfg["reference"]
        lines += ["", "## Fork density", "",
                  f"`kvmlab.fork_many` of the service guest at its checkpoint ({cfg['memory_mib']} MiB, 1 vCPU, "
                  f"{cfg['present_pages']} present pages), {cfg['reps']} repetitions; memory per VM = growth / n of "
                  "this process's PSS and the drop of MemAvailable (which includes KVM's kernel allocations); "
                  "'after 1 call' = after every VM answered one request.", ""]
        rows = []
        for r in fk["rows"]:
            if not r["ready"]["n"]:
                rows.append([str(r["n"]), f"failed: {r['error']}", "", "", "", "", ""])
                continue
            ac = r.get("after_call") or {}
            rows.append([str(r["n"]), fmt_stat(r["ready"]), fmt_time(r["ready_per_vm"]["median"]),
                         _kib(r["pss_per_vm"]["median"]), _kib(r["host_per_vm"]["median"]),
                         _kib(ac.get("pss_per_vm", {}).get("median")) + " / " + _kib(ac.get("host_per_vm", {}).get("median")),
                         fmt_time(r["close"]["median"])])
        lines += _md_table(["n", "ready (all n)", "per VM", "PSS / VM", "MemAvailable / VM", "after 1 call: PSS / MemAvail per VM", "close all"], rows)
        lines += ["", f"Reference: zeroboot, bare-metal KVM, 256 MiB guest: {ref['n']:,} forks in {ref['ready_ms']} ms at "
                  f"~{ref['kb_per_vm']} KB each. Limits here: open files {cfg['limits'].get('nofile_soft')}/"
                  f"{cfg['limits'].get('nofile_hard')} (soft/hard, 2 + vCPUs per map-restored VM), vm.max_map_count "
                  f"{cfg['limits'].get('max_map_count', '?')}."]
        for r in fk["rows"]:
            if r["error"]:
                lines.append(f"- n={r['n']}: {r['error']}")
    if res["skipped"] or res["errors"]:
        lines += ["", "## Skipped or failed", ""]
        for k, msg in res["skipped"].items():
            lines.append(f"- {k}: {msg}")
        for k, msg in res["errors"].items():
            lines.append(f"- {k}: FAILED: {msg}")
    return "\n".join(lines) + "\n"


def _kib(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{b / 1024:,.0f} KiB"


def _qemu_version(res) -> str | None:
    for c in res.get("cases") or []:
        q = c.get("qemu") or {}
        if q.get("version"):
            return q["version"].replace("QEMU emulator version ", "")
    return None


def plots(res: dict[str, Any]) -> dict[str, Any]:
    """name -> Figure (``kvmlab.plot`` functions)."""
    from kvmlab import plot

    figs: dict[str, Any] = {}
    if res.get("rows"):
        main = [r for r in res["rows"] if not r["key"].startswith("native")]
        figs["restore"] = plot.benchmark_bars(main, title="Restore to ready: kvmlab vs QEMU -incoming vs unicorn")
    if res.get("reset"):
        figs["reset"] = plot.reset_vs_floor(res["reset"]["rows"])
    if res.get("cycle"):
        figs["cycle"] = plot.cycle_crossover(res["cycle"]["rows"])
    if res.get("fork"):
        figs["fork"] = plot.fork_density(res["fork"]["rows"])
    return figs
