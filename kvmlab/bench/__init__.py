"""kvmlab's benchmarks: how fast restore, reset and fork are on this host,
against the floor of what the host allows and against QEMU and unicorn.

One module per benchmark (:mod:`.restore`, :mod:`.first_answer`, :mod:`.reset`, :mod:`.fork`,
:mod:`.age`, :mod:`.peers.qemu`, :mod:`.peers.unicorn`, :mod:`.all`), each
returning a :class:`Results` (``.frame()``, ``.summary()``, ``.verdicts``,
``.save()``); :mod:`.report` prints and plots them, :mod:`.targets` computes
the verdicts. The native floors are reached only through :mod:`._native`.

    kvmlab bench restore | first-answer | reset | fork | age | all | docs     (python -m kvmlab bench ...)
    >>> res = kvmlab.bench.bench_restore([64], n=20)
    >>> res.frame(); res.summary(); res.verdict_frame(); print(kvmlab.bench.text(res))
    >>> res.save("run.json"); kvmlab.bench.load_results("run.json")
    >>> kvmlab.bench.compare("before.json", "after.json")
"""

from .age import bench_age
from .campaign import bench_campaign
from .all import run_all
from .cli import add_parser, main
from .first_answer import bench_first_answer
from .fork import bench_fork
from .report import markdown, plots, text
from .reset import bench_reset
from .restore import bench_restore
from .results import SCHEMA_VERSION, Results, compare, load, load_results
from .stats import Stats
from .targets import TARGETS

__all__ = ["bench_restore", "bench_reset", "bench_fork", "bench_first_answer", "bench_age", "bench_campaign", "run_all", "Results", "Stats", "TARGETS",
           "SCHEMA_VERSION", "load", "load_results", "compare", "plots", "text", "markdown", "add_parser", "main"]
