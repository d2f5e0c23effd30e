"""What every benchmark shares: progress, the
snapshots measured (made through the public API), the host and versions."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from ..config import MAX_MEMORY_MIB, MIN_MEMORY_MIB, bad_argument
from .targets import FIRST_ANSWER_ERRORS, FORK_ERRORS, cell_key  # noqa: F401 - the runners take them from here

if TYPE_CHECKING:
    from ..snapshot import Snapshot
    from ..vm import Vm
    from .results import Results

__all__ = [
    "PAGE_BYTES",
    "FREE_BASE",
    "DENSE_FRACTION",
    "Progress",
    "host_info",
    "versions",
    "make_snapshot",
    "make_service_snapshot",
    "make_memtouch_snapshot",
    "fill_pages",
    "measure",
    "Arg",
    "REPS",
    "COUNT",
    "FLAG",
    "TEXT",
    "MEMORY_MIB",
    "MEMORY_SIZES",
    "STRATEGY",
    "FRACTION",
    "check_args",
    "guard",
    "part_errors",
]

PAGE_BYTES = 4096
FREE_BASE = 0x400000  # first byte the guests may use (docs/guest-protocol.md)
#: Share of guest memory a dense snapshot has written.
DENSE_FRACTION = 0.25


class Progress:
    """The bar of a benchmark run (kvmlab's ``tqdm.auto`` bar: a widget in
    notebooks); nothing when ``quiet``. ``describe`` names the current step."""

    def __init__(self, total: int, quiet: bool = False, unit: str = "step") -> None:
        from .._progress import bar

        assert total >= 0, total
        self._bar = bar(total, "kvmlab bench", unit, not quiet)

    def describe(self, text: str) -> None:
        self._bar.set_postfix_str(text)

    def update(self, k: int = 1) -> None:
        self._bar.update(k)

    def close(self) -> None:
        self._bar.close()


@contextmanager
def part_progress(progress: Progress | None, total_steps: int) -> Iterator[Progress]:
    """The bar a benchmark part reports to: the caller's (``kvmlab bench
    all`` shares one across parts), or a quiet one of ``total_steps`` that
    the part owns and that is closed when it ends."""
    if progress is not None:
        yield progress
        return
    own = Progress(total_steps, True)
    try:
        yield own
    finally:
        own.close()


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
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "kvm_modules": mods,
            "hostname": platform.node()}


def versions() -> dict[str, Any]:
    """Versions of Python, kvmlab, its native ABI and the peers (None: absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("kvmlab", "unicorn", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    from ._native import abi_version

    out["abi"] = abi_version()
    return out


def make_snapshot(kind: str, memory_mib: int, out_dir: Path, dense_fraction: float = DENSE_FRACTION) -> tuple[str, Path, int]:
    """Boots a guest to a checkpoint and saves its snapshot: ``kind`` sparse is
    ``counter`` (a handful of non-zero pages), dense is ``memtouch`` with
    ``dense_fraction`` of memory touched. Returns (guest label, path, present pages)."""
    from .. import Vm, VmConfig

    assert kind in ("sparse", "dense"), kind
    if kind == "sparse":
        label, guest, args = "counter", "counter", {"steps": 20, "checkpoint_at": 10}
    else:
        label, guest, args = f"memtouch{round(dense_fraction * 100)}", "memtouch", {
            "pages": max(1, _pages(memory_mib, dense_fraction)), "rounds": 2}
    with Vm.boot(guest, VmConfig(memory_mib=memory_mib), args=args) as vm:
        r = vm.run(timeout_s=120)
        if r.reason != "checkpoint":
            raise RuntimeError(f"{guest} did not reach its checkpoint ({r.reason}): {r.console[-200:]}")
        with vm.snapshot() as snap:
            return label, snap.save(out_dir / f"{label}-{memory_mib}mib.kvmsnap"), snap.present_pages


def _pages(memory_mib: int, fraction: float) -> int:
    """``fraction`` of guest memory in pages, at most what fits above FREE_BASE."""
    total = (memory_mib << 20) // PAGE_BYTES
    return min(int(total * fraction), ((memory_mib << 20) - FREE_BASE) // PAGE_BYTES)


def fill_pages(vm: Vm, memory_mib: int, fraction: float) -> int:
    """Writes one non-zero word into ``fraction`` of the guest's pages (from
    FREE_BASE), so a snapshot of it is dense. Returns the page count."""
    pages = _pages(memory_mib, fraction)
    chunk = 4096  # pages per write
    for first in range(0, pages, chunk):
        cnt = min(chunk, pages - first)
        buf = bytearray(cnt * PAGE_BYTES)
        for p in range(cnt):
            word = (first + p) * 0x9E3779B97F4A7C15 % (1 << 64) | 1
            buf[p * PAGE_BYTES:p * PAGE_BYTES + 8] = word.to_bytes(8, "little")
        vm.write_memory(FREE_BASE + first * PAGE_BYTES, buf)
    return pages


def make_service_snapshot(memory_mib: int, out_dir: Path, dense_fraction: float = 0.0) -> Path:
    """The ``service`` guest at its service checkpoint, saved to a file (dense
    when ``dense_fraction`` > 0: see :func:`fill_pages`)."""
    from .. import Vm, VmConfig
    from ..vm import SERVICE_TAG

    with Vm.boot("service", VmConfig(memory_mib=memory_mib)) as vm:
        r = vm.run(timeout_s=60)
        if r.reason != "checkpoint" or r.checkpoint_tag != SERVICE_TAG:
            raise RuntimeError(f"the service guest did not reach its checkpoint: {r}")
        if dense_fraction > 0:
            fill_pages(vm, memory_mib, dense_fraction)
        with vm.snapshot() as snap:
            tag = f"-dense{round(dense_fraction * 100)}" if dense_fraction > 0 else ""
            return snap.save(out_dir / f"service{tag}-{memory_mib}mib.kvmsnap")


def make_memtouch_snapshot(pages: int, memory_mib: int, out_dir: Path) -> Snapshot:
    """memtouch (pages=K, rounds=2) stopped at round 1's checkpoint, saved and
    loaded back (file-backed). Returns the loaded Snapshot."""
    from .. import Snapshot, Vm, VmConfig

    with Vm.boot("memtouch", VmConfig(memory_mib=memory_mib), args={"pages": pages, "rounds": 2}) as vm:
        r = vm.run(timeout_s=120)
        if r.reason != "checkpoint" or r.checkpoint_tag != 1:
            raise RuntimeError(f"memtouch pages={pages} did not stop at round 1's checkpoint: {r}")
        with vm.snapshot() as snap:
            path = snap.save(out_dir / f"memtouch-{pages}p-{memory_mib}mib.kvmsnap")
    return Snapshot.load(path)


def measure(benchmark: str, total_steps: int, quiet: bool, command: str | None,
            run: Callable[[Progress], dict[str, Any]]) -> Results:
    """One benchmark run: a progress bar of ``total_steps``, ``run(progress)``
    returning its parts (name -> Part), host, versions and duration around it."""
    from .results import Results

    res = Results(benchmark, host=host_info(), versions=versions(), command=command)
    progress = Progress(total_steps, quiet)
    t0 = time.monotonic()
    try:
        res.parts.update(run(progress))
    finally:
        progress.close()
    res.seconds = time.monotonic() - t0
    return res


#: Most repetitions any benchmark takes (a figure per repetition is kept in memory).
MAX_REPS = 1_000_000
#: Most values in one list argument (memory sizes, VM counts, page counts, ages).
MAX_ITEMS = 64


@dataclass(frozen=True)
class Arg:
    """What one benchmark argument may be: ``kind`` "int" (``lo`` .. ``hi``,
    ``even``), "number" (``lo`` .. ``hi``, above ``lo`` if ``open_lo``), "bool",
    "text" or "choice" (one of ``choices``); ``many``: a list (tuple, range) of
    ``min_items`` .. MAX_ITEMS of them; ``optional``: None is allowed too.
    :func:`check_args` checks it."""

    kind: str
    lo: float = 0
    hi: float = 0
    even: bool = False
    open_lo: bool = False
    choices: tuple[str, ...] = ()
    many: bool = False
    min_items: int = 1
    optional: bool = False

    def __post_init__(self) -> None:
        assert self.kind in ("int", "number", "bool", "text", "choice"), self.kind
        assert self.lo <= self.hi, (self.lo, self.hi)
        assert 0 <= self.min_items <= MAX_ITEMS, self.min_items

    def what(self) -> str:
        one = {"int": f"an int in {self.lo:g} .. {self.hi:g}" + (", even" if self.even else ""),
               "number": f"a number in {'(' if self.open_lo else ''}{self.lo:g} .. {self.hi:g}",
               "bool": "True or False", "text": "a str", "choice": f"one of {', '.join(self.choices)}"}[self.kind]
        out = f"a list of {self.min_items} .. {MAX_ITEMS} values, each {one}" if self.many else one
        return out + (", or None" if self.optional else "")

    def check(self, prefix: str, name: str, v: object) -> None:
        """Raises ConfigError (``check`` argument_type / argument_range /
        argument_value, ``argument`` = ``name``) unless ``v`` is what this allows."""
        if v is None and self.optional:
            return
        if not self.many:
            return self._one(prefix, name, name, v)
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple, range)):
            bad_argument("argument_type", name, f"{prefix}{name} must be {self.what()}, got {v!r} ({type(v).__name__})")
        if not self.min_items <= len(v) <= MAX_ITEMS:
            bad_argument("argument_range", name, f"{prefix}{name} has {len(v)} values: pass {self.what()}")
        for i, x in enumerate(v):
            self._one(prefix, name, f"{name}[{i}]", x)

    def _one(self, prefix: str, name: str, label: str, v: object) -> None:
        def bad(check: str) -> NoReturn:
            bad_argument(check, name, f"{prefix}{label}={v!r} ({type(v).__name__}): pass {self.what()}")

        if self.kind in ("int", "number"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind == "int" and not isinstance(v, int)):
                bad("argument_type")
            if math.isnan(v) or not self.lo <= v <= self.hi or (self.open_lo and v == self.lo) or (self.even and v % 2):
                bad("argument_range")
        elif self.kind == "bool" and not isinstance(v, bool):
            bad("argument_type")
        elif self.kind in ("text", "choice") and not isinstance(v, str):
            bad("argument_type")
        elif self.kind == "choice" and v not in self.choices:
            bad("argument_value")


#: The arguments every benchmark shares (said once here).
REPS = Arg("int", 1, MAX_REPS)
COUNT = Arg("int", 0, MAX_REPS)  # warm-up rounds, peer repetitions
FLAG = Arg("bool")
TEXT = Arg("text", optional=True)  # the command line recorded, a binary name
MEMORY_MIB = Arg("int", MIN_MEMORY_MIB, MAX_MEMORY_MIB, even=True)
MEMORY_SIZES = replace(MEMORY_MIB, many=True)
STRATEGY = Arg("choice", choices=("copy", "map"))
FRACTION = Arg("number", 0, 1, open_lo=True)  # a share of guest memory


def check_args(benchmark: str, problems: Mapping[str, bool] | Callable[[], Mapping[str, bool]] | None = None, /,
               **args: tuple[object, Arg]) -> None:
    """The one check of a benchmark's arguments, before any work. First every
    ``name=(value, Arg)``: ConfigError with ``check`` argument_type,
    argument_range or argument_value and ``argument`` = name; then the
    ``problems`` between arguments (a mapping, or a function returning it so
    that it runs on checked values): ConfigError ``check="bench_arguments"``
    naming every problem whose condition is True. The CLI reports either as a
    usage error."""
    from ..errors import ConfigError

    prefix = f"kvmlab bench {benchmark}: "
    for name, (value, arg) in args.items():
        arg.check(prefix, name, value)
    found = problems() if callable(problems) else problems or {}
    bad = [what for what, failed in found.items() if failed]
    if bad:
        raise ConfigError(prefix + "; ".join(bad), check="bench_arguments")


def guard(errors: dict[str, str], what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; if it fails, the failure goes into ``errors[what]`` (and on
    stderr with its traceback) and None is returned: one failing part or
    peer must not lose the figures measured beside it. Ctrl-C is not caught."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        errors[what] = f"{type(e).__name__}: {e}"
        print(f"kvmlab bench: {what} failed: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return None


def part_errors(part: Any, prefix: str) -> dict[str, str]:
    """The failures a Part recorded in ``notes["errors"]`` (a fork n a host
    limit stopped, a QEMU cell that failed), keyed for ``Results.errors``."""
    return {f"{prefix}{k}": v for k, v in (part.notes.get("errors") or {}).items()}
