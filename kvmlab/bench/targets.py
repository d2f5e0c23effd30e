"""The targets, each defined once, and their verdicts, computed per cell from
a run's figures (never written by hand).

Every target is judged on the figure a user sees, the Python call (around
``restore_snapshot``, ``Vm.restore``, ``reset``; the floors around their bare
native call), against the baseline it was first stated with; other readings
go beside it in ``also``. Every cell a run measured gets a verdict, and the
count of met targets (:func:`tally`) includes all of them: met, missed, and
not judged (not measured, or not comparable, with the reason in ``note``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..units import fmt_ratio
from .stats import STAT_FIELDS, ratio

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Target", "TARGETS", "VERDICT_FIELDS", "restore_verdicts", "reset_verdicts", "first_answer_verdicts", "tally",
           "verdict"]


#: The keys failures are recorded under (a Part's ``notes["errors"]``, then
#: ``Results.errors`` with the part's prefix): said once here, where the verdicts read them.
FIRST_ANSWER_ERRORS = "first-answer "
FORK_ERRORS = "fork n="


def cell_key(what: str, memory_mib: int, density: str) -> str:
    """The errors key of one measured cell: ``"qemu 256 MiB sparse"``."""
    return f"{what} {memory_mib} MiB {density}"


@dataclass(frozen=True)
class Target:
    key: str
    claim: str  # the target in words
    limit: float
    at_least: bool  # True: value >= limit meets it; False: value <= limit
    baseline: str  # what the value is compared with, as the target was first stated

    @property
    def bound(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.limit:g}x"

    def met(self, value: float | None) -> bool | None:
        if value is None or math.isnan(value):
            return None
        return bool(value >= self.limit) if self.at_least else bool(value <= self.limit)


TARGETS = {t.key: t for t in (
    Target("floor", "pooled restore within 1.5x of the restore floor", 1.5, False,
           "pooled restore_snapshot call / floor into a fresh shell (bare native call)"),
    Target("pool_speedup", "pooled restore at least 3x faster than an unpooled one", 3.0, True,
           "unpooled Vm.restore call / pooled restore_snapshot call"),
    Target("qemu", "pooled map restore at least 100x faster than a pre-started QEMU's restore of a VM of the same size",
           100.0, True, "QEMU started with -incoming defer, migrate-incoming to running / pooled map restore_snapshot call"),
    Target("python", "Python restore_snapshot within 1.1x of the same pooled restore driven natively", 1.1, False,
           "restore_snapshot call / native pooled restore"),
    Target("reset", "reset() within 1.3x of the reset floor", 1.3, False,
           "reset() call / reset floor on the same VM after the same run (bare native call)"),
    Target("first_answer_floor", "a prepared VM (with warmup) answers within 2x of a warm call", 2.0, False,
           "prepared-with-warmup restore_snapshot + first call / one call on a VM that answered before"),
    Target("first_answer_pool", "restore to first answer at least 4x faster prepared (with warmup) than from a pooled shell",
           4.0, True, "pooled-shell restore_snapshot + first call / prepared-with-warmup restore_snapshot + first call"),
    Target("first_answer_qemu", "restore to first answer at least 100x faster prepared (with warmup) than a pre-started QEMU",
           100.0, True, "QEMU -incoming defer, migrate-incoming to running / prepared-with-warmup take + first call "
           "(the prepared VM was restored ahead, untimed; QEMU's restore is timed)"),
    Target("campaign_scale", "a campaign on 2 Dask workers at least 1.7x the inputs/s of 1 worker", 1.7, True,
           "run_inputs inputs/s, LocalCluster of 2 worker processes / of 1"),
    Target("campaign_worker", "a campaign on 1 Dask worker at least 0.9x the inputs/s of the native loop", 0.9, True,
           "run_inputs inputs/s on 1 worker / the bare native reset loop in this process"),
    Target("campaign_cold", "a cold worker gives its first result for a 64 MiB snapshot within 1 s", 1.0, False,
           "seconds from run_inputs (snapshot shipped) on a fresh worker to its first batch's rows, over 1 s"),
)}

#: The fields of a verdict (the columns of ``Results.verdict_frame()``).
VERDICT_FIELDS = ("target", "claim", "cell", "strategy", "value", "bound", "met", "baseline", "also", "note")


def verdict(key: str, cell: str, strategy: str, value: float | None, also: str = "", note: str = "",
            judged: bool = True) -> dict[str, Any]:
    """One target's verdict on one cell; ``judged=False`` (with the reason in
    ``note``) reports the value without judging it."""
    t = TARGETS[key]
    if value is not None and math.isnan(value):
        value = None  # as results.json stores it: a verdict reads the same before and after a save
    met = t.met(value) if judged else None
    if met is None and not note:
        note = "not measured in this run"
    return {"target": key, "claim": t.claim, "cell": cell, "strategy": strategy, "value": value, "bound": t.bound,
            "met": met, "baseline": t.baseline, "also": also, "note": note}


def _medians(summary: pd.DataFrame) -> dict[tuple, float]:
    """(cell columns..., metric) -> median, from a Part summary."""
    keys = [c for c in summary.columns if c != "metric" and c not in STAT_FIELDS]
    out = {}
    for row in summary.itertuples(index=False):
        d = row._asdict()
        out[tuple(d[k] for k in keys) + (d["metric"],)] = d["median"]
    return out


def restore_verdicts(restore_summary: pd.DataFrame, peers: dict[str, pd.DataFrame] | None = None,
                     skipped: dict[str, str] | None = None, errors: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Verdicts of the restore targets for every cell (memory size x density x
    strategy) of a restore Part summary (keys memory_mib, density, guest,
    path, strategy). ``peers``: the summaries of the QEMU parts of the same
    run, ``"qemu"`` (cold) and ``"qemu-prestarted"`` (keys memory_mib,
    density); ``skipped`` and ``errors`` say why a figure is missing."""
    m = _medians(restore_summary)
    cells = sorted({(k[0], k[1], k[2], k[4]) for k in m}, key=lambda c: (c[0], c[1] != "sparse", c[3]))
    q = {name: _medians(df) for name, df in (peers or {}).items()}
    out = []
    for mem, density, guest, strategy in cells:
        def med(path: str, metric: str = "call_ns") -> float:
            return m.get((mem, density, guest, path, strategy, metric), math.nan)

        if math.isnan(med("pooled")):
            continue
        out += _restore_cell(mem, density, strategy, med, q, skipped or {}, errors or {})
    return out


def _restore_cell(mem: int, density: str, strategy: str, med: Callable[..., float], q: dict[str, dict[tuple, float]],
                  skipped: dict[str, str], errors: dict[str, str]) -> list[dict[str, Any]]:
    """The restore verdicts of one cell. Every target is there: one whose
    baseline this run lacks says why ("not measured"), never drops out."""
    cell = f"{mem} MiB {density}"
    pooled = med("pooled")
    out = [verdict(
        "floor", cell, strategy, ratio(pooled, med("floor")),
        also=f"vs the floor into an idle pooled shell (as old as the pool's): "
             f"{fmt_ratio(ratio(pooled, med('floor-idle')))}; the core's own restore time vs the fresh-shell "
             f"floor: {fmt_ratio(ratio(med('pooled', 'total_ns'), med('floor', 'total_ns')))}",
    )]
    speedup = ratio(med("unpooled"), pooled)
    share = ratio(med("pooled", "memory_ns"), med("pooled", "total_ns"))
    note = ""
    if TARGETS["pool_speedup"].met(speedup) is False and share >= 0.5:
        note = (f"the memory phase is {share:.0%} of the pooled restore: a pool saves the shell's creation, "
                "not the page copies")
    out.append(verdict("pool_speedup", cell, strategy, speedup, note=note))
    out.append(verdict("python", cell, strategy, ratio(pooled, med("native")),
                       also=f"core total / native: {fmt_ratio(ratio(med('pooled', 'total_ns'), med('native')))}"))
    if mem == 256 and strategy == "map":  # the size and strategy the target was stated for
        def peer(name: str) -> float:
            return q.get(name, {}).get((mem, density, "restore_ns"), math.nan)

        pre = peer("qemu-prestarted")
        out.append(verdict("qemu", cell, strategy, ratio(pre, pooled),
                           also=f"cold QEMU (process start to running): {fmt_ratio(ratio(peer('qemu'), pooled))}; "
                                f"with the first answer (restore + call): {fmt_ratio(ratio(pre, med('service')))}",
                           note="" if not math.isnan(pre) else f"QEMU not measured: {_qemu_why(cell_key('qemu', mem, density), skipped, errors)}"))
    return out


def reset_verdicts(reset_summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Verdicts of the reset target for every (K, configuration) of a reset
    Part summary (keys dirty_pages_target, config, reset_mode, side)."""
    m = _medians(reset_summary)
    cells = sorted({k[:3] for k in m}, key=lambda c: (c[0], c[1]))
    out = []
    for k, config, mode in cells:
        def med(side: str, metric: str) -> float:
            return m.get((k, config, mode, side, metric), math.nan)

        value = ratio(med("reset", "call_ns"), med("floor", "call_ns"))
        also = f"the core's reset time / the floor's: {fmt_ratio(ratio(med('reset', 'total_ns'), med('floor', 'total_ns')))}"
        # The floor copies the dirty pages back; a drop reset discards them
        # (the next run faults them in): different work, reported, not judged.
        drop = mode == "drop"
        note = ("not judged: the floor copies the dirty pages back, a drop reset discards them (different work)"
                if drop else "")
        out.append(verdict("reset", f"K={k} {config}", config.split("/")[0], value, also=also, note=note,
                           judged=not drop))
    return out


def first_answer_verdicts(summary: pd.DataFrame, skipped: dict[str, str] | None = None,
                         errors: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Verdicts of the first-answer targets for every cell (memory size x
    density x strategy) of a first_answer Part summary (keys memory_mib,
    density, path, strategy; QEMU rows have strategy "-")."""
    skipped = skipped or {}
    m = _medians(summary)
    cells = sorted({(k[0], k[1], k[3]) for k in m if k[3] != "-"}, key=lambda c: (c[0], c[1] != "sparse", c[2]))
    out = []
    for mem, density, strategy in cells:
        cell = f"{mem} MiB {density}"

        def med(path: str, strat: str = strategy) -> float:
            return m.get((mem, density, path, strat, "answer_ns"), math.nan)

        prepared = med("prepared-warmup")
        out.append(verdict("first_answer_floor", cell, strategy, ratio(prepared, med("warm-call")),
                           also=f"prepared without warmup: {fmt_ratio(ratio(med('prepared'), med('warm-call')))}"))
        out.append(verdict("first_answer_pool", cell, strategy, ratio(med("pooled"), prepared),
                           also=f"unpooled: {fmt_ratio(ratio(med('unpooled'), prepared))}; pooled shell vs prepared "
                                f"without warmup: {fmt_ratio(ratio(med('pooled'), med('prepared')))}"))
        qv = med("qemu-prestarted", "-")
        out.append(verdict("first_answer_qemu", cell, strategy, ratio(qv, prepared),
                           also=f"cold QEMU (process start to running): {fmt_ratio(ratio(med('qemu-cold', '-'), prepared))}",
                           note="" if not math.isnan(qv) else f"QEMU not measured: {_qemu_why(FIRST_ANSWER_ERRORS + cell_key('qemu', mem, density), skipped, errors)}"))
    return out


def _qemu_why(key: str, skipped: dict[str, str], errors: dict[str, str] | None) -> str:
    """Why a cell has no QEMU figure: skipped, or the error its QEMU run
    recorded under ``key`` (harness.cell_key, with the part's prefix)."""
    return skipped.get("qemu") or (errors or {}).get(key) or "no figure in this run"


def tally(verdicts: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of met / missed / not judged over every verdict."""
    count: Callable[[Any], int] = lambda want: sum(1 for v in verdicts if v["met"] is want)  # noqa: E731
    return {"total": len(verdicts), "met": count(True), "missed": count(False), "not_judged": count(None)}
