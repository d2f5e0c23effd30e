"""What every benchmark shares: progress, the
snapshots measured (made through the public API), the host and versions."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    "check_args",
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


def check_args(benchmark: str, problems: dict[str, bool]) -> None:
    """Raises ConfigError naming every problem whose condition is True (the
    one place a benchmark's arguments are checked; the CLI reports it as a
    usage error)."""
    from ..errors import ConfigError

    bad = [what for what, failed in problems.items() if failed]
    if bad:
        raise ConfigError(f"kvmlab bench {benchmark}: " + "; ".join(bad), check="bench_arguments")
