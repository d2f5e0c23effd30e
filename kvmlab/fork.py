"""Fork density: many VMs sharing one snapshot file's pages copy-on-write.

    >>> snap = kvmlab.Snapshot.load("service.kvmsnap")
    >>> with kvmlab.fork_many(snap, 100) as vms:      # 100 restored VMs, map strategy
    ...     print(vms.ready_ns, vms.pss_bytes_per_vm)
    ...     vms[7].call(b"hi")

Each VM is a ``map`` restore of the same file-backed snapshot: guest memory is
a private mapping of the file, so the VMs share its page cache until they
write. Creation is one native call on a few native threads (zigsrc/fork.zig
says what it does and skips, and why in that order); teardown runs on
several threads too, since it waits ~11 ms per VM on kvm_pvm.
"""

from __future__ import annotations

import os
import resource
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from . import _ffi, _progress
from ._closing import Closing
from .config import bad_argument, check_int, check_type
from .errors import ConfigError, KvmlabError, KvmlabMemoryError
from .snapshot import Snapshot
from .vm import Vm

__all__ = ["fork_many", "ForkSet", "memory_usage", "raise_fd_limit"]

ffi = _ffi.ffi
lib = _ffi.lib


#: Most native threads fork_many restores on (zigsrc/fork.zig max_threads).
MAX_THREADS = 64
#: Most VMs of one fork_many call (zigsrc/fork.zig max_vms).
MAX_VMS = 100_000


#: /proc/meminfo counters that KVM's per-VM kernel memory shows in (memory_usage).
_KERNEL_COUNTERS = ("VmallocUsed", "Slab", "KernelStack", "PageTables", "SecPageTables")


def _percpu_free_bytes() -> int:
    """Free pages parked in the per-CPU lists (/proc/zoneinfo ``count``)."""
    try:
        with open("/proc/zoneinfo") as f:
            pages = sum(int(line.split()[1]) for line in f if line.lstrip().startswith("count:"))
    except (OSError, ValueError, IndexError):
        return 0
    return pages * resource.getpagesize()


def memory_usage() -> dict[str, int]:
    """This process's RSS and PSS, and the host's available memory, in bytes.

    RSS/PSS miss what KVM allocates in the kernel per VM (vCPU state, the
    memory slot's metadata, irqchip); the drop in ``available_bytes``
    includes it (and whatever else the host did meanwhile). That is
    MemAvailable plus the free pages in the per-CPU lists, which MemFree and
    MemAvailable leave out: after a large free (closing VMs) those lists held
    up to ~600 MiB here, and 512 MiB allocated then dropped MemAvailable by
    as little as 38 MiB. ``kernel_bytes`` sums the kernel's own counters
    that KVM's per-VM allocations land in (vmalloc: the memory slot's
    metadata; slab: vCPUs, debugfs; kernel stacks: the PIT's thread; page
    tables), less noisy on a busy host."""
    out = {"rss_bytes": 0, "pss_bytes": 0, "available_bytes": _percpu_free_bytes(), "kernel_bytes": 0}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemAvailable":
                    out["available_bytes"] += int(rest.split()[0]) * 1024
                elif key in _KERNEL_COUNTERS:
                    out["kernel_bytes"] += int(rest.split()[0]) * 1024
    except OSError:
        pass
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key.lower() + "_bytes"] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def raise_fd_limit(needed: int) -> int:
    """Raises the soft RLIMIT_NOFILE towards the hard limit so ``needed`` more
    descriptors fit.

    Args:
        needed: descriptors about to be opened.

    Returns:
        The soft limit now.

    Raises:
        ConfigError: the hard limit is too low (raise it with ``ulimit -Hn``
            or /etc/security/limits.conf).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    want = in_use + needed + 64
    if want <= soft:
        return soft
    if hard != resource.RLIM_INFINITY and want > hard:
        raise ConfigError(
            f"{needed} more file descriptors are needed but the hard limit is {hard} "
            f"(each VM holds 1 + vcpus descriptors): raise it (ulimit -Hn, /etc/security/limits.conf)",
            check="fd_limit",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class ForkStats:
    n: int
    ready_ns: int
    rss_delta_bytes: int
    pss_delta_bytes: int
    host_delta_bytes: int
    kernel_delta_bytes: int = 0
    #: The core's phases (zigsrc/fork.zig): every VM's KVM object (KVM_CREATE_VM,
    #: serialised by the kernel), then memory, slot, irqchip, vCPUs and state.
    vm_fds_ns: int = 0
    machines_ns: int = 0

    @property
    def rss_bytes_per_vm(self) -> float:
        return self.rss_delta_bytes / self.n if self.n else 0.0

    @property
    def pss_bytes_per_vm(self) -> float:
        return self.pss_delta_bytes / self.n if self.n else 0.0

    @property
    def host_bytes_per_vm(self) -> float:
        """Host memory per VM including KVM's kernel allocations (drop of MemAvailable
        and the per-CPU free lists / n: see memory_usage)."""
        return self.host_delta_bytes / self.n if self.n else 0.0

    @property
    def kernel_bytes_per_vm(self) -> float:
        """The kernel's counters (vmalloc, slab, kernel stacks, page tables) per VM: see memory_usage."""
        return self.kernel_delta_bytes / self.n if self.n else 0.0


class ForkSet(list, Closing):
    """The VMs of one :func:`fork_many` call, plus how long they took and what
    they cost. ``close()`` frees them all in parallel."""

    stats: ForkStats
    threads: int

    @property
    def ready_ns(self) -> int:
        return self.stats.ready_ns

    @property
    def pss_bytes_per_vm(self) -> float:
        return self.stats.pss_bytes_per_vm

    #: Whether close() shows a progress bar (fork_many's ``progress``).
    progress: bool = True

    def close(self) -> None:
        """Frees every VM (in parallel; ~11 ms each on kvm_pvm, so a bar shows
        for large sets unless ``progress`` is False)."""
        vms = list(self)
        try:
            with _progress.bar(len(vms), "closing VMs", "VM", self.progress) as bar, ThreadPoolExecutor(
                max_workers=max(1, min(32, len(vms)))
            ) as ex:
                for _ in ex.map(lambda v: v.close(), vms):
                    bar.update()
        except RuntimeError:  # "can't start new thread" (a host limit): close them here
            for vm in vms:
                vm.close()  # idempotent: those already closed return at once
        self.clear()  # only now: a close Ctrl-C stopped leaves the set to close again


def _distinct_identities(n: int) -> list[int]:
    """``n`` distinct random nonzero 64-bit identities."""
    out: set[int] = set()
    while len(out) < n:
        out.add(secrets.randbits(64) or 1)
    return list(out)


def _fork_native(
    sh: Any, n: int, threads: int, flags: int, bar: Any, wrap: Callable[[Any], Vm], into: list[Vm]
) -> list[int]:
    """One ``kvmlab_fork_many`` call (zigsrc/fork.zig) on a helper thread, so
    this one stays free for the progress bar and for Ctrl-C: an interrupt
    sets the core's stop flag, waits for it to free what it made, and goes on.

    The helper wraps the ``n`` handles into ``into`` (``wrap(handle)`` each),
    where no KeyboardInterrupt lands (a bare handle dropped half-way would
    leak). Ctrl-C may land anywhere here, even inside ``Thread.start()``, where
    nobody knows whether the thread runs: so the helper says ``begun`` before
    it looks at the stop flag, and an interrupted caller sets the flag before
    it looks at ``begun``. Either the helper sees the flag and makes nothing,
    or the caller sees ``begun`` and waits for the helper to finish.

    Returns:
        The wall time of the core's two phases (every VM's KVM object; the
        rest), nanoseconds.
    """
    out = ffi.new("kvmlab_vm *[]", n)
    stop = ffi.new("uint32_t *")
    done = ffi.new("uint64_t *")
    count = ffi.new("uint32_t *")
    phase_ns = ffi.new("uint64_t[2]")
    failure: list[KvmlabError] = []
    # Events, not Thread.join: a join interrupted by Ctrl-C marks a running
    # thread as ended (CPython 3.11), and the wait for the cleanup would not wait.
    begun, finished = threading.Event(), threading.Event()

    def call() -> None:
        begun.set()
        try:
            if stop[0]:
                return  # the caller was interrupted before this thread ran
            rc = lib.kvmlab_fork_many(sh, n, threads, flags, stop, done, out, count, phase_ns)
            if rc:
                failure.append(_ffi.error_for(rc))  # the core's message is this thread's
            else:
                into.extend(wrap(out[i]) for i in range(count[0]))
        finally:
            finished.set()

    try:
        try:
            threading.Thread(target=call, name="kvmlab-fork", daemon=True).start()
        except RuntimeError as e:  # "can't start new thread": a host limit (RLIMIT_NPROC, address space)
            raise KvmlabMemoryError(
                f"fork_many could not start its thread ({e}): raise the host's thread/memory limits (ulimit -u, ulimit -v)",
                check="host_threads",
            ) from None
        while not finished.wait(_POLL_S):
            bar.update(done[0] - bar.n)
    except BaseException:
        stop[0] = 1  # the core stops at its next step and frees every VM it made
        while begun.is_set() and not finished.is_set():
            try:  # a second Ctrl-C here must not leave the core working on the caller's snapshot
                finished.wait()
            except BaseException:  # noqa: BLE001 - the first interrupt goes on below
                pass
        raise
    if failure:
        raise failure[0]
    assert len(into) == n, "the core stops only when asked to"
    return list(phase_ns)


#: How often fork_many's waiting thread looks at the progress (seconds).
_POLL_S = 0.05


def fork_many(
    snap: Snapshot, n: int, *, threads: int | None = None, resettable: bool = False, progress: bool = True,
    identity: bool = False,
) -> ForkSet:
    """Restores ``n`` VMs from one file-backed snapshot with the ``map`` strategy.

    One native call makes them all (zigsrc/fork.zig): first every VM's KVM
    object, while the process has few mappings (KVM_CREATE_VM's cost grows
    with them), then, on ``threads`` native threads, each VM's memory (the
    file, mapped privately), memory slot, irqchip, vCPUs and state; no PIT
    unless the snapshot used one, no dirty log unless ``resettable``.
    Measures the wall time until all are ready (restored, not yet run) and the
    growth of this process's RSS and PSS divided by ``n``. Raises the open-file
    soft limit if needed (each VM holds 1 + vcpus descriptors). Ctrl-C stops
    it: the VMs made so far are freed, then KeyboardInterrupt goes on.

    Args:
        snap: a file-backed snapshot (``Snapshot.load(path)``).
        n: how many VMs (1 .. 100000).
        threads: native restoring threads (1 .. 64; default: one per CPU).
        resettable: make every VM resettable (``vm.reset()``).
        progress: show a progress bar (tqdm.auto) once it takes over a second;
            also for the returned set's ``close()``.
        identity: give every VM a distinct random identity (``vm.identity``)
            its guest reads through ports 0x503/0x504 (docs/guest-protocol.md):
            clones then need not share the snapshot's random state. Without
            it the guest reads 0 and every VM is the snapshot, bit for bit.

    Returns:
        A :class:`ForkSet` (a list of the VMs) with ``stats`` (ready time,
            memory per VM); close it (or use ``with``) to free the VMs.

    Raises:
        ConfigError: ``snap`` is not file-backed, ``n`` or ``threads`` is out
            of range, or the hard open-file limit is too low for ``n`` VMs.
        KvmlabError: a restore failed (every VM made is freed).
    """
    check_type("snap", snap, Snapshot)
    if not snap.file_backed:
        bad_argument(
            "strategy_needs_file", "snap", "fork_many needs a file-backed snapshot: snap.save(path) then Snapshot.load(path)"
        )
    check_int("n", n, 1, MAX_VMS)
    check_type("identity", identity, bool)
    check_type("resettable", resettable, bool)
    identities = _distinct_identities(n) if identity else []
    _progress.check(progress)
    threads = min(MAX_THREADS, os.cpu_count() or 1) if threads is None else check_int("threads", threads, 1, MAX_THREADS)
    raise_fd_limit(n * (1 + snap.vcpus))  # the VM and its vCPUs (the file's fd is the snapshot's, shared)
    flags = _ffi.enum_values("kvmlab_restore_flags")["resettable"] if resettable else 0
    before = memory_usage()
    t0 = time.monotonic_ns()
    out = ForkSet()
    out.progress = progress
    out.threads = threads
    try:
        with _progress.bar(n, "fork_many", "VM", progress) as bar, snap._use() as sh:
            phase_ns = _fork_native(sh, n, threads, flags, bar, lambda h: Vm(h, snap.config, snap.guest), out)
        for vm, ident in zip(out, identities):
            vm.set_identity(ident)
        ready = time.monotonic_ns() - t0
        after = memory_usage()
    except BaseException:
        out.progress = False
        out.close()  # whatever was made: Ctrl-C (or a failure) may land after the core returned
        raise
    out.stats = ForkStats(
        n,
        ready,
        after["rss_bytes"] - before["rss_bytes"],
        after["pss_bytes"] - before["pss_bytes"],
        before["available_bytes"] - after["available_bytes"],
        after["kernel_bytes"] - before["kernel_bytes"],
        *phase_ns,
    )
    return out
