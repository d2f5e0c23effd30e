"""``kvmlab bench age``: what waiting costs a shell. The restore floor of a
``counter`` snapshot into a fresh shell that first waited ``age`` ms
(busy-waiting: only the shell waits, not this thread's caches), every age in
a new random order each round, ``n`` times each. Why the restore benchmark
also reports the floor into an idle pooled shell."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ._native import restore_floor
from .harness import (COUNT, FLAG, MEMORY_MIB, REPS, STRATEGY, TEXT, Arg, Progress, check_args, make_snapshot, measure,
                      part_progress)
from .results import Part, Results

__all__ = ["AGES_MS", "AGE_KEYS", "AGE_METRICS", "age_part", "bench_age"]

#: Shell ages (ms) measured by default: a fresh shell up to one that waited ~1/10 s.
AGES_MS = (0, 1, 3, 10, 30, 100)
#: The oldest shell measured (ms): each one is a busy-wait of this thread.
MAX_AGE_MS = 10_000
AGE_KEYS = ["age_ms"]
AGE_METRICS = ["total_ns", "memory_ns", "vcpu_ns", "devices_ns"]


def age_part(ages_ms: Sequence[float] = AGES_MS, *, memory_mib: int = 256, strategy: str = "map", n: int = 40,
             warmup: int = 2, progress: Progress | None = None, tmp_dir: Path | None = None) -> Part:
    ages = sorted({float(a) for a in ages_ms})
    records: list[dict[str, Any]] = []
    with part_progress(progress, len(ages) * (n + warmup)) as progress:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-age-", dir=tmp_dir) as tmp:
            from .. import Snapshot

            progress.describe(f"age: snapshot counter {memory_mib} MiB")
            _label, path, _present = make_snapshot("sparse", memory_mib, Path(tmp))
            with Snapshot.load(path) as snap:
                progress.describe(f"age: {strategy} floor into shells of {len(ages)} ages")
                for i in range(-warmup, n):
                    for age in random.Random(i).sample(ages, len(ages)):
                        _call, t = restore_floor(snap, strategy, age_s=age / 1000)
                        if i >= 0:
                            records.append({"age_ms": age, "i": i, **{m: t[m] for m in AGE_METRICS}})
                        progress.update(1)
    return Part("age", AGE_KEYS, AGE_METRICS, records,
                config={"ages_ms": ages, "memory_mib": memory_mib, "strategy": strategy, "n": n, "warmup": warmup})


def bench_age(ages_ms: Sequence[float] = AGES_MS, *, memory_mib: int = 256, strategy: str = "map", n: int = 40,
              warmup: int = 2, quiet: bool = True, command: str | None = None) -> Results:
    """``kvmlab bench age`` as a function."""
    check_args("age", ages_ms=(ages_ms, Arg("number", 0, MAX_AGE_MS, many=True)), memory_mib=(memory_mib, MEMORY_MIB),
               strategy=(strategy, STRATEGY), n=(n, REPS), warmup=(warmup, COUNT), quiet=(quiet, FLAG),
               command=(command, TEXT))
    return measure("age", len(set(ages_ms)) * (n + warmup), quiet, command, lambda progress: {
        "age": age_part(ages_ms, memory_mib=memory_mib, strategy=strategy, n=n, warmup=warmup, progress=progress)})
