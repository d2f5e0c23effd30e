"""``kvmlab bench fork``: fork density. For each n, ``reps`` times
``kvmlab.fork_many(snap, n)`` of the service guest at its checkpoint: wall
time until all n are ready, this process's RSS/PSS growth and the host's
MemAvailable drop per VM; then (``call``) every VM answers one request and
the memory is measured again; then the VMs are closed (timed)."""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError
from ..fork import MAX_THREADS, MAX_VMS
from ._native import kvm_memslots
from .harness import (FLAG, FORK_ERRORS, MEMORY_MIB, REPS, TEXT, Arg, Progress, check_args, make_service_snapshot, measure,
                      part_errors, part_progress)
from .results import Part, Results

if TYPE_CHECKING:
    from ..snapshot import Snapshot

__all__ = ["ZEROBOOT_REFERENCE", "FORK_KEYS", "FORK_METRICS", "fork_part", "fork_limits", "bench_fork"]

#: zeroboot's published figure (bare-metal KVM, 256 MiB guest): 1,000 forks in 815 ms, ~265 KB each.
ZEROBOOT_REFERENCE = {"n": 1000, "ready_ms": 815, "kb_per_vm": 265}
FORK_KEYS = ["vms"]  # not "n": that is a Stats field
FORK_METRICS = ["ready_ns", "ready_per_vm_ns", "vm_fds_ns", "machines_ns", "rss_per_vm_bytes", "pss_per_vm_bytes", "host_per_vm_bytes",
                "kernel_per_vm_bytes",
                "call_per_vm_ns", "called_rss_per_vm_bytes", "called_pss_per_vm_bytes", "called_host_per_vm_bytes",
                "close_ns", "process_mappings"]


def fork_limits() -> dict[str, Any]:
    """The host limits that bound how many VMs one process can hold."""
    from ..doctor import host_limits

    return {**host_limits(), "kvm_memslots_per_vm": kvm_memslots()}


def _host_limit(e: Exception) -> bool:
    """True for what a host limit raises (no memory, a KVM or system call
    refused, too few descriptors); a bad argument or a wrong answer is not one."""
    if isinstance(e, ConfigError):
        return e.check == "fd_limit"
    return isinstance(e, (OSError, MemoryError))  # KvmError and KvmlabMemoryError are these


def _one_set(snap: Snapshot, n: int, threads: int | None, call: bool) -> dict[str, Any]:
    from .. import fork_many
    from ..fork import memory_usage

    gc.collect()
    # KVM_CREATE_VM walks every mapping of the process (mmu_notifier_register
    # takes all their locks): the count is part of the result.
    with open("/proc/self/maps", "rb") as f:
        mappings = sum(1 for _ in f)
    vms = fork_many(snap, n, threads=threads, progress=False)  # no bar inside the timed loop
    rec: dict[str, Any] = {"process_mappings": mappings}
    try:
        st = vms.stats
        rec.update(ready_ns=st.ready_ns, ready_per_vm_ns=st.ready_ns / n, vm_fds_ns=st.vm_fds_ns, machines_ns=st.machines_ns,
                   rss_per_vm_bytes=st.rss_bytes_per_vm,
                   pss_per_vm_bytes=st.pss_bytes_per_vm, host_per_vm_bytes=st.host_bytes_per_vm,
                   kernel_per_vm_bytes=st.kernel_bytes_per_vm)
        if call:
            before = memory_usage()
            t0 = time.perf_counter_ns()
            for vm in vms:
                if vm.call(b"ping") != b"ping":
                    raise RuntimeError("a forked VM answered wrongly")
            rec["call_per_vm_ns"] = (time.perf_counter_ns() - t0) / n
            after = memory_usage()
            rec["called_rss_per_vm_bytes"] = (after["rss_bytes"] - before["rss_bytes"]) / n + st.rss_bytes_per_vm
            rec["called_pss_per_vm_bytes"] = (after["pss_bytes"] - before["pss_bytes"]) / n + st.pss_bytes_per_vm
            rec["called_host_per_vm_bytes"] = ((before["available_bytes"] - after["available_bytes"]) / n
                                               + st.host_bytes_per_vm)
    finally:
        t0 = time.perf_counter_ns()
        vms.close()
        rec["close_ns"] = time.perf_counter_ns() - t0
    return rec


def fork_part(ns: Sequence[int] = (100, 1000), *, memory_mib: int = 256, reps: int = 3, threads: int | None = None,
              call: bool = True, progress: Progress | None = None, tmp_dir: Path | None = None) -> Part:
    """The fork-density measurements (see the module doc) as a Part; a host
    limit that stops an n is a result (``notes["errors"]``), not a failure."""
    from .. import Snapshot

    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    with part_progress(progress, len(ns) * reps) as progress:
        with tempfile.TemporaryDirectory(prefix="kvmlab-bench-fork-", dir=tmp_dir) as tmp:
            progress.describe(f"fork: snapshot service {memory_mib} MiB")
            with Snapshot.load(make_service_snapshot(memory_mib, Path(tmp))) as snap:
                present = snap.present_pages
                for n in ns:
                    for rep in range(reps):
                        progress.describe(f"fork n={n}")
                        try:
                            rec = _one_set(snap, n, threads, call)
                        except Exception as e:
                            if not _host_limit(e):
                                raise
                            errors[str(n)] = f"{type(e).__name__}: {e}"  # a host limit is a result here
                            break
                        records.append({"vms": n, "rep": rep, **rec})
                        progress.update(1)
    return Part("fork", FORK_KEYS, FORK_METRICS, records,
                config={"ns": list(ns), "memory_mib": memory_mib, "reps": reps, "guest": "service", "call": call,
                        "threads": threads or min(MAX_THREADS, os.cpu_count() or 1), "present_pages": present},
                notes={"errors": errors, "reference": ZEROBOOT_REFERENCE, "limits": fork_limits()})


#: The VM counts of a fork run.
VM_COUNTS = Arg("int", 1, MAX_VMS, many=True)


def bench_fork(ns: Sequence[int] = (100, 1000), *, memory_mib: int = 256, reps: int = 3, threads: int | None = None,
               call: bool = True, quiet: bool = True, command: str | None = None) -> Results:
    """``kvmlab bench fork`` as a function; an n a host limit stopped is in ``errors``."""
    check_args("fork", ns=(ns, VM_COUNTS), memory_mib=(memory_mib, MEMORY_MIB), reps=(reps, REPS),
               threads=(threads, Arg("int", 1, MAX_THREADS, optional=True)), call=(call, FLAG), quiet=(quiet, FLAG),
               command=(command, TEXT))
    res = measure("fork", len(ns) * reps, quiet, command, lambda progress: {"fork": fork_part(
        ns, memory_mib=memory_mib, reps=reps, threads=threads, call=call, progress=progress)})
    res.errors.update(part_errors(res.parts["fork"], FORK_ERRORS))
    return res
