"""Reset of a VM to the snapshot it was restored from (``resettable=True``):
:meth:`reset`, its records, and the native reset loops (:meth:`reset_loop`),
which run many inputs without Python on the per-iteration path.

:class:`_ResetOps` holds these methods for :class:`kvmlab.vm._VmHandle`, which
owns the handle, the lock and the console they use.
"""

from __future__ import annotations

import array
import codecs
import collections
import dataclasses
import itertools
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable

from . import _ffi
from .config import VmConfig, bad_argument, check_choice, check_range
from .config import timeout_ns as _timeout_ns  # seconds (None: no deadline) -> the core's timeout_ns
from .errors import ConfigError
from .run import REASONS, LoopResult, ResetTiming, _loop_result

if TYPE_CHECKING:
    from .snapshot import Snapshot

__all__ = ["RESET_MODES"]

ffi = _ffi.ffi
lib = _ffi.lib

#: Reset memory modes, name -> ``kvmlab_reset_mode`` (read from the header).
RESET_MODES = _ffi.enum_values("kvmlab_reset_mode")

#: kvmlab_reset_times -> ResetTiming in one step (reset() reads it right after
#: the reset's ioctls, when every cache is cold): the struct is the record's
#: fields in its order, all u64 (checked here, at import).
_RESET_FIELDS = _ffi.field_names("kvmlab_reset_times")
if _RESET_FIELDS != tuple(f.name for f in dataclasses.fields(ResetTiming)) or any(
    f.type.cname != "uint64_t" for _, f in ffi.typeof("kvmlab_reset_times").fields
):  # a raise, not an assert: python -O would read the record wrongly
    raise ImportError(f"kvmlab_reset_times {_RESET_FIELDS} is not ResetTiming's u64 fields in order: {_ffi._REBUILD_HINT}")
_unpack_reset_times = struct.Struct(f"={len(_RESET_FIELDS)}Q").unpack
#: Spare kvmlab_reset_times cells (list.pop/append are atomic), shared by every VM.
_RESET_CELLS: list[Any] = []
_SPARE_RESET_CELLS = 16


class _ResetOps:
    """The reset methods of a VM (mixed into :class:`kvmlab.vm._VmHandle`)."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by kvmlab.vm._VmHandle
        _config: VmConfig
        _lock: threading.Lock
        _decoder: codecs.IncrementalDecoder | None
        _reset_timings: collections.deque[ResetTiming] | None

        def _live(self) -> Any: ...

        def _interrupt_count(self) -> int: ...

        def _operation(self, since: int | None = None) -> ContextManager[Any]: ...

        def _take_console(self, h: Any, final: bool, pending: int | None = None) -> tuple[str, int]: ...

    def _reset_mode(self, mode: str) -> int:
        return check_choice("mode", mode, RESET_MODES)

    def reset(self, mode: str = "auto") -> ResetTiming:
        """Puts this VM back to exactly the snapshot it was restored from
        (restore it with ``resettable=True``): only pages written since the
        restore or the previous reset are put back (KVM's dirty log plus host
        writes), then vCPU and device state. ``mode``: ``"copy"`` pages back,
        ``"drop"`` private pages (map-restored VMs), ``"auto"``. Up to 64 pages
        the guest wrote stay writable (KVM does not re-protect them) and are put
        back at every reset: the next run writes them without a fault each.

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
        try:
            code = RESET_MODES[mode]  # _reset_mode inline: reset() is a hot path
        except (KeyError, TypeError):
            code = self._reset_mode(mode)
        try:
            out = _RESET_CELLS.pop()
        except IndexError:
            out = ffi.new("kvmlab_reset_times *")
        with self._lock:
            _ffi.check(lib.kvmlab_vm_reset(self._live(), code, out))
            t = ResetTiming(*_unpack_reset_times(ffi.buffer(out)))
            if len(_RESET_CELLS) < _SPARE_RESET_CELLS:
                _RESET_CELLS.append(out)
            if self._reset_timings is None:
                self._reset_timings = collections.deque(maxlen=4096)  # type: ignore[misc]  # a slot of _VmHandle
            self._reset_timings.append(t)
            if self._decoder is not None:
                self._decoder.reset()
        return t

    def reset_timings(self) -> list[ResetTiming]:
        """The newest 4096 :meth:`reset` records of this VM, oldest first."""
        return list(self._reset_timings or ())

    def reset_loop(
        self,
        inputs: Iterable[Any],
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
        with that exception, whichever thread of the process the kernel hands
        the signal to; :meth:`interrupt` from another thread, once this call
        started, ends it and the list returned is shorter than ``inputs``
        (the inputs done so far); :meth:`close` ends it with
        :class:`ClosedError`. Either way the VM is reset to its snapshot after
        the last input it ran. A signal whose handler returns lets the loop go
        on (that input is run again).

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
        since = self._interrupt_count()  # before packing the inputs: interrupt() stops it from here on
        if not isinstance(length_prefix, bool):
            bad_argument("argument_type", "length_prefix", f"length_prefix must be True or False, got {length_prefix!r}")
        items = [bytes(x) for x in inputs]
        if not items:
            return []
        if length_prefix:
            offsets = array.array("Q", itertools.accumulate((len(x) for x in items), initial=0))
            out, _console, done = self._reset_loop_var(b"".join(items), offsets, input_gpa, _timeout_ns(run_timeout_s),
                                                       0, mode, since)
            return [_loop_result(r) for r in out[0:done]]
        size = len(items[0])
        if size == 0 or any(len(x) != size for x in items):
            raise ConfigError("reset_loop inputs must be non-empty and all the same length", check="loop_inputs")
        check_range(input_gpa, size, self._config.memory_bytes)
        code = self._reset_mode(mode)
        timeout_ns = _timeout_ns(run_timeout_s)
        packed = memoryview(b"".join(items))
        out = ffi.new("kvmlab_loop_result[]", len(items))
        done = self._drive_loop(len(items), out, lambda h, start, n_out: lib.kvmlab_vm_reset_loop(
            h, ffi.from_buffer("uint8_t[]", packed[start * size :]), size, len(items) - start, input_gpa,
            timeout_ns, code, out + start, n_out,
        ), since)
        return [_loop_result(r) for r in out[0:done]]

    def _drive_loop(self, count: int, out: Any, call: Callable[[Any, int, Any], int], since: int | None) -> int:
        """Runs a native reset loop, ``call(handle, start, out_done) -> rc``
        over inputs ``start ..``, until all ``count`` are done or it was
        stopped; returns how many are done (``out[:done]``). ``since``: the
        interrupt count the call noted where it started (None: now)."""
        done = ffi.new("size_t *")
        n_done = 0
        with self._operation(since) as h:  # one operation: interrupt() ends it all
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
        self, blob: bytes, offsets: Any, input_gpa: int, timeout_ns: int, console_stride: int = 0, mode: str = "auto",
        since: int | None = None,
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
        ), since)
        return out, console, done

    def _enable_reset(self, snap: Snapshot) -> None:
        with snap._use() as sh, self._lock:
            _ffi.check(lib.kvmlab_vm_enable_reset(self._live(), sh))
