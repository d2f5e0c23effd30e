"""Virtual machines: boot a guest, run it, look at its memory and registers.

>>> with Vm.boot("counter", VmConfig(memory_mib=64), args={"steps": 20, "checkpoint_at": 10}) as vm:
...     r = vm.run()          # RunResult(reason="checkpoint", checkpoint_tag=10, ...)
...     r = vm.run()          # RunResult(reason="exit", exit_code=0, ...)

Structure: :class:`_VmHandle` owns a native ``kvmlab_vm`` handle and implements
everything that works on any VM (run, memory, registers, close); :class:`Vm`
adds :meth:`Vm.boot`. Other ways to obtain a handle (restore from a snapshot,
pools) subclass :class:`_VmHandle` the same way. What runs return
(:class:`RunResult`, :class:`LoopResult`, :class:`ResetTiming`) is in
:mod:`kvmlab.run`; reset and the reset loops (methods of every VM) in
:mod:`kvmlab.reset`.

Threading: one lock per VM. ``run()`` holds it for the whole native call (cffi
releases the GIL meanwhile), and every multi-step operation holds it for all
its steps (``call()``: write, run, read; ``run_until_exit()``: every run), so
memory access from another thread waits until they return, and concurrent
callers each get their own answer. ``interrupt()`` and ``close()`` do not
wait for the lock first: they stop a run in progress at once.

Stopping: each of these calls is one operation for :meth:`interrupt` from the
moment it starts (:meth:`_operation`), and Ctrl-C stops it whichever
thread of the process the kernel hands the signal to (the core's handler,
``zigsrc/signals.zig``).
"""

from __future__ import annotations

import codecs
import collections
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

if TYPE_CHECKING:
    from .snapshot import Snapshot

from . import _ffi
from ._closing import Closing
from .config import VmConfig, bad_argument, check_buffer, check_int, check_range, check_type
from .config import timeout_ns as _timeout_ns  # seconds (None: no deadline) -> the core's timeout_ns
from .errors import ClosedError, GuestError, GuestTimeoutError, InternalError
from .guests import Guest, format_args
from .guests import names as guest_names
from .reset import RESET_MODES, _ResetOps  # noqa: F401 - RESET_MODES re-exported
from .run import REASONS, LoopResult, ResetTiming, RunResult
from ._service import SERVICE_GPA, SERVICE_MAX_BYTES, SERVICE_OPS, SERVICE_TAG, _ServiceOps  # noqa: F401 - re-exported

__all__ = ["Vm", "RunResult", "ResetTiming", "LoopResult", "REASONS"]

ffi = _ffi.ffi
lib = _ffi.lib

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")

#: Orders interrupt() (which runs without the VM's lock, so that it can stop a
#: run() holding it) and the interrupt count every call notes on entry
#: (_interrupt_count) before close() frees the handle. One for all VMs: each
#: holder makes one short native call under it, while a per-VM lock would cost
#: every restore its construction (the pooled take is a hot path); calls on
#: many threads do meet on it, for that instant.
_INTERRUPT_LOCK = threading.Lock()

GuestSpec = Union[str, "os.PathLike[str]", Guest, bytes, bytearray]


def _new_handle(config: VmConfig) -> Any:
    """Creates an empty native VM shell for ``config`` (a ``kvmlab_vm *``)."""
    c = ffi.new("kvmlab_vm_config *", {"memory_bytes": config.memory_bytes, "vcpus": config.vcpus})
    out = ffi.new("kvmlab_vm **")
    _ffi.check(lib.kvmlab_vm_new(c, out))
    if out[0] == ffi.NULL:
        raise InternalError("kvmlab_vm_new succeeded but returned no VM", check="internal")
    return out[0]


def restore_timing_dict(times: Any) -> dict[str, Any]:
    """A ``kvmlab_restore_times`` as the ``restore_timing`` dict: integer
    nanoseconds per phase, ``mapped``, ``hit``, ``seq`` and ``strategy`` by
    name (``kvmlab_strategy``: copy, map, reuse or prepared)."""
    d: dict[str, Any] = _ffi.as_dict(times, "kvmlab_restore_times")
    del d["reserved"]
    d["strategy"] = _ffi.enum_names("kvmlab_strategy")[d["strategy"]]
    return d


class _Operation:
    """What :meth:`_VmHandle._operation` returns (a class, not a generator:
    it is on the path of every ``call()``)."""

    __slots__ = ("_vm", "_since", "_h")

    def __init__(self, vm: _VmHandle, since: int) -> None:
        self._vm = vm
        self._since = since

    def __enter__(self) -> Any:
        lock = self._vm._lock
        lock.acquire()
        try:
            self._h = self._vm._live()
            lib.kvmlab_vm_begin_operation(self._h, self._since)
        except BaseException:
            lock.release()
            raise
        return self._h

    def __exit__(self, *exc: object) -> None:
        try:
            lib.kvmlab_vm_end_operation(self._h)
        finally:
            self._vm._lock.release()


class _VmHandle(_ResetOps, _ServiceOps, Closing):
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
            raise ClosedError(f"this VM ({self._guest}) is closed; boot a new one", check="vm_closed")
        return h

    def _interrupt_count(self) -> int:
        """The core's count of :meth:`interrupt` calls (0 once closed): a
        call notes it where it starts, for :meth:`_operation`."""
        with _INTERRUPT_LOCK:  # close() cannot free the handle meanwhile
            h = self._handle
            return int(lib.kvmlab_vm_interrupt_count(h)) if h is not None else 0

    def _operation(self, since: int | None = None) -> _Operation:
        """One caller operation (run, call, run_until_exit, reset_loop), as a
        context: the VM's lock held, the live handle given. An
        :meth:`interrupt` made after the count ``since`` was noted (by
        default: now) stops all of its native runs and loops, also one made
        while it waited for the lock or between two of them."""
        return _Operation(self, self._interrupt_count() if since is None else since)

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
        with self._operation() as h:
            return self._run_locked(h, timeout_ns)

    def _run_locked(self, h: Any, timeout_ns: int, run: Callable[[int, Any, int], int] | None = None,
                    out: Any = None, first_rc: int | None = None) -> RunResult:
        """run() with the lock held and ``h`` live. ``run(left_ns, out,
        again)`` makes the native run (default kvmlab_vm_run; call() passes
        kvmlab_vm_call, ``again`` 1 when it resumes after a signal).
        ``first_rc``: the first native run was made already (call()'s) and
        returned this, its result in ``out``."""
        out = out if out is not None else ffi.new("kvmlab_run_result *")
        elapsed = 0
        again = 0
        rc = first_rc
        while True:
            if rc is None:
                left = 0 if timeout_ns == 0 else max(1, timeout_ns - elapsed)
                rc = lib.kvmlab_vm_run(h, left, out) if run is None else run(left, out, again)
            if rc != 0 or REASONS.get(out.reason) != "interrupted":
                break
            # A signal (Ctrl-C) stopped the vCPUs: Python runs its handler
            # here (KeyboardInterrupt propagates); otherwise resume.
            elapsed += int(out.elapsed_ns)
            again = 1
            rc = None
        out.elapsed_ns += elapsed
        if rc != 0:
            err = _ffi.error_for(rc)
            console, _ = self._take_console(h, final=True)
            if console:
                err.console = console  # type: ignore[attr-defined]
            raise err
        reason = REASONS.get(out.reason)
        if reason is None:
            raise InternalError(f"the core returned unknown run reason {out.reason}", check="internal")
        console, _ = self._take_console(h, final=(reason == "exit"), pending=int(out.console_bytes))
        result = RunResult(
            reason=reason,
            exit_code=int(out.exit_code),
            checkpoint_tag=int(out.checkpoint_tag),
            console=console,
            console_dropped=int(out.console_dropped_bytes),
            elapsed_ns=int(out.elapsed_ns),
        )
        return result

    def interrupt(self) -> None:
        """Stops the calls on this VM in progress on other threads: a
        ``run()`` returns ``reason == "timeout"`` (the next run resumes), a
        :meth:`reset_loop` ends with the inputs done so far, ``call()`` and
        :meth:`run_until_exit` raise :class:`GuestTimeoutError`.

        "In progress" counts from the moment the call starts: one that has
        not reached the native core yet, or waits for another call on the VM
        to finish, stops as soon as it would run. Calls started after
        ``interrupt()`` returned are not affected, and with no call in
        progress it does nothing (it is not kept for the next call). Safe from
        any thread."""
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
        with self._operation() as h:
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
        err.check = check
        err.console = "".join(consoles)  # type: ignore[attr-defined]
        raise err

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
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
        check_range(gpa, n, self.memory_bytes)
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
        check_range(gpa, len(view), self.memory_bytes)
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
        f"guest must be a built-in name, a path, a Guest or bytes; got {type(guest).__name__}",
        check="argument_type",
    )


class Vm(_VmHandle):
    """A VM running a guest. Create one with :meth:`Vm.boot`."""

    __slots__ = ("restore_timing",)
    #: Per-phase nanoseconds of the restore that made this VM (set by :meth:`restore`).
    restore_timing: dict[str, Any]

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
    def restore(cls, snap: Snapshot, strategy: str = "auto", resettable: bool = False) -> "Vm":
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
