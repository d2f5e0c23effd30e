"""Virtual machines: boot a guest, run it, look at its memory and registers.

>>> with Vm.boot("counter", VmConfig(memory_mib=64), args={"steps": 20, "checkpoint_at": 10}) as vm:
...     r = vm.run()          # RunResult(reason="checkpoint", checkpoint_tag=10, ...)
...     r = vm.run()          # RunResult(reason="exit", exit_code=0, ...)

Structure: :class:`_VmHandle` owns a native ``kvmlab_vm`` handle and implements
everything that works on any VM (run, memory, registers, close); :class:`Vm`
adds :meth:`Vm.boot`. Other ways to obtain a handle (restore from a snapshot,
pools) subclass :class:`_VmHandle` the same way.

Threading: one lock per VM. ``run()`` holds it for the whole native call (cffi
releases the GIL meanwhile), and every multi-step operation holds it for all
its steps (``call()``: write, run, read; ``run_until_exit()``: every run), so
memory access from another thread waits until they return, and concurrent
callers each get their own answer. ``interrupt()`` and ``close()`` do not
wait for the lock first: they stop a run in progress at once.
"""

from __future__ import annotations

import array
import codecs
import collections
import itertools
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from . import _ffi
from .config import VmConfig, bad_argument, check_buffer, check_choice, check_int, check_type
from .config import timeout_ns as _timeout_ns  # seconds (None: no deadline) -> the core's timeout_ns
from .errors import BoundsError, ClosedError, ConfigError, GuestError, GuestTimeoutError, InternalError
from .guests import Guest, format_args
from .guests import names as guest_names

__all__ = ["Vm", "RunResult", "ResetTiming", "LoopResult", "REASONS"]

ffi = _ffi.ffi
lib = _ffi.lib

#: ``kvmlab_run_result.reason`` -> name (``kvmlab_run_reason``, read from the header).
REASONS = _ffi.enum_names("kvmlab_run_reason")

#: The service protocol (docs/guest-protocol.md).
SERVICE_GPA = 0x4000
SERVICE_TAG = 0x5E5E0001
SERVICE_MAX_BYTES = 4096
SERVICE_OPS = {"echo": 1, "crc32c": 2, "reverse": 3}

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")

#: Orders interrupt() (which runs without the VM's lock, so that it can stop a
#: run() holding it) before close() frees the handle. One for all VMs: both
#: hold it only for an instant, and a per-VM lock would cost every restore.
_INTERRUPT_LOCK = threading.Lock()

GuestSpec = Union[str, "os.PathLike[str]", Guest, bytes, bytearray]


@dataclass(frozen=True)
class ResetTiming:
    """One reset: pages put back and integer nanoseconds per phase."""

    dirty_pages: int
    log_ns: int
    memory_ns: int
    vcpu_ns: int
    devices_ns: int
    total_ns: int

    def _repr_html_(self) -> str:
        from . import _html
        from .plot import RESET_PHASES, RESET_PHASE_COLORS

        values = {p: getattr(self, f"{p}_ns") for p in RESET_PHASES}
        note = f", {self.dirty_pages} dirty pages put back"
        return _html.phases("ResetTiming", values, RESET_PHASE_COLORS, self.total_ns, note, "kvmlab-reset-timing")


@dataclass(frozen=True)
class LoopResult:
    """One iteration of :meth:`reset_loop`."""

    reason: str
    exit_code: int
    checkpoint_tag: int
    crashed: bool
    run_ns: int
    reset_ns: int
    dirty_pages: int
    console_bytes: int


#: Reset memory modes, name -> ``kvmlab_reset_mode`` (read from the header).
RESET_MODES = _ffi.enum_values("kvmlab_reset_mode")


@dataclass(frozen=True)
class RunResult:
    """Why and how a :meth:`Vm.run` call ended.

    ``reason`` is ``"exit"`` (every vCPU wrote the exit port; ``exit_code`` is
    vCPU 0's code), ``"checkpoint"`` (every vCPU is at exit or checkpoint;
    ``checkpoint_tag`` is the first checkpointing vCPU's tag: the next
    ``run()`` resumes), ``"halt"`` (the vCPUs executed ``hlt``) or
    ``"timeout"`` (the deadline passed; the next ``run()`` resumes).
    ``console`` is the guest's output since the previous ``run()`` (UTF-8,
    undecodable bytes replaced); ``console_dropped`` counts bytes beyond the
    1 MiB kept per run. ``elapsed_ns`` is the run's wall time in nanoseconds.
    """

    reason: str
    exit_code: int
    checkpoint_tag: int
    console: str
    console_dropped: int
    elapsed_ns: int

    @property
    def lines(self) -> list[str]:
        """``console`` split into lines."""
        return self.console.splitlines()

    def __repr__(self) -> str:
        # The console stays out (it can be 1 MiB): its size only.
        from .units import fmt_time

        what = {"exit": f", exit_code={self.exit_code}", "checkpoint": f", checkpoint_tag={self.checkpoint_tag:#x}"}
        lines = self.console.count("\n") + (not self.console.endswith("\n") if self.console else 0)
        dropped = f", {self.console_dropped} dropped" if self.console_dropped else ""
        return (
            f"RunResult(reason={self.reason!r}{what.get(self.reason, '')}, elapsed={fmt_time(self.elapsed_ns)}, "
            f"console=<{lines} lines, {len(self.console)} chars{dropped}>)"
        )

    def _repr_html_(self, last_lines: int = 12) -> str:
        """The result, with the console folded to its last ``last_lines`` lines."""
        from . import _html
        from .units import fmt_time

        rows = [("reason", self.reason), ("elapsed", fmt_time(self.elapsed_ns))]
        if self.reason == "exit":
            rows.append(("exit code", self.exit_code))
        if self.reason == "checkpoint":
            rows.append(("checkpoint tag", f"{self.checkpoint_tag:#x}"))
        if self.console_dropped:
            rows.append(("console dropped", f"{self.console_dropped} bytes beyond the 1 MiB kept"))
        lines = self.lines
        folded = len(lines) - last_lines
        note = f"console: {len(lines)} lines" + (f", the last {last_lines} shown ({folded} folded)" if folded > 0 else "")
        body = _html.table(rows) + f"<div>{_html.escape(note)}</div>" + (_html.pre("\n".join(lines[-last_lines:])) if lines else "")
        return _html.box("RunResult", body, "kvmlab-run-result")


def _check_range(gpa: int, n: int, memory_bytes: int) -> None:
    for what, v in (("gpa", gpa), ("length", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            bad_argument("argument_type", what, f"{what} must be an int, got {v!r}")
    if gpa < 0 or n < 0 or gpa + n > memory_bytes:
        raise BoundsError(
            f"guest range 0x{gpa:x}+{n} is outside guest memory (0x0..0x{memory_bytes:x}); "
            f"addresses are guest-physical, 0 <= gpa and gpa + length <= {memory_bytes}"
        )


def _new_handle(config: VmConfig) -> Any:
    """Creates an empty native VM shell for ``config`` (a ``kvmlab_vm *``)."""
    c = ffi.new("kvmlab_vm_config *", {"memory_bytes": config.memory_bytes, "vcpus": config.vcpus})
    out = ffi.new("kvmlab_vm **")
    _ffi.check(lib.kvmlab_vm_new(c, out))
    if out[0] == ffi.NULL:
        raise InternalError("kvmlab_vm_new succeeded but returned no VM")
    return out[0]


def restore_timing_dict(times: Any) -> dict[str, Any]:
    """A ``kvmlab_restore_times`` as the ``restore_timing`` dict: integer
    nanoseconds per phase, ``mapped``, ``hit``, ``seq`` and ``strategy`` by
    name (``kvmlab_strategy``: copy, map, reuse or prepared)."""
    d: dict[str, Any] = _ffi.as_dict(times, "kvmlab_restore_times")
    del d["reserved"]
    d["strategy"] = _ffi.enum_names("kvmlab_strategy")[d["strategy"]]
    return d


def _loop_result(r: Any) -> LoopResult:
    """One ``kvmlab_loop_result`` as a :class:`LoopResult`."""
    return LoopResult(
        reason=REASONS.get(int(r.reason), "?"),
        exit_code=int(r.exit_code),
        checkpoint_tag=int(r.checkpoint_tag),
        crashed=bool(r.crashed),
        run_ns=int(r.run_ns),
        reset_ns=int(r.reset_ns),
        dirty_pages=int(r.dirty_pages),
        console_bytes=int(r.console_bytes),
    )


class _VmHandle:
    """A native VM handle plus everything that works on any VM.

    Subclasses obtain a handle (boot, restore, pool) and pass it here together
    with ``free``, the callable that releases it (``lib.kvmlab_vm_free`` by
    default). ``close()`` calls it once; ``__del__`` calls it if the object is
    dropped without ``close()``.
    """

    # Slots, a plain __del__ instead of a finalizer object, no keyword
    # arguments: a pooled restore builds one of these on its hot path, right
    # after the KVM ioctls, when every cache is cold (each of those measured
    # several microseconds there).
    __slots__ = ("_handle", "_free", "_config", "_guest", "_lock", "_decoder", "_reset_timings", "__weakref__")

    def __init__(self, handle: Any, config: VmConfig, guest: str, free: Callable[[Any], None] | None = None) -> None:
        self._handle = handle
        self._free = free or lib.kvmlab_vm_free
        self._config = config
        self._guest = guest
        self._lock = threading.Lock()
        self._decoder: codecs.IncrementalDecoder | None = None  # made on first console read
        self._reset_timings: collections.deque[ResetTiming] | None = None  # made on first reset

    def __del__(self) -> None:
        # Dropped without close(): nothing else can reference this object now.
        h = getattr(self, "_handle", None)  # unset if __init__ never ran
        if h is not None:
            self._handle = None
            try:
                self._free(h)
            except Exception:  # noqa: BLE001 - interpreter shutdown: the process frees everything
                pass

    # -- state ----------------------------------------------------------------

    @property
    def config(self) -> VmConfig:
        return self._config

    @property
    def memory_bytes(self) -> int:
        return self._config.memory_bytes

    @property
    def vcpus(self) -> int:
        return self._config.vcpus

    @property
    def guest(self) -> str:
        """The guest's name."""
        return self._guest

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live(self) -> Any:
        """The handle; call with the lock held."""
        h = self._handle
        if h is None:
            raise ClosedError(f"this VM ({self._guest}) is closed; boot a new one")
        return h

    # -- running ----------------------------------------------------------------

    def run(self, timeout_s: float | None = 10.0) -> RunResult:
        """Runs the guest until every vCPU stopped (exit or checkpoint), it halts,
        or ``timeout_s`` seconds passed (``None``: no deadline).

        A timeout is a result (``reason == "timeout"``), not an error; the next
        ``run()`` resumes. A guest crash raises :class:`GuestCrashError` (the
        message names the cause and the registers; ``.console`` on the
        exception holds the output before the crash).

        Args:
            timeout_s: seconds before the run stops with ``reason == "timeout"``;
                None: no deadline (Ctrl-C or :meth:`interrupt` still stop it).

        Returns:
            A :class:`RunResult`: why the run ended, the console output, the time.

        Raises:
            GuestCrashError: the guest crashed (triple fault, bad exit).
            ConfigError: ``timeout_s`` is not a positive number or None.
            ClosedError: the VM is closed.
        """
        timeout_ns = _timeout_ns(timeout_s)
        with self._lock:
            return self._run_locked(self._live(), timeout_ns)

    def _run_locked(self, h: Any, timeout_ns: int) -> RunResult:
        """run() with the lock held and ``h`` live (call() runs this way
        between its write and its read: one operation)."""
        out = ffi.new("kvmlab_run_result *")
        elapsed = 0
        while True:
            left = 0 if timeout_ns == 0 else max(1, timeout_ns - elapsed)
            rc = lib.kvmlab_vm_run(h, left, out)
            if rc != 0 or REASONS.get(out.reason) != "interrupted":
                break
            # A signal (Ctrl-C) stopped the vCPUs: Python runs its handler
            # here (KeyboardInterrupt propagates); otherwise resume.
            elapsed += int(out.elapsed_ns)
        out.elapsed_ns += elapsed
        if rc != 0:
            err = _ffi.error_for(rc)
            console, _ = self._take_console(h, final=True)
            if console:
                err.console = console  # type: ignore[attr-defined]
            raise err
        reason = REASONS.get(out.reason)
        if reason is None:
            raise InternalError(f"the core returned unknown run reason {out.reason}")
        console, _ = self._take_console(h, final=(reason == "exit"), pending=int(out.console_bytes))
        result = RunResult(
            reason=reason,
            exit_code=int(out.exit_code),
            checkpoint_tag=int(out.checkpoint_tag),
            console=console,
            console_dropped=int(out.console_dropped_bytes),
            elapsed_ns=int(out.elapsed_ns),
        )
        self._after_run(h, result)
        return result

    def _after_run(self, h: Any, result: RunResult) -> None:
        """Called by run() with the lock held and the handle live."""

    def interrupt(self) -> None:
        """Stops a ``run()`` in progress on another thread (it returns
        ``reason == "timeout"``; the next run resumes), or a whole
        :meth:`reset_loop`. Safe from any thread; no effect on later calls.
        (A call that has not reached the native core yet may miss it; use
        :meth:`close` to stop for good.)"""
        # Under _INTERRUPT_LOCK: close() on another thread cannot free the
        # handle between this read and the native call.
        with _INTERRUPT_LOCK:
            h = self._handle
            if h is not None:
                lib.kvmlab_vm_interrupt(h)

    def _take_console(self, h: Any, final: bool, pending: int | None = None) -> tuple[str, int]:
        """Moves the console bytes out of the core; returns (text, bytes).
        ``pending``: the core's count of waiting bytes when known (0: no call)."""
        if pending == 0:
            return (self._decoder.decode(b"", final=final) if self._decoder is not None else ""), 0
        chunks = []
        total = 0
        n = ffi.new("size_t *")
        while True:
            buf = bytearray(64 * 1024)
            _ffi.check(lib.kvmlab_vm_console_take(h, ffi.from_buffer("uint8_t[]", buf), len(buf), n))
            got = int(n[0])
            if got == 0:
                break
            chunks.append(bytes(buf[:got]))
            total += got
            if got < len(buf):
                break
        if self._decoder is None:
            self._decoder = _Utf8Decoder(errors="replace")
        text = self._decoder.decode(b"".join(chunks), final=final)
        return text, total

    def run_until_exit(self, timeout_s: float | None = 10.0) -> RunResult:
        """Runs through checkpoints until the guest exits, within ``timeout_s``
        seconds in total.

        Args:
            timeout_s: seconds for all runs together (None: no deadline).

        Returns:
            A :class:`RunResult` with reason ``"exit"`` whose console and
                elapsed time cover all runs.

        Raises:
            GuestTimeoutError: the guest did not exit in time, or halted
                (``.console`` on the exception holds the output).
            GuestCrashError: the guest crashed.
        """
        total_ns = _timeout_ns(timeout_s)  # 0: no deadline
        consoles: list[str] = []
        dropped = 0
        elapsed = 0
        # One operation under the VM's lock: another thread's run() cannot
        # take a checkpoint's output in between.
        with self._lock:
            h = self._live()
            while True:
                r = self._run_locked(h, 0 if total_ns == 0 else max(total_ns - elapsed, 1000))
                consoles.append(r.console)
                dropped += r.console_dropped
                elapsed += r.elapsed_ns
                if r.reason == "exit":
                    return RunResult("exit", r.exit_code, r.checkpoint_tag, "".join(consoles), dropped, elapsed)
                if r.reason in ("timeout", "halt") or (total_ns and elapsed >= total_ns):
                    break
        if r.reason == "halt":
            check, what = "guest_halted", "halted (hlt with interrupts off) instead of exiting; check the guest"
        elif total_ns == 0:  # no deadline: interrupt() or close() from another thread
            check, what = "run_stopped", "was stopped by interrupt() or close() before it exited"
        else:
            check, what = "deadline", f"did not exit within {timeout_s} s; pass a larger timeout_s or check the guest"
        err = GuestTimeoutError(f"guest {self._guest} {what}")
        err.check = check  # type: ignore[attr-defined]
        err.console = "".join(consoles)  # type: ignore[attr-defined]
        raise err

    # -- the service guest -----------------------------------------------------------

    def call(self, payload: bytes | bytearray | memoryview, op: str = "echo", timeout_s: float = 5.0) -> bytes:
        """Sends one request to a guest serving the service protocol (the
        built-in ``service`` guest) and returns its answer.

        ``op`` is ``"echo"``, ``"crc32c"`` (4 bytes, little-endian) or
        ``"reverse"``. The guest must be waiting at its service checkpoint
        (tag 0x5e5e0001); raises :class:`GuestTimeoutError` if it does not
        answer within ``timeout_s``.

        One operation under the VM's lock (write the request, run, read the
        answer): calls from several threads on one VM are served one at a
        time, each caller gets its own answer.

        Args:
            payload: the request, at most 4096 bytes.
            op: ``"echo"``, ``"crc32c"`` or ``"reverse"``.
            timeout_s: seconds to wait for the answer.

        Returns:
            The guest's answer.

        Raises:
            GuestTimeoutError: no answer in time (not the service guest, or not waiting).
            GuestError: the guest answered out of protocol or does not know ``op``.
            ConfigError: an unknown ``op`` or a payload over 4096 bytes.
        """
        code = check_choice("op", op, SERVICE_OPS)
        data = bytes(check_buffer("payload", payload))
        if len(data) > SERVICE_MAX_BYTES:
            bad_argument(
                "argument_range", "payload",
                f"payload is {len(data)} bytes; the service area takes at most {SERVICE_MAX_BYTES}",
            )
        timeout_ns = _timeout_ns(timeout_s)
        with self._lock:
            h = self._live()
            hdr = self._read(h, SERVICE_GPA, 16)
            seq = (int.from_bytes(hdr[8:12], "little") + 1) & 0xFFFFFFFF
            self._write(h, SERVICE_GPA + 0x1000, data)
            self._write(
                h,
                SERVICE_GPA,
                len(data).to_bytes(4, "little") + b"\0\0\0\0" + seq.to_bytes(4, "little") + b"\0\0\0\0" + code.to_bytes(4, "little"),
            )
            r = self._run_locked(h, timeout_ns)
            head = self._read(h, SERVICE_GPA, 0x18)
            n = int.from_bytes(head[4:8], "little")
            answer = self._read(h, SERVICE_GPA + 0x2000, min(n, SERVICE_MAX_BYTES))
        if r.reason != "checkpoint" or r.checkpoint_tag != SERVICE_TAG:
            err = GuestTimeoutError(
                f"guest {self._guest} did not answer the service request (run ended with {r.reason}"
                f"{' tag 0x%x' % r.checkpoint_tag if r.reason == 'checkpoint' else ''}); is it the service guest, waiting?"
            )
            err.console = r.console  # type: ignore[attr-defined]
            raise err
        if int.from_bytes(head[12:16], "little") != seq or n > SERVICE_MAX_BYTES:
            raise GuestError(f"guest {self._guest} answered out of protocol (sequence or length wrong)")
        status = int.from_bytes(head[0x14:0x18], "little")
        if status == 1:
            raise GuestError(f"guest {self._guest} does not know op {op!r}")
        return answer

    # -- reset -----------------------------------------------------------------------------

    def _reset_mode(self, mode: str) -> int:
        return check_choice("mode", mode, RESET_MODES)

    def reset(self, mode: str = "auto") -> ResetTiming:
        """Puts this VM back to exactly the snapshot it was restored from
        (restore it with ``resettable=True``): only pages written since the
        restore or the previous reset are put back (KVM's dirty log plus host
        writes), then vCPU and device state. ``mode``: ``"copy"`` pages back,
        ``"drop"`` private pages (map-restored VMs), ``"auto"``.

        Args:
            mode: ``"auto"``, ``"copy"`` or ``"drop"``.

        Returns:
            A :class:`ResetTiming`: pages put back and nanoseconds per phase
                (also kept in :meth:`reset_timings`).

        Raises:
            BusyError: the VM was not restored with ``resettable=True``.
            ConfigError: an unknown ``mode``, or ``"drop"`` on a VM that is not map-restored.
            ClosedError: the VM is closed.
        """
        code = self._reset_mode(mode)
        out = ffi.new("kvmlab_reset_times *")
        with self._lock:
            _ffi.check(lib.kvmlab_vm_reset(self._live(), code, out))
            t = ResetTiming(**_ffi.as_dict(out, "kvmlab_reset_times"))
            if self._reset_timings is None:
                self._reset_timings = collections.deque(maxlen=4096)
            self._reset_timings.append(t)
            if self._decoder is not None:
                self._decoder.reset()
        return t

    def reset_timings(self) -> list[ResetTiming]:
        """The newest 4096 :meth:`reset` records of this VM, oldest first."""
        return list(self._reset_timings or ())

    def reset_loop(
        self,
        inputs,
        input_gpa: int = 0x400000,
        run_timeout_s: float | None = 1.0,
        mode: str = "auto",
        length_prefix: bool = False,
    ) -> list[LoopResult]:
        """For each input (all the same length, bytes-like): write it at
        ``input_gpa``, run until the guest stops (or ``run_timeout_s``),
        record the outcome, reset. The loop runs in the native core; Python
        is not on the per-iteration path. The VM must be resettable.

        ``length_prefix=True``: the input protocol of docs/guest-protocol.md:
        inputs may differ in length (and be empty); each is written as its
        length (u32 little-endian) at ``input_gpa`` and its bytes right after.

        Stopping: Ctrl-C (any signal whose handler raises) ends the whole loop
        with that exception; :meth:`interrupt` from another thread ends it
        and the list returned is shorter than ``inputs`` (the inputs done so
        far); :meth:`close` ends it with :class:`ClosedError`. Either way the
        VM is reset to its snapshot after the last input it ran. A signal
        whose handler returns lets the loop go on (that input is run again).

        Args:
            inputs: bytes-like inputs (all the same length unless ``length_prefix``).
            input_gpa: where each input is written in guest memory.
            run_timeout_s: seconds per run before it counts as a hang (``reason == "timeout"``).
            mode: the reset's ``mode`` (see :meth:`reset`).
            length_prefix: write each input after its u32 length (the input protocol).

        Returns:
            One :class:`LoopResult` per input run, in order.

        Raises:
            BusyError: the VM is not resettable.
            BoundsError: an input does not fit at ``input_gpa``.
            ConfigError: inputs of different lengths or empty (without ``length_prefix``), or a bad argument.
            ClosedError: the VM was closed (also during the loop).
        """
        if not isinstance(length_prefix, bool):
            bad_argument("argument_type", "length_prefix", f"length_prefix must be True or False, got {length_prefix!r}")
        items = [bytes(x) for x in inputs]
        if not items:
            return []
        if length_prefix:
            offsets = array.array("Q", itertools.accumulate((len(x) for x in items), initial=0))
            out, _console, done = self._reset_loop_var(b"".join(items), offsets, input_gpa, _timeout_ns(run_timeout_s),
                                                       0, mode)
            return [_loop_result(r) for r in out[0:done]]
        size = len(items[0])
        if size == 0 or any(len(x) != size for x in items):
            raise ConfigError("reset_loop inputs must be non-empty and all the same length")
        _check_range(input_gpa, size, self.memory_bytes)
        code = self._reset_mode(mode)
        timeout_ns = _timeout_ns(run_timeout_s)
        packed = memoryview(b"".join(items))
        out = ffi.new("kvmlab_loop_result[]", len(items))
        done = self._drive_loop(len(items), out, lambda h, start, n_out: lib.kvmlab_vm_reset_loop(
            h, ffi.from_buffer("uint8_t[]", packed[start * size :]), size, len(items) - start, input_gpa,
            timeout_ns, code, out + start, n_out,
        ))
        return [_loop_result(r) for r in out[0:done]]

    def _drive_loop(self, count: int, out: Any, call: Callable[[Any, int, Any], int]) -> int:
        """Runs a native reset loop, ``call(handle, start, out_done) -> rc``
        over inputs ``start ..``, until all ``count`` are done or it was
        stopped; returns how many are done (``out[:done]``)."""
        done = ffi.new("size_t *")
        n_done = 0
        with self._lock:
            h = self._live()
            while n_done < count:
                rc = call(h, n_done, done)
                # The loop leaves console output of its runs behind; drop it.
                self._take_console(h, final=True)
                _ffi.check(rc)
                n = int(done[0])
                n_done += n
                if n_done == count:
                    break
                if n > 0 and REASONS.get(int(out[n_done - 1].reason)) == "interrupted":
                    # A signal stopped the loop: Python runs its handler here
                    # (KeyboardInterrupt propagates); if it returns, that
                    # input runs again (the VM was reset after it).
                    n_done -= 1
                    continue
                break  # interrupt(): the inputs done so far
        return n_done

    def _reset_loop_var(
        self, blob: bytes, offsets: Any, input_gpa: int, timeout_ns: int, console_stride: int = 0, mode: str = "auto"
    ) -> tuple[Any, bytearray, int]:
        """The native loop over inputs of different lengths, input i being
        ``blob[offsets[i]:offsets[i+1]]`` (``offsets``: a buffer of count + 1
        uint64), each written as the input protocol says (u32 LE length at
        ``input_gpa``, then the bytes). Returns (``kvmlab_loop_result[count]``,
        the first ``console_stride`` console bytes of each run, inputs done:
        fewer than count when the loop was stopped, see :meth:`reset_loop`)."""
        code = self._reset_mode(mode)
        offs = ffi.from_buffer("uint64_t[]", offsets)
        count = len(offs) - 1
        # The core reads inputs[0 .. offsets[count]]: that must be this buffer.
        if count < 0 or offs[count] != len(blob):
            bad_argument("argument_range", "offsets", f"offsets must be count + 1 entries ending at the inputs' "
                                                      f"{len(blob)} bytes")
        out = ffi.new("kvmlab_loop_result[]", max(count, 1))
        console = bytearray(count * console_stride)
        con = ffi.from_buffer("uint8_t[]", console) if console else ffi.NULL
        data = ffi.from_buffer("uint8_t[]", blob)
        done = self._drive_loop(count, out, lambda h, start, n_out: lib.kvmlab_vm_reset_loop_var(
            h, data, offs + start, count - start, input_gpa, timeout_ns, code, out + start,
            con + start * console_stride if console else ffi.NULL, console_stride, n_out,
        ))
        return out, console, done

    def _enable_reset(self, snap) -> None:
        with snap._use() as sh, self._lock:
            _ffi.check(lib.kvmlab_vm_enable_reset(self._live(), sh))

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self):
        """Captures this stopped VM (memory and all vCPU/device/host state).

        Call between runs (e.g. after a checkpoint); the VM keeps going
        unaffected.

        Returns:
            A :class:`kvmlab.Snapshot` in memory (``save()`` it for map restores).

        Raises:
            ClosedError: the VM is closed.
        """
        from .snapshot import Snapshot

        with self._lock:
            return Snapshot._capture(self._live())

    # -- memory and registers -----------------------------------------------------

    def read_memory(self, gpa: int, n: int) -> bytes:
        """``n`` bytes of guest memory at guest-physical address ``gpa``.

        Raises:
            BoundsError: the range is outside guest memory.
            ClosedError: the VM is closed.
        """
        _check_range(gpa, n, self.memory_bytes)
        with self._lock:
            return self._read(self._live(), gpa, n)

    @staticmethod
    def _read(h: Any, gpa: int, n: int) -> bytes:
        """read_memory with the lock held, ``h`` live and the range checked."""
        buf = bytearray(n)
        _ffi.check(lib.kvmlab_vm_read_memory(h, gpa, ffi.from_buffer("uint8_t[]", buf), n))
        return bytes(buf)

    def write_memory(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` into guest memory at guest-physical address ``gpa``.

        Raises:
            BoundsError: the range is outside guest memory.
            ConfigError: ``data`` is not bytes-like.
            ClosedError: the VM is closed.
        """
        view = check_buffer("data", data)
        _check_range(gpa, len(view), self.memory_bytes)
        with self._lock:
            self._write(self._live(), gpa, view)

    @staticmethod
    def _write(h: Any, gpa: int, data: bytes | memoryview) -> None:
        """write_memory with the lock held, ``h`` live and the range checked."""
        _ffi.check(lib.kvmlab_vm_write_memory(h, gpa, ffi.from_buffer("uint8_t[]", data), len(data)))

    @property
    def identity(self) -> int:
        """The per-clone identity the guest reads through ports 0x503 (low 32
        bits) and 0x504 (high): 0 unless one was given (:meth:`set_identity`,
        ``fork_many(..., identity=True)``, ``RestorePool.prepare(..., identity=True)``)."""
        with self._lock:
            return int(lib.kvmlab_vm_get_identity(self._live()))

    def set_identity(self, identity: int) -> None:
        """Gives the VM an identity its guest reads (docs/guest-protocol.md,
        "Per-clone identity"): host state, not guest memory, so the VM stays
        bit-identical to its snapshot.

        Args:
            identity: 0 .. 2**64-1 (0: none).

        Raises:
            ConfigError: not an int in range.
            ClosedError: the VM is closed.
        """
        check_int("identity", identity, 0, 2**64 - 1)
        with self._lock:
            _ffi.check(lib.kvmlab_vm_set_identity(self._live(), identity))

    def registers(self, vcpu: int = 0) -> dict[str, int]:
        """The registers of vCPU ``vcpu`` (``rip``, ``rsp``, ..., ``cr3``, ``cs``, ``cpl``).

        Args:
            vcpu: which vCPU (0 .. vcpus-1).

        Returns:
            Register name -> value.

        Raises:
            ConfigError: no such vCPU.
            ClosedError: the VM is closed.
        """
        check_int("vcpu", vcpu, 0, self.vcpus - 1)
        out = ffi.new("kvmlab_regs *")
        with self._lock:
            h = self._live()
            _ffi.check(lib.kvmlab_vm_get_regs(h, vcpu, out))
        return {k: v for k, v in _ffi.as_dict(out, "kvmlab_regs").items() if k != "reserved"}

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Frees the VM. Idempotent. A ``run()`` in progress on another thread
        stops at once (it returns ``reason == "timeout"``; one that had not
        begun raises :class:`ClosedError`), a ``reset_loop()`` raises
        :class:`ClosedError`; close waits for them to return."""
        # Latched in the core before waiting for the lock, whether or not a
        # run holds it yet: a run that has not reached KVM_RUN sees it on entry
        # (an interrupt() there could be missed, and close() would wait forever
        # for a run without deadline).
        with _INTERRUPT_LOCK:
            h = self._handle
            if h is not None:
                lib.kvmlab_vm_begin_close(h)
        with self._lock:
            h = self._handle
            if h is None:
                return
            with _INTERRUPT_LOCK:  # an interrupt() in flight finishes first
                self._handle = None
            self._free(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else "open"
        return (
            f"<{type(self).__name__} guest={self._guest!r} memory_mib={self._config.memory_mib} "
            f"vcpus={self._config.vcpus} {state}>"
        )


def _resolve_guest(guest: GuestSpec) -> Guest:
    if isinstance(guest, Guest):
        return guest
    if isinstance(guest, (bytes, bytearray)):
        return Guest.from_bytes(guest)
    if isinstance(guest, str):
        # A built-in name first; otherwise anything that looks like a path.
        if guest in guest_names():
            return Guest.builtin(guest)
        if os.sep in guest or os.path.exists(guest) or guest.endswith((".bin", ".elf")):
            return Guest.from_file(guest)
        return Guest.builtin(guest)  # raises GuestError listing the built-in names
    if isinstance(guest, os.PathLike):
        return Guest.from_file(guest)
    raise GuestError(
        f"guest must be a built-in name, a path, a Guest or bytes; got {type(guest).__name__}"
    )


class Vm(_VmHandle):
    """A VM running a guest. Create one with :meth:`Vm.boot`."""

    __slots__ = ("restore_timing",)

    @classmethod
    def boot(
        cls,
        guest: GuestSpec,
        cfg: VmConfig | None = None,
        args: Mapping[str, object] | str | None = None,
        cpl: int = 3,
    ) -> "Vm":
        """Creates a VM and boots ``guest`` in it (not yet running: call :meth:`run`).

        ``guest`` is a built-in name (``"counter"``), a path to a flat binary or
        static ELF, a :class:`Guest`, or raw bytes. ``args`` are passed to the
        guest as ``key=value`` text; ``cpl`` is 3 (native speed) or 0 (emulated
        on paravirtual KVM hosts such as kvm_pvm).

        Args:
            guest: what to boot (see above).
            cfg: memory size and vCPUs (default ``VmConfig()``).
            args: arguments for the guest (a mapping or ``"k=v k=v"`` text).
            cpl: the privilege level the guest starts at, 3 or 0.

        Returns:
            The new :class:`Vm`, stopped before its first instruction.

        Raises:
            GuestError: an unknown built-in name or an unusable image.
            ConfigError: a bad ``cfg``, ``args`` or ``cpl``.
            KvmUnavailableError: /dev/kvm cannot be used (run ``kvmlab doctor``).
        """
        if cfg is None:
            cfg = VmConfig()
        check_type("cfg", cfg, VmConfig)
        if isinstance(cpl, bool) or cpl not in (0, 3):
            bad_argument("argument_value", "cpl", f"cpl={cpl!r}: kvmlab guests run at CPL 3 (default) or 0")
        g = _resolve_guest(guest)
        arg_text = format_args(args).encode("ascii")

        handle = _new_handle(cfg)
        try:
            image = ffi.from_buffer("uint8_t[]", g.image)
            arg_buf = ffi.from_buffer("uint8_t[]", arg_text) if arg_text else ffi.NULL
            fields = {
                "image": image,
                "image_bytes": len(g.image),
                "args": arg_buf,
                "args_bytes": len(arg_text),
                "cpl": cpl,
            }
            name = g.name.encode("utf-8", errors="replace")
            name_buf = ffi.from_buffer("uint8_t[]", name)  # kept for snapshots
            fields["name"] = name_buf
            fields["name_bytes"] = len(name)
            opts = ffi.new("kvmlab_boot_options *", fields)
            _ffi.check(lib.kvmlab_vm_boot(handle, opts))
        except BaseException:
            lib.kvmlab_vm_free(handle)
            raise
        return cls(handle, cfg, g.name)

    @classmethod
    def restore(cls, snap, strategy: str = "auto", resettable: bool = False) -> "Vm":
        """Builds a new VM from a :class:`kvmlab.Snapshot` (a fresh shell, then
        restore; no pool). ``strategy`` is ``"copy"``, ``"map"`` (file-backed
        snapshots: copy-on-write mapping of the file) or ``"auto"``.

        The VM continues exactly where the snapshot was taken. The host must
        offer the CPU features the guest saw (:class:`IncompatibleError` if not).
        ``resettable=True`` lets :meth:`reset` put it back to ``snap`` later.
        ``vm.restore_timing`` holds the per-phase nanoseconds.

        Args:
            snap: the snapshot.
            strategy: ``"copy"``, ``"map"`` or ``"auto"``.
            resettable: make :meth:`reset` available.

        Returns:
            A new :class:`Vm`, continuing where ``snap`` was taken.

        Raises:
            IncompatibleError: the host lacks CPU features the guest saw.
            ConfigError: ``snap`` is not a Snapshot, or an unknown ``strategy``.
            ClosedError: ``snap`` is closed.
        """
        from .snapshot import Snapshot, strategy_code

        check_type("snap", snap, Snapshot, "a Snapshot (Snapshot.load, vm.snapshot(), Snapshot.from_bytes)")
        code = strategy_code(strategy)
        out = ffi.new("kvmlab_vm **")
        t = ffi.new("kvmlab_restore_times *")
        with snap._use() as sh:
            # Without resettable the shell has no dirty log (less kernel memory per VM).
            flags = _ffi.enum_values("kvmlab_restore_flags")["resettable"] if resettable else 0
            _ffi.check(lib.kvmlab_vm_restore(sh, code, flags, out, t))
        vm = cls(out[0], snap.config, snap.guest)
        if resettable:
            try:
                vm._enable_reset(snap)
            except BaseException:
                vm.close()
                raise
        vm.restore_timing = restore_timing_dict(t)
        return vm
