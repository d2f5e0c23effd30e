"""Benchmark results as data: every benchmark returns a :class:`Results`
(``frame()``: a tidy DataFrame, one row per measurement; ``summary()``: the
:class:`~kvmlab.bench.stats.Stats` of every figure per cell; ``verdicts``:
the targets computed from them); ``save()`` writes JSON with
``schema_version``, versions and host; :func:`load_results` reads it back as
a DataFrame and :func:`compare` puts two runs side by side.

    >>> res = kvmlab.bench.bench_restore([64], n=20)
    >>> res.summary().query("metric == 'call_ns'")
    >>> print(kvmlab.bench.text(res))        # or kvmlab.bench.markdown(res)
    >>> res.save("run.json"); df = kvmlab.bench.load_results("run.json")
    >>> kvmlab.bench.compare("before.json", "after.json")
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ConfigError
from .stats import STAT_FIELDS, Stats, ratio
from .targets import VERDICT_FIELDS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SCHEMA_VERSION", "Part", "Results", "load", "load_results", "compare"]

#: Version of the saved JSON layout; :func:`load` refuses newer ones.
SCHEMA_VERSION = 1
#: Largest results file :func:`load` reads (a full ``bench all`` run is a few MB).
MAX_RESULTS_BYTES = 256 << 20


@dataclass
class Part:
    """The measurements of one benchmark: ``records`` (one dict per
    measurement) whose ``keys`` columns name the cell and whose ``metrics``
    columns are the figures (``*_ns`` nanoseconds, ``*_bytes`` bytes)."""

    name: str
    keys: list[str]
    metrics: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = set(self.keys) & ({"metric", "part", *STAT_FIELDS} | set(self.metrics))
        assert not clash, f"key columns {clash} clash with summary or metric columns"

    def __repr__(self) -> str:
        return f"Part({self.name!r}, {len(self.records)} records, keys={self.keys}, metrics={self.metrics})"

    def frame(self) -> pd.DataFrame:
        import pandas as pd

        df = pd.DataFrame.from_records(self.records)
        cols = [c for c in self.keys if c in df.columns]
        cols += [c for c in df.columns if c not in cols and c not in self.metrics]
        cols += [c for c in self.metrics if c in df.columns]
        return df[cols] if len(df) else pd.DataFrame(columns=self.keys + self.metrics)

    def summary(self) -> pd.DataFrame:
        """One row per (cell, metric) with the Stats fields; metrics a cell
        never measured are left out."""
        import pandas as pd

        df = self.frame()
        keys = [k for k in self.keys if k in df.columns]
        rows = []
        if len(df):
            groups = df.groupby(keys, sort=False, dropna=False) if keys else [((), df)]
            for key, sub in groups:
                key = key if isinstance(key, tuple) else (key,)
                for m in self.metrics:
                    if m not in sub.columns:
                        continue
                    st = Stats.of(sub[m].tolist())
                    if st.n:
                        rows.append({**dict(zip(keys, key)), "metric": m, **st.to_dict()})
        return pd.DataFrame(rows, columns=keys + ["metric", *STAT_FIELDS])

    def to_dict(self) -> dict[str, Any]:
        cols: list[str] = []
        for r in self.records:
            cols += [c for c in r if c not in cols]
        return {"keys": self.keys, "metrics": self.metrics, "config": self.config, "notes": self.notes,
                "columns": cols, "rows": [[_plain(r.get(c)) for c in cols] for r in self.records]}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "Part":
        cols = d["columns"]
        return cls(name, list(d["keys"]), list(d["metrics"]), [dict(zip(cols, row)) for row in d["rows"]],
                   dict(d.get("config") or {}), dict(d.get("notes") or {}))


def _plain(v: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python, paths -> str."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str, bytes)):
        return _plain(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


@dataclass
class Results:
    """One run of one benchmark (or of ``bench all``: several parts).
    ``verdicts``: one dict per target and cell (see :mod:`kvmlab.bench.targets`)."""

    benchmark: str
    parts: dict[str, Part] = field(default_factory=dict)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    started_unix: float = field(default_factory=time.time)
    seconds: float = math.nan
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: name -> matplotlib Figure (``bench all``); not saved.
    figures: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} ({len(p.records)})" for n, p in self.parts.items()) or "none"
        met = sum(1 for v in self.verdicts if v["met"] is True)
        return f"<Results {self.benchmark}: parts {parts}; {met} of {len(self.verdicts)} targets met>"

    def _repr_html_(self) -> str:
        """The verdicts as a table (the full report: ``kvmlab.bench.markdown(res)``)."""
        import html

        cols = ["claim", "cell", "strategy", "value", "bound", "met", "note"]
        table = self.verdict_frame()[cols].to_html(index=False, float_format=lambda x: f"{x:.2f}")
        return f"<p>{html.escape(repr(self))}</p>{table if self.verdicts else ''}"

    def part(self, name: str) -> Part:
        if name not in self.parts:
            raise ConfigError(f"this run has no {name!r} part (it has {', '.join(self.parts) or 'none'}); "
                              "it was skipped or not measured: see .skipped and .errors", check="results_part")
        return self.parts[name]

    def frame(self, part: str | None = None) -> pd.DataFrame:
        """The measurements, one row per measurement: of ``part``, or of
        every part with a ``part`` column first."""
        import pandas as pd

        if part is not None:
            return self.part(part).frame()
        frames = [p.frame().assign(part=name) for name, p in self.parts.items()]
        if not frames:
            return pd.DataFrame(columns=["part"])
        df = pd.concat(frames, ignore_index=True)
        return df[["part"] + [c for c in df.columns if c != "part"]]

    def summary(self, part: str | None = None) -> pd.DataFrame:
        """Stats per cell and metric (of ``part``, or of every part)."""
        import pandas as pd

        if part is not None:
            return self.part(part).summary()
        frames = [p.summary().assign(part=name) for name, p in self.parts.items()]
        if not frames:
            return pd.DataFrame(columns=["part", "metric", *STAT_FIELDS])
        df = pd.concat(frames, ignore_index=True)
        return df[["part"] + [c for c in df.columns if c != "part"]]

    def verdict_frame(self) -> pd.DataFrame:
        """The targets, one row per target and cell."""
        import pandas as pd

        return pd.DataFrame(self.verdicts, columns=list(VERDICT_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "benchmark": self.benchmark, "host": self.host,
            "versions": self.versions, "command": self.command, "started_unix": self.started_unix,
            "seconds": _plain(self.seconds), "skipped": self.skipped, "errors": self.errors,
            "verdicts": [{k: _plain(v) for k, v in d.items()} for d in self.verdicts],
            "parts": {name: p.to_dict() for name, p in self.parts.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the results as JSON (``schema_version`` first); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=None, separators=(",", ":"), default=_plain) + "\n")
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Results":
        version = d.get("schema_version")
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise ConfigError(f"results schema_version {version!r} is not one this kvmlab reads "
                              f"(1..{SCHEMA_VERSION}); read it with the kvmlab that wrote it, or re-run the benchmark", check="results_schema")
        return cls(
            benchmark=d["benchmark"], parts={n: Part.from_dict(n, p) for n, p in d["parts"].items()},
            verdicts=list(d.get("verdicts") or []), host=dict(d.get("host") or {}),
            versions=dict(d.get("versions") or {}), command=d.get("command"),
            started_unix=d.get("started_unix") or math.nan,
            seconds=math.nan if d.get("seconds") is None else d["seconds"],
            skipped=dict(d.get("skipped") or {}), errors=dict(d.get("errors") or {}),
        )


def load(path: str | os.PathLike[str]) -> Results:
    """A saved run (``Results.save``, ``kvmlab bench ... --json``) as :class:`Results`."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_RESULTS_BYTES:
            raise ConfigError(f"{p} is {size} bytes, more than a results file can be ({MAX_RESULTS_BYTES}); "
                              "pass the results.json a benchmark wrote", check="results_size")
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read results file {p}: {e.strerror or e}; pass the path of a saved run", check="results_read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not a results file (not JSON: {e}); pass the results.json a benchmark wrote", check="results_format") from None
    if not isinstance(doc, dict) or "parts" not in doc:
        raise ConfigError(f"{p} is not a kvmlab results file (no 'parts'); pass the results.json a benchmark wrote", check="results_format")
    try:
        return Results.from_dict(doc)
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{p} is a damaged results file ({type(e).__name__}: {e}); re-run the benchmark", check="results_format") from None


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A saved run as a tidy DataFrame (one row per measurement, a ``part``
    column); ``df.attrs`` holds ``schema_version``, ``benchmark``, ``host``,
    ``versions``, ``command`` and ``verdicts``."""
    res = load(path)
    df = res.frame()
    df.attrs.update(schema_version=SCHEMA_VERSION, benchmark=res.benchmark, host=res.host, versions=res.versions,
                    command=res.command, verdicts=res.verdicts)
    return df


def _as_results(x: Any) -> Results:
    if isinstance(x, Results):
        return x
    if isinstance(x, (str, os.PathLike)):
        return load(x)
    raise ConfigError(f"compare() takes Results or paths of saved runs, not {type(x).__name__}", check="argument_type")


def compare(a: Any, b: Any, stat: str = "median") -> pd.DataFrame:
    """Two runs side by side: per part, cell and metric the ``stat`` of run
    ``a`` and of run ``b`` and ``ratio`` = b / a (below 1: ``b`` is faster or
    smaller). ``a`` and ``b``: :class:`Results` or paths of saved runs; cells
    measured in only one run have NaN on the other side."""
    import pandas as pd

    if stat not in STAT_FIELDS:
        raise ConfigError(f"stat must be one of {', '.join(STAT_FIELDS)}, not {stat!r}", check="argument_value")
    sa, sb = _as_results(a).summary(), _as_results(b).summary()
    keys = [c for c in sa.columns if c not in STAT_FIELDS]
    keys += [c for c in sb.columns if c not in STAT_FIELDS and c not in keys]
    for s in (sa, sb):
        for k in keys:
            if k not in s.columns:
                s[k] = None
    left = sa[keys + [stat]].rename(columns={stat: "a"})
    right = sb[keys + [stat]].rename(columns={stat: "b"})
    for s in (left, right):
        s[keys] = s[keys].astype(object).where(s[keys].notna(), "")
    df = pd.merge(left, right, on=keys, how="outer", sort=False)
    df["ratio"] = [ratio(y, x) for x, y in zip(df["a"], df["b"])]
    return df
