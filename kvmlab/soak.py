"""Soak: threads hammer one RestorePool for a while; afterwards nothing leaked,
every counter adds up and no restore ever produced wrong memory.

    python -m kvmlab.soak --seconds 600     (CI runs 60 s through tests/test_soak.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import _progress
from .fork import memory_usage
from .pool import PoolConfig, RestorePool
from .vm import Vm
from .config import VmConfig

if TYPE_CHECKING:
    from .snapshot import Snapshot
    from .vm import _VmHandle

__all__ = ["SoakReport", "Resources", "run_soak", "MAX_LIVE_VMS", "SLACK_BYTES"]

#: Bound on VMs alive at once: pool max_size 6 + 4 in use + the core's destroy
#: backlog (64) + 4 being destroyed + shells being created, with slack.
MAX_LIVE_VMS = 100


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _live_vms() -> int:
    """KVM VMs this process holds (their fds), to prove the backlog is bounded."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:kvm-vm":
                n += 1
        except OSError:
            pass
    return n


def _memory_digest(vm: _VmHandle) -> bytes:
    """SHA-256 of all guest memory, read in 64 KiB pieces (small allocations:
    whole-memory buffers would measure the allocator, not kvmlab)."""
    h = hashlib.sha256()
    step = 64 << 10
    for gpa in range(0, vm.memory_bytes, step):
        h.update(vm.read_memory(gpa, step))
    return h.digest()


def _trim() -> None:
    """Returns freed heap memory to the OS (glibc keeps it cached otherwise),
    so what remains is what is still allocated."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mapped_bytes() -> int:
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = line.split(None, 1)[0].split("-")
            total += int(hi, 16) - int(lo, 16)
    return total


#: How much more mapped or resident memory the process may hold after the
#: soak than before it (allocator arenas, caches), in bytes.
SLACK_BYTES = 64 << 20


@dataclass(frozen=True)
class Resources:
    """What the process holds: open descriptors, mapped and resident bytes."""

    fds: int
    mapped_bytes: int
    rss_bytes: int

    @classmethod
    def measure(cls) -> Resources:
        """The process's now, once freed heap memory went back to the OS."""
        time.sleep(0.5)
        _trim()
        return cls(_fds(), _mapped_bytes(), memory_usage()["rss_bytes"])


@dataclass
class SoakReport:
    seconds: float
    threads: int
    restores: int = 0
    runs: int = 0
    releases: int = 0
    warms: int = 0
    stats_calls: int = 0
    memory_checks: int = 0
    memory_mismatches: int = 0
    errors: list[str] = field(default_factory=list)
    counters_ok: bool = False
    before: Resources = field(default_factory=lambda: Resources(0, 0, 0))
    after: Resources = field(default_factory=lambda: Resources(0, 0, 0))
    final_stats: dict = field(default_factory=dict)
    #: Most KVM VMs alive at once during the run (idle + in use + being destroyed).
    max_live_vms: int = 0

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.memory_mismatches == 0
            and self.counters_ok
            and self.after.fds <= self.before.fds
            and self.after.mapped_bytes <= self.before.mapped_bytes + SLACK_BYTES
            and self.after.rss_bytes <= self.before.rss_bytes + SLACK_BYTES
            and self.max_live_vms <= MAX_LIVE_VMS
        )


def _hammer(pool: RestorePool, snap: Snapshot, blob: bytes, golden: bytes, threads: int, seconds: float, seed: int,
            rep: SoakReport, close: bool, progress: bool = False, desc: str = "soak") -> None:
    """`threads` threads doing restore/run/release/warm/stats on `pool`."""
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        rnd = random.Random(seed + k)
        local = {"restores": 0, "runs": 0, "releases": 0, "warms": 0, "stats": 0, "checks": 0, "bad": 0}
        try:
            while time.monotonic() < stop:
                op = rnd.random()
                if op < 0.1:
                    pool.warm(rnd.randint(0, 6))
                    local["warms"] += 1
                    continue
                if op < 0.2:
                    s = pool.stats()
                    assert s.idle <= s.max_size and s.in_use <= threads
                    local["stats"] += 1
                    vms = _live_vms()
                    with lock:
                        rep.max_live_vms = max(rep.max_live_vms, vms)
                    continue
                how = rnd.choice(("snapshot", "bytes", "parts"))
                if how == "snapshot":
                    rvm = pool.restore_snapshot(snap, strategy=rnd.choice(("copy", "auto")))
                elif how == "bytes":
                    rvm = pool.restore_from_bytes(blob)
                else:
                    rvm = pool.restore(snap.memory, snap.vcpu_state)
                local["restores"] += 1
                with rvm:
                    if rnd.random() < 0.25:
                        local["checks"] += 1
                        if _memory_digest(rvm) != golden:
                            local["bad"] += 1
                    r = rvm.run_until_exit(timeout_s=10)
                    assert r.exit_code == 0
                    local["runs"] += 1
                local["releases"] += 1
        except Exception as e:  # noqa: BLE001 - reported, fails the soak
            with lock:
                rep.errors.append(f"thread {k}: {type(e).__name__}: {e}")
        with lock:
            rep.restores += local["restores"]
            rep.runs += local["runs"]
            rep.releases += local["releases"]
            rep.warms += local["warms"]
            rep.stats_calls += local["stats"]
            rep.memory_checks += local["checks"]
            rep.memory_mismatches += local["bad"]

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    with _progress.bar(round(seconds, 1), desc, "s", progress) as bar:
        t0 = time.monotonic()
        for t in ts:
            while t.is_alive():
                t.join(0.5)
                bar.update(round(min(time.monotonic() - t0, seconds), 1) - bar.n)

    if close:
        pool.close()


def run_soak(
    seconds: float = 60.0, threads: int = 4, memory_mib: int = 16, seed: int = 1, progress: bool = True
) -> SoakReport:
    """Runs the soak; tolerance for 'back to the start': no extra fds, and at
    most 64 MiB more mapped memory and RSS (allocator caches, Python heap).

    Args:
        seconds: how long the threads hammer the pool (after a warm-up).
        threads: threads restoring, running, releasing, warming concurrently.
        memory_mib: guest memory.
        seed: seeds each thread's random choice of operations.
        progress: show a progress bar in seconds (tqdm.auto).

    Returns:
        A :class:`SoakReport`; ``ok`` is False if anything went wrong.
    """
    _progress.check(progress)
    cfg = VmConfig(memory_mib=memory_mib)
    boot = Vm.boot("counter", cfg, args={"steps": 6, "checkpoint_at": 3})
    boot.run()
    snap = boot.snapshot()
    boot.close()
    golden = hashlib.sha256(bytes(snap.memory)).digest()
    blob = snap.to_bytes()

    rep = SoakReport(seconds=seconds, threads=threads)
    # Warm-up: the same load for a moment, so thread stacks, malloc arenas and
    # caches exist before the baseline is taken.
    _hammer(RestorePool(cfg, PoolConfig(min_size=2, max_size=6)), snap, blob, golden, threads, max(2.0, min(10.0, seconds / 6)), seed, SoakReport(0, threads), close=True)
    rep.before = Resources.measure()

    pool = RestorePool(cfg, PoolConfig(min_size=2, max_size=6))
    _hammer(pool, snap, blob, golden, threads, seconds, seed, rep, close=False, progress=progress)

    # Counters add up once the reaper caught up.
    deadline = time.monotonic() + 120
    while True:
        s = pool.stats()
        if s.pending_destroy == 0 and s.creating == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    rep.final_stats = asdict(s)
    rep.counters_ok = (
        s.in_use == 0
        and s.restores == rep.restores
        and s.releases == rep.releases
        and s.hits + s.misses == s.restores + s.failures
        and s.created - s.destroyed == s.idle + s.parked
        and s.failures == 0
    )
    pool.close()
    snap.close()
    rep.after = Resources.measure()
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmlab.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--json", help="write the report as JSON here")
    a = ap.parse_args(argv)
    rep = run_soak(a.seconds, a.threads)
    d = asdict(rep) | {"ok": rep.ok}
    print(json.dumps(d, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(d, f, indent=2)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
