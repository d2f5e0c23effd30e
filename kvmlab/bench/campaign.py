"""``kvmlab bench campaign``: inputs per second of a campaign
(:func:`kvmlab.distributed.run_inputs`) on a LocalCluster of 1 and of 2 worker
processes, against the native reset loop in this process, and the time a
cold worker (one that has never seen the snapshot) takes to give its first
result.

The guest is the built-in ``parser`` at its input checkpoint; the inputs are
random record streams without the planted bugs (every run exits), the same
for every path. The clusters are
:func:`kvmlab.distributed.local_cluster`'s, as ``run_inputs`` starts without
a client (workers pinned one per CPU when they fill the CPUs, Dask's worker
profiler off; ``--pin always|never`` and ``--profile`` measure other settings). Each 1- or 2-worker
measurement has a new cluster to itself (no other cluster idling beside it),
warm: timed once every worker has run a batch (the snapshot loaded, a VM
made), from the ``run_inputs`` call to its DataFrame. The paths run in a new
random order each repetition. Cold: a new one-worker cluster per repetition,
timed from the ``run_inputs`` call (which ships the snapshot) to the rows of
one batch; judged on a worker process that has imported kvmlab (``dask
worker --preload kvmlab.distributed``; a pinned cluster's workers have), and
also reported for a fresh process that imports it in its first task (an
unpinned cluster).
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any

from ..units import fmt_ratio
from .harness import FLAG, MEMORY_MIB, TEXT, Arg, Progress, check_args, measure, part_progress
from .results import Part, Results
from .stats import ratio

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CAMPAIGN_KEYS", "CAMPAIGN_METRICS", "PATHS", "campaign_part", "campaign_verdicts", "bench_campaign",
           "rate_table", "campaign_parser", "make_inputs"]

CAMPAIGN_KEYS = ["path"]
CAMPAIGN_METRICS = ["elapsed_ns", "per_input_ns"]
#: Throughput paths, and the cold-start one.
PATHS = ("native loop", "1 worker", "2 workers")
#: Workers of each cluster path.
WORKERS = {"1 worker": 1, "2 workers": 2}
#: ``--pin`` choices -> local_cluster's ``pin``.
PIN_CHOICES: dict[str, bool | None] = {"auto": None, "always": True, "never": False}
#: Warm-up rounds a cluster gets for every worker to run a batch.
WARM_ROUNDS = 10
COLD = "cold worker, first batch"
COLD_PROCESS = "fresh worker process, first batch"
_INPUT_SEED = 5


def make_inputs(n: int, seed: int = _INPUT_SEED) -> list[bytes]:
    """``n`` record streams of 0-8 records with 0-32 byte payloads, no planted bug."""
    rng = random.Random(seed)
    kinds = [k for k in range(0x01, 0x40) if k != 0x3C]
    return [b"".join(bytes([rng.choice(kinds), m]) + rng.randbytes(m)
                     for m in (rng.randint(0, 32) for _ in range(rng.randint(0, 8)))) for _ in range(n)]


def _native_ns(snap: Any, inputs: list[bytes], batch_size: int) -> int:
    """The bare native loop in this process over ``inputs``, one warm VM."""
    from .. import distributed as d
    from ..vm import Vm

    batches = [(blob, offsets) for _first, blob, offsets in d._batches(d._check_inputs(inputs, d.MAX_INPUT_BYTES),
                                                                        batch_size)]
    with Vm.restore(snap, resettable=True) as vm:
        vm._reset_loop_var(*batches[0], d.INPUT_GPA, 10**9, d.CONSOLE_BYTES)  # warm
        t0 = time.perf_counter_ns()
        for blob, offsets in batches:
            vm._reset_loop_var(blob, offsets, d.INPUT_GPA, 10**9, d.CONSOLE_BYTES)
        return time.perf_counter_ns() - t0


def _campaign_ns(snap: Any, inputs: list[bytes], client: Any, batch_size: int) -> int:
    from .. import distributed as d

    t0 = time.perf_counter_ns()
    df = d.run_inputs(snap, inputs, client=client, batch_size=batch_size, progress=False)
    took = time.perf_counter_ns() - t0
    assert (df["reason"] == "exit").all(), "a benchmark input did not exit"
    return took


def _cold_ns(snap: Any, inputs: list[bytes], batch_size: int, preload: bool, options: dict[str, Any]) -> int:
    """The first batch on a new one-worker cluster (kvmlab imported there first if ``preload``)."""
    import importlib

    from .. import distributed as d

    with d.local_cluster(1, **options) as client:
        if preload:
            client.run(importlib.import_module, "kvmlab.distributed")
        return _campaign_ns(snap, inputs, client, batch_size)


def _warm_ns(snap: Any, inputs: list[bytes], n_workers: int, batch_size: int, options: dict[str, Any]) -> int:
    """``run_inputs`` over ``inputs`` on a new cluster of ``n_workers``, timed
    once every worker has run a batch."""
    from .. import distributed as d

    warm = make_inputs(8 * n_workers, seed=_INPUT_SEED + 1)
    with d.local_cluster(n_workers, **options) as client:
        for _ in range(WARM_ROUNDS):
            # Small batches, two per worker at once: each worker takes some.
            df = d.run_inputs(snap, warm, client=client, batch_size=4, progress=False)
            if df["worker"].nunique() == n_workers:
                return _campaign_ns(snap, inputs, client, batch_size)
    raise RuntimeError(f"campaign bench: after {WARM_ROUNDS} warm-up rounds a worker of {n_workers} had run no batch")


def campaign_part(n: int = 20_000, *, memory_mib: int = 64, reps: int = 3, batch_size: int = 1024,
                  pin: bool | None = None, profile: bool = False, progress: Progress | None = None) -> Part:
    from .. import distributed as d

    inputs = make_inputs(n)
    options: dict[str, Any] = {"pin": pin, "profile": profile}
    records: list[dict[str, Any]] = []
    with part_progress(progress, reps * (len(PATHS) + 2)) as progress:
        with d.parser_snapshot(memory_mib=memory_mib) as snap:
            for rep in range(reps):
                for path in random.Random(rep).sample(PATHS, len(PATHS)):
                    progress.describe(f"campaign: {path}")
                    took = (_native_ns(snap, inputs, batch_size) if path == "native loop"
                            else _warm_ns(snap, inputs, WORKERS[path], batch_size, options))
                    records.append({"path": path, "rep": rep, "inputs": n, "elapsed_ns": took, "per_input_ns": took / n})
                    progress.update(1)
                for path in (COLD, COLD_PROCESS):
                    progress.describe(f"campaign: {path}")
                    # A pinned cluster's plugin imports kvmlab in its workers: the
                    # fresh process is measured unpinned.
                    took = _cold_ns(snap, inputs[:batch_size], batch_size, path == COLD,
                                    options if path == COLD else {**options, "pin": False})
                    records.append({"path": path, "rep": rep, "inputs": min(n, batch_size), "elapsed_ns": took,
                                    "per_input_ns": took / min(n, batch_size)})
                    progress.update(1)
            present = snap.present_pages
    return Part("campaign", CAMPAIGN_KEYS, CAMPAIGN_METRICS, records,
                config={"n": n, "memory_mib": memory_mib, "reps": reps, "batch_size": batch_size,
                        "present_pages": present, "pin": {v: k for k, v in PIN_CHOICES.items()}[pin],
                        "profile": profile})


def _median(part: Part, path: str, metric: str) -> float:
    s = part.summary()
    row = s[(s["path"] == path) & (s["metric"] == metric)]
    return float(row["median"].iloc[0]) if len(row) else math.nan


def campaign_verdicts(part: Part) -> list[dict[str, Any]]:
    """The three campaign targets, from the medians of ``part``."""
    from .targets import verdict

    per = {p: _median(part, p, "per_input_ns") for p in PATHS}
    cell = f"{part.config['memory_mib']} MiB parser, batches of {part.config['batch_size']}"
    cold_s = _median(part, COLD, "elapsed_ns") / 1e9
    return [
        verdict("campaign_scale", cell, "copy", ratio(per["1 worker"], per["2 workers"]),
                also=f"workers pinned one per CPU: {part.config.get('pin', 'never')}; Dask's worker profiler "
                     f"{'on' if part.config.get('profile', True) else 'off'}; a new warm cluster per measurement"),
        verdict("campaign_worker", cell, "copy", ratio(per["native loop"], per["1 worker"]),
                also=f"2 workers / native loop: {fmt_ratio(ratio(per['native loop'], per['2 workers']))}"),
        verdict("campaign_cold", cell, "copy", cold_s,
                also=f"{part.config['present_pages']} present pages; the first batch is {part.config['batch_size']} "
                     f"inputs; a fresh process that imports kvmlab in its first task: "
                     f"{_median(part, COLD_PROCESS, 'elapsed_ns') / 1e9:.2f} s"),
    ]


def rate_table(part: Part) -> pd.DataFrame:
    """Inputs per second per path: median (min - max) over the repetitions."""
    import pandas as pd

    df = part.frame()
    rows = []
    for path in (*PATHS, COLD, COLD_PROCESS):
        sub = df[df["path"] == path]
        if not len(sub):
            continue
        rate = 1e9 / sub["per_input_ns"]
        rows.append({"path": path, "inputs": int(sub["inputs"].iloc[0]), "reps": len(sub),
                     "inputs/s median": round(rate.median()), "min": round(rate.min()), "max": round(rate.max()),
                     "elapsed ms median": round(sub["elapsed_ns"].median() / 1e6, 1)})
    return pd.DataFrame(rows)


def bench_campaign(n: int = 20_000, *, memory_mib: int = 64, reps: int = 3, batch_size: int = 1024,
                   pin: bool | None = None, profile: bool = False, quiet: bool = True,
                   command: str | None = None) -> Results:
    """``kvmlab bench campaign`` as a function (ConfigError for a bad argument)."""
    check_args("campaign", n=(n, Arg("int", 1, 1 << 24)), memory_mib=(memory_mib, MEMORY_MIB),
               reps=(reps, Arg("int", 1, 1000)), batch_size=(batch_size, Arg("int", 1, 1 << 16)),
               pin=(pin, Arg("bool", optional=True)), profile=(profile, FLAG), quiet=(quiet, FLAG),
               command=(command, TEXT))
    res = measure("campaign", reps * (len(PATHS) + 2), quiet, command, lambda progress: {
        "campaign": campaign_part(n, memory_mib=memory_mib, reps=reps, batch_size=batch_size, pin=pin,
                                  profile=profile, progress=progress)})
    res.verdicts = campaign_verdicts(res.parts["campaign"])
    return res


def campaign_parser(sub: Any, finish: Any, common: Any, command: Any) -> None:
    """Adds ``kvmlab bench campaign`` (``finish``, ``common``, ``command``: the
    bench command line's report, shared options and command-line helpers)."""
    p = sub.add_parser("campaign", help="campaign inputs/s on 1 and 2 Dask workers vs the native loop; cold start",
                       description=__doc__)
    p.add_argument("--n", type=int, default=20_000, help="inputs per path and repetition (default 20000)")
    p.add_argument("--memory-mib", type=int, default=64, help="guest memory of the parser snapshot (default 64)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--batch-size", type=int, default=1024, help="inputs per Dask task (default 1024)")
    p.add_argument("--pin", choices=list(PIN_CHOICES), default="auto",
                   help="pin each worker to a CPU: auto (when the workers fill the CPUs, as run_inputs starts them; "
                        "default), always, never")
    p.add_argument("--profile", action="store_true", help="with Dask's worker profiler on (default off)")
    common(p)

    def run(args: Any) -> Results:
        res = bench_campaign(args.n, memory_mib=args.memory_mib, reps=args.reps, batch_size=args.batch_size,
                             pin=PIN_CHOICES[args.pin], profile=args.profile, quiet=args.quiet,
                             command=command(args))
        print(rate_table(res.parts["campaign"]).to_string(index=False))
        return res

    def cmd(args: Any) -> int:
        return finish("campaign", lambda: run(args), args)

    p.set_defaults(func=cmd)
