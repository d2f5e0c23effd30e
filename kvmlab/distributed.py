"""Campaigns: run many inputs from one snapshot on Dask (one machine or a cluster).

    >>> from kvmlab import distributed
    >>> snap = distributed.parser_snapshot()              # the built-in parser, waiting for input
    >>> df = distributed.run_inputs(snap, [b"\\x01\\x00", b"\\x7f\\x40" + bytes(64)])
    >>> df[["input_index", "reason", "exit_code"]]          # exit 1, crash

Every input runs from the snapshot's exact state: a worker restores the
snapshot once into a resettable VM and runs a batch of inputs in the native
reset loop (write input, run, record, reset to the snapshot's dirty pages).
The input protocol (docs/guest-protocol.md): a u32 little-endian length at
``input_gpa``, then the bytes.

Scheduling, transport, retries and the dashboard are Dask distributed's: a
``LocalCluster`` by default, ``Client("tcp://...")`` for a cluster. The
snapshot travels once per worker under its content hash (a scattered,
broadcast Dask key); each worker process keeps (hash -> loaded snapshot and its
idle VMs) across tasks. A batch comes back as numpy records (plus its few
text cells and crash registers); the client builds the DataFrame once.

Faults: a worker that dies takes only its running batches with it (and those
it finished that the client had not yet collected: at most
``GATHER_INTERVAL_S`` of them); Dask runs them again elsewhere, and inputs are pure functions of the snapshot, so the
result is the same (``run_ns`` and ``worker`` aside). A hang is a ``timeout``
row. A host failure in a batch makes its rows ``error`` rows with the message.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import threading
import time
import uuid
import weakref
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from . import _progress
from ._campaign_rows import (_REASON_OF_RUN, COLUMNS, CONSOLE_BYTES, CRASH_REGISTERS, RESULT_REASONS, _frame, _records,
                             _Rows, _rows)
from .config import VmConfig, bad_argument, check_int, timeout_ns
from .errors import ConfigError, GuestCrashError, GuestError, KvmlabError
from .guests import INPUT_GPA, PARSER_WAIT_TAG
from .snapshot import Snapshot
from .vm import Vm

__all__ = [
    "run_inputs",
    "map_vms",
    "local_cluster",
    "parser_snapshot",
    "snapshot_key",
    "local_run",
    "replay",
    "INPUT_GPA",
    "RESULT_REASONS",
    "CRASH_REGISTERS",
    "COLUMNS",
]

#: Limits: one input, inputs in one batch, snapshots resident per worker process.
MAX_INPUT_BYTES = 1 << 20
MAX_BATCH_SIZE = 1 << 16
RESIDENT_LIMIT = 4
#: Seconds between the client's collections of finished batches. Each
#: collection is a round of messages through the scheduler and the workers:
#: CPU that the VMs need when the client shares their machine (collecting
#: each batch as it finished cost 2 workers on 2 CPUs ~5% of their inputs/s
#: here). A worker lost in between costs its uncollected batches, which Dask
#: runs again.
GATHER_INTERVAL_S = 0.5

# -- the snapshot and the inputs on the client ------------------------------------------


def parser_snapshot(memory_mib: int = 64, input_gpa: int = INPUT_GPA) -> Snapshot:
    """The built-in ``parser`` guest booted and snapshotted at its input checkpoint.

    Args:
        memory_mib: guest memory.
        input_gpa: where the parser reads its input (passed as its argument).

    Returns:
        A :class:`~kvmlab.Snapshot` in memory, ready for :func:`run_inputs`.
    """
    with Vm.boot("parser", VmConfig(memory_mib=memory_mib), args={"input_gpa": input_gpa}) as vm:
        r = vm.run(timeout_s=10)
        if r.reason != "checkpoint" or r.checkpoint_tag != PARSER_WAIT_TAG:
            raise GuestError(f"the parser guest did not reach its input checkpoint ({r.reason}): {r.console!r}", check="parser_checkpoint")
        return vm.snapshot()


def _encoded(snap: Snapshot | str | os.PathLike[str]) -> tuple[bytes, int]:
    """The snapshot's encoding (what travels to the workers) and its memory size."""
    if isinstance(snap, Snapshot):
        return snap.to_bytes(), snap.memory_bytes
    if isinstance(snap, (str, os.PathLike)):
        with Snapshot.load(snap) as loaded:  # checked here, so a bad file fails on the client
            return loaded.to_bytes(), loaded.memory_bytes
    bad_argument("argument_type", "snap", f"snap must be a Snapshot or a snapshot file path, got {type(snap).__name__}")


def snapshot_key(data: bytes) -> str:
    """The content hash naming an encoded snapshot on the workers."""
    return "kvmlab-snapshot-" + hashlib.sha256(data).hexdigest()


def _check_inputs(inputs: Iterable[Any], max_input_bytes: int) -> tuple[list[bytes], np.ndarray]:
    """The inputs as bytes, and where each ends when they are put back to back
    (count + 1 uint64 offsets from 0). Vectorised: this runs before the first
    batch can start."""
    if isinstance(inputs, (bytes, bytearray, memoryview, str)):
        bad_argument("argument_type", "inputs", "inputs must be a sequence of bytes-like inputs, not one bytes or str")
    items = list(inputs)
    if not all(type(x) is bytes for x in items):
        for i, x in enumerate(items):
            if not isinstance(x, (bytes, bytearray, memoryview)):
                bad_argument("argument_type", "inputs", f"input {i} is a {type(x).__name__}; every input must be "
                                                        "bytes-like")
        items = [bytes(x) for x in items]
    sizes = np.fromiter(map(len, items), dtype=np.uint64, count=len(items))
    over = np.flatnonzero(sizes > max_input_bytes)
    if len(over):
        i = int(over[0])
        bad_argument("argument_range", "inputs", f"input {i} is {len(items[i])} bytes, over "
                                                 f"max_input_bytes={max_input_bytes}")
    ends = np.zeros(len(items) + 1, dtype=np.uint64)
    np.cumsum(sizes, out=ends[1:])
    return items, ends


def _batches(inputs: tuple[list[bytes], np.ndarray], batch_size: int) -> Iterator[tuple[int, bytes, np.ndarray]]:
    """``(first, blob, offsets)`` per batch of checked inputs (:func:`_check_inputs`):
    its first input's index, its inputs back to back and their count + 1
    offsets, as the native loop takes them."""
    items, ends = inputs
    for first in range(0, len(items), batch_size):
        stop = min(first + batch_size, len(items))
        yield first, b"".join(items[first:stop]), ends[first:stop + 1] - ends[first]


def _check_limits(memory_bytes: int, input_gpa: int, batch_size: int, max_input_bytes: int,
                  run_timeout_s: float) -> int:
    """Checks the campaign arguments; returns the run deadline in ns."""
    check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    check_int("max_input_bytes", max_input_bytes, 0, MAX_INPUT_BYTES)
    # The whole input (length word + max_input_bytes) inside guest memory.
    check_int("input_gpa", input_gpa, 0, max(memory_bytes - 4 - max_input_bytes, -1))
    deadline_ns = timeout_ns(run_timeout_s, "run_timeout_s")
    if deadline_ns == 0:
        bad_argument("argument_range", "run_timeout_s", "run_timeout_s must be a number of seconds: a campaign "
                                                        "without a deadline would wait forever on a hang")
    return deadline_ns


# -- the worker side -------------------------------------------------------------------


class _Resident:
    """A snapshot loaded in a worker process, and its idle resettable VMs."""

    def __init__(self, snap: Snapshot, owned: bool) -> None:
        self.snap = snap
        self.owned = owned
        self.idle: list[Vm] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def vm(self) -> Iterator[Vm]:
        """A VM in the snapshot's state, back to the idle list if it was left
        reset; after a failure its state is unknown, so it is closed instead."""
        with self.lock:
            vm = self.idle.pop() if self.idle else None
        if vm is None:
            vm = Vm.restore(self.snap, resettable=True)
        ok = False
        try:
            yield vm
            ok = True
        finally:
            if ok and not vm.closed:
                with self.lock:
                    self.idle.append(vm)
            else:
                vm.close()

    def close(self) -> None:
        with self.lock:
            vms, self.idle = self.idle, []
        for vm in vms:
            vm.close()
        if self.owned:
            self.snap.close()


_RESIDENT: collections.OrderedDict[str, _Resident] = collections.OrderedDict()
_RESIDENT_LOCK = threading.Lock()


def _resident(key: str, data: bytes) -> _Resident:
    """This process's loaded copy of the snapshot ``key`` (loaded on first use)."""
    with _RESIDENT_LOCK:
        r = _RESIDENT.get(key)
        if r is None:
            r = _RESIDENT[key] = _Resident(Snapshot.from_bytes(data), owned=True)
            while len(_RESIDENT) > RESIDENT_LIMIT:
                _RESIDENT.popitem(last=False)[1].close()
        _RESIDENT.move_to_end(key)
        return r


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"local-{os.getpid()}"


def _run_python(vm: Vm, data: bytes, input_gpa: int, timeout_s: float) -> dict[str, Any]:
    """One input through the Python path (write, ``run``): the row's fields,
    with the crash message and registers the native loop does not keep."""
    vm.write_memory(input_gpa, len(data).to_bytes(4, "little") + data)
    try:
        r = vm.run(timeout_s)
    except GuestCrashError as e:
        regs = vm.registers(0)
        return {"reason": "crash", "message": str(e), **{f"crash_{k}": regs[k] for k in CRASH_REGISTERS}}
    reason = _REASON_OF_RUN.get(r.reason, "error")
    return {"reason": reason, "exit_code": r.exit_code if reason == "exit" else None,
            "checkpoint_tag": r.checkpoint_tag if reason == "checkpoint" else None, "console": r.console,
            "run_ns": r.elapsed_ns}


def replay(snap: Snapshot, data: bytes, *, input_gpa: int = INPUT_GPA, run_timeout_s: float = 1.0) -> dict[str, Any]:
    """Runs one input on a fresh VM restored from ``snap``, in this process: a finding reproduced.

    No Dask and no reset loop: a plain ``Vm.restore``, the input written by
    the input protocol, ``run()``.

    Args:
        snap: the campaign's snapshot.
        data: the input.
        input_gpa: where the input goes in guest memory.
        run_timeout_s: a run that has not stopped by then is a ``timeout``.

    Returns:
        The row's fields: ``reason``, and ``exit_code``/``checkpoint_tag``/
            ``console``/``run_ns``, or for a crash ``message`` and every
            ``crash_<register>``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        bad_argument("argument_type", "data", f"data must be bytes-like, got {type(data).__name__}")
    with Vm.restore(snap) as vm:
        return _run_python(vm, bytes(data), input_gpa, run_timeout_s)


def _batch(res: _Resident, first: int, blob: bytes, offsets: np.ndarray, input_gpa: int,
           deadline_ns: int) -> _Rows:
    """One batch: the native loop over the inputs on one VM, its rows."""
    n = len(offsets) - 1
    worker = _worker_name()
    try:
        with res.vm() as vm:
            out, console, done = vm._reset_loop_var(blob, offsets, input_gpa, deadline_ns, CONSOLE_BYTES)
            loop = _records(out, done)
            # The loop keeps no crash message or registers: run each crash
            # again through the Python path (crashes are rare), then reset.
            crashes = {}
            for i in np.flatnonzero(loop["crashed"]):
                row = _run_python(vm, blob[int(offsets[i]):int(offsets[i + 1])], input_gpa, deadline_ns / 1e9)
                vm.reset()
                crashes[int(i)] = row if row["reason"] == "crash" else {
                    "message": f"the crash did not repeat (the replay ended with {row['reason']}): "
                               "the guest is not deterministic"}
    except KvmlabError as e:
        # A host failure (or a snapshot this host cannot run): this batch's
        # rows say so; its VM is not reused; other batches are unaffected.
        return _rows(first, n, worker, message=f"{type(e).__name__}: {e}")
    return _rows(first, n, worker, loop, console, crashes)


def _run_batch(first: int, blob: bytes, offsets: np.ndarray, *, data: bytes, snap_key: str, input_gpa: int,
               deadline_ns: int) -> _Rows:
    """The Dask task of one batch, on a worker."""
    return _batch(_resident(snap_key, data), first, blob, offsets, input_gpa, deadline_ns)


def _map_chunk(data: bytes, key: str, fn: Callable[[Vm, Any], Any], items: list[Any]) -> list[Any]:
    """The Dask task of :func:`map_vms`: ``fn(vm, item)`` for each item, each on
    a VM in the snapshot's state."""
    out = []
    with _resident(key, data).vm() as vm:
        for item in items:
            try:
                out.append(fn(vm, item))
            finally:
                vm.reset()
    return out


# -- the client side -------------------------------------------------------------------


def _dask() -> ModuleType:
    try:
        import distributed
    except ImportError:
        raise ConfigError('kvmlab.distributed needs Dask: pip install "kvmlab[dist]"', check="missing_extra") from None
    return distributed


def _pin_worker(cpus: list[int], worker: Any) -> None:
    """Pins this worker process (every thread, and so the threads it starts
    later) to one CPU of ``cpus``, chosen by the worker's index in its
    LocalCluster."""
    cpu = cpus[int(worker.name) % len(cpus)]
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), {cpu})


@functools.cache
def _pin_plugin() -> type:
    """A Dask worker plugin running :func:`_pin_worker` as each worker starts
    (a worker its nanny restarts too). Made on first use: Dask is optional."""

    class PinWorker(_dask().WorkerPlugin):  # type: ignore[misc]
        name = "kvmlab-pin-worker"

        def __init__(self, cpus: list[int]) -> None:
            self.cpus = cpus

        def setup(self, worker: Any) -> None:
            _pin_worker(self.cpus, worker)

    return PinWorker


def local_cluster(n_workers: int | None = None, *, pin: bool | None = None, profile: bool = False,
                  dashboard: bool = True) -> Any:
    """A Dask LocalCluster made for campaigns on this machine: a Client that owns it.

        >>> with distributed.local_cluster() as client:   # or client = ...; client.close()
        ...     df = distributed.run_inputs(snap, inputs, client=client)

    Worker processes with one thread each (a worker's work is its VM's native
    loop), as :func:`run_inputs` starts when it is given no client. The
    settings below are a LocalCluster's own; they are what
    ``kvmlab bench campaign`` measures.

    Args:
        n_workers: worker processes; None: one per CPU this process may use.
        pin: pin worker i to the i-th of those CPUs (mod their count), so
            its VM loop is not moved between CPUs (a moved vCPU thread costs
            KVM a reload) and two busy workers never share one. None (the
            default): pin when the workers fill the CPUs; with a CPU to
            spare the kernel is left to move a worker off the CPU this
            process (client, scheduler) is using. (A Dask worker plugin pins
            each worker as it starts: it imports kvmlab there.)
        profile: Dask's statistical profiler in each worker (the dashboard's
            Profile page): it samples the worker's threads every 10 ms, CPU
            the VMs need when the workers have every CPU; off by default.
        dashboard: the dashboard on a free port (``client.dashboard_link``).

    Returns:
        A ``distributed.Client`` (the cluster is ``client.cluster``); closing
        it (``close()``, or leaving its ``with`` block) closes the cluster.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if n_workers is None:
        n_workers = len(cpus)
    check_int("n_workers", n_workers, 1, 4096)
    if pin is None:
        pin = n_workers >= len(cpus)
    d = _dask()
    import dask

    # The nannies take the configuration in force as they are made, for each
    # worker they start (a restarted one too).
    with dask.config.set({"distributed.worker.profile.enabled": bool(profile)}):
        client = d.Client(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0" if dashboard else None)
    try:
        client.wait_for_workers(n_workers)
        if pin:
            client.register_plugin(_pin_plugin()(cpus))
    except BaseException:
        client.close()
        raise
    return client


@contextlib.contextmanager
def _client(client: Any) -> Iterator[Any]:
    """``client``, or a :func:`local_cluster` for the call."""
    if client is not None:
        yield client
        return
    with local_cluster() as c:
        yield c


#: Per client: content hash -> the future of the snapshot's bytes on its workers.
_SHIPPED: weakref.WeakKeyDictionary[Any, collections.OrderedDict[str, Any]] = weakref.WeakKeyDictionary()
_SHIPPED_LOCK = threading.Lock()


def _ship(client: Any, data: bytes) -> tuple[str, Any]:
    """Puts the encoded snapshot on every worker once per client (a broadcast
    scatter, kept while the client lives, so later calls do not send it again;
    a worker that joins later gets it from a peer)."""
    key = snapshot_key(data)
    with _SHIPPED_LOCK:
        held = _SHIPPED.setdefault(client, collections.OrderedDict())
        fut = held.get(key)
        if fut is None or fut.status != "finished":
            # A fresh Dask key each time: re-scattering a key Dask is still
            # forgetting can lose the data.
            name = f"{key}-{uuid.uuid4().hex[:8]}"
            fut = held[key] = client.scatter({name: data}, broadcast=True, hash=False)[name]
            while len(held) > RESIDENT_LIMIT:
                held.popitem(last=False)[1].release()
        held.move_to_end(key)
    return key, fut


def run_inputs(
    snap: Snapshot | str | os.PathLike[str],
    inputs: Iterable[bytes],
    *,
    client: Any = None,
    input_gpa: int = INPUT_GPA,
    batch_size: int = 1024,
    run_timeout_s: float = 1.0,
    max_input_bytes: int = 4096,
    progress: bool = True,
) -> pd.DataFrame:
    """Runs every input from ``snap``'s state on a Dask cluster, one row per input.

    Each worker loads the snapshot once and runs batches of inputs in the
    native reset loop (input protocol: a u32 LE length at ``input_gpa``, then
    the bytes). A worker that dies mid-campaign costs only its batches, which
    Dask runs again elsewhere: the result still has every input once, with the
    same values (``run_ns``, ``dirty_pages`` and ``worker`` aside).

    Args:
        snap: a :class:`~kvmlab.Snapshot` (in memory or file-backed) or a
            snapshot file path, of a guest waiting for input.
        inputs: bytes-like inputs, each at most ``max_input_bytes``.
        client: a ``distributed.Client``; None starts a :func:`local_cluster`
            (worker processes, one per CPU, one thread each) for this call.
        input_gpa: where the input goes in guest memory.
        batch_size: inputs per Dask task (1 .. 65536).
        run_timeout_s: a run that has not stopped by then is a ``timeout``.
        max_input_bytes: the longest input allowed (at most 1 MiB).
        progress: a tqdm bar once the call has run for a second.

    Returns:
        A pandas DataFrame in input order with the columns of :data:`COLUMNS`:
            ``reason`` is ``exit`` (``exit_code`` set), ``checkpoint``
            (``checkpoint_tag`` set), ``crash`` (``message`` and the
            ``crash_<register>`` columns, from running the input again on the
            same worker), ``timeout`` (no stop in time, or a halt) or
            ``error`` (a host failure in the batch: ``message`` names it);
            ``console`` holds the first 256 bytes of the run's output.

    Raises:
        ConfigError: a bad argument (``.argument`` names it), or Dask is not
            installed (``pip install "kvmlab[dist]"``).
        SnapshotError: ``snap`` is a path that is not a valid snapshot file.
    """
    data, memory_bytes = _encoded(snap)
    deadline_ns = _check_limits(memory_bytes, input_gpa, batch_size, max_input_bytes, run_timeout_s)
    _progress.check(progress)
    checked = _check_inputs(inputs, max_input_bytes)
    count = len(checked[0])
    if not count:
        return _frame([])
    with _client(client) as c, _progress.bar(count, "inputs", "input", progress) as bar:
        key, snap_fut = _ship(c, data)
        run = uuid.uuid4().hex[:12]
        futures: dict[Any, int] = {}
        rows: dict[int, _Rows] = {}
        try:
            firsts, blobs, offsets = zip(*_batches(checked, batch_size))
            # One message to the scheduler for all the batches (a submit per
            # batch costs the client and the scheduler a round each).
            futures.update(zip(c.map(_run_batch, firsts, blobs, offsets, key=[f"kvmlab-batch-{run}-{first}"
                                                                               for first in firsts],
                                     pure=False, data=snap_fut, snap_key=key, input_gpa=input_gpa,
                                     deadline_ns=deadline_ns), firsts))
            sizes = {first: len(o) - 1 for first, o in zip(firsts, offsets)}
            finished: list[Any] = []  # not yet collected
            gathered_s = time.monotonic()
            for f in _dask().as_completed(list(futures)):
                bar.update(sizes[futures[f]])
                finished.append(f)
                if len(rows) + len(finished) == len(futures) or time.monotonic() - gathered_s >= GATHER_INTERVAL_S:
                    for g, batch in zip(finished, c.gather(finished)):  # one round trip
                        rows[futures[g]] = batch
                        g.release()
                    finished.clear()
                    gathered_s = time.monotonic()
        except BaseException:
            # Ctrl-C or a failed batch: the cluster stops working on this call.
            c.cancel(list(futures))
            raise
    df = _frame([rows[k] for k in sorted(rows)])
    # Exactly once, in order: Dask's retries after a lost worker must not duplicate or drop.
    assert np.array_equal(df["input_index"].to_numpy(), np.arange(count)), "every input exactly once"
    return df


def map_vms(
    snap: Snapshot | str | os.PathLike[str],
    fn: Callable[[Vm, Any], Any],
    items: Iterable[Any],
    *,
    client: Any = None,
    batch_size: int = 64,
) -> list[Any]:
    """``[fn(vm, item) for item in items]`` on the cluster, each call on a VM in ``snap``'s state.

    The flexible Python path: ``fn`` may read and write guest memory, run the
    guest, call it... Each worker keeps a resettable VM restored from the
    snapshot and resets it after every call.

    Args:
        snap: a :class:`~kvmlab.Snapshot` or a snapshot file path.
        fn: ``fn(vm, item)``; Dask pickles it (and its results).
        items: the items, in order.
        client: a ``distributed.Client``; None starts a :func:`local_cluster` for this call.
        batch_size: items per Dask task.

    Returns:
        The results of ``fn``, in the order of ``items``.

    Raises:
        ConfigError: a bad argument, or Dask is not installed.
        Exception: the first exception ``fn`` raised (the other tasks are cancelled).
    """
    if not callable(fn):
        bad_argument("argument_type", "fn", f"fn must be callable as fn(vm, item), got {type(fn).__name__}")
    check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    data, _memory_bytes = _encoded(snap)
    items = list(items)
    if not items:
        return []
    with _client(client) as c:
        key, snap_fut = _ship(c, data)
        futures = []
        try:
            futures += [c.submit(_map_chunk, snap_fut, key, fn, items[i:i + batch_size], pure=False)
                        for i in range(0, len(items), batch_size)]
            return [x for chunk in c.gather(futures) for x in chunk]
        except BaseException:
            c.cancel(futures)  # Ctrl-C or an exception from fn: stop the rest
            raise


def local_run(snap: Snapshot, inputs: Iterable[bytes], *, input_gpa: int = INPUT_GPA,
              run_timeout_s: float = 1.0, max_input_bytes: int = 4096, batch_size: int = 1024) -> pd.DataFrame:
    """The rows of :func:`run_inputs` from one VM in this process, without Dask.

    The in-process baseline of a campaign (``worker`` is ``local-<pid>``);
    the arguments are those of :func:`run_inputs`.
    """
    deadline_ns = _check_limits(snap.memory_bytes, input_gpa, batch_size, max_input_bytes, run_timeout_s)
    checked = _check_inputs(inputs, max_input_bytes)
    res = _Resident(snap, owned=False)
    try:
        batches = [_batch(res, *batch, input_gpa, deadline_ns) for batch in _batches(checked, batch_size)]
    finally:
        res.close()
    return _frame(batches)
