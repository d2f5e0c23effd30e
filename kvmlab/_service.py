"""The service protocol's host side (docs/guest-protocol.md): :meth:`call`,
which sends one request to a guest serving it (the built-in ``service``
guest) and returns the answer, and the protocol's constants from the header.

:class:`_ServiceOps` holds it for :class:`kvmlab.vm._VmHandle`, which owns the
handle, the lock and the run loop it uses. The native side is one call,
``kvmlab_vm_call`` (zigsrc/service.zig): write the request, run, read the
answer.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from . import _ffi
from .config import bad_argument, check_buffer, check_choice
from .config import timeout_ns as _timeout_ns  # seconds (None: no deadline) -> the core's timeout_ns
from .errors import GuestError, GuestTimeoutError

if TYPE_CHECKING:
    from .run import RunResult

__all__ = ["SERVICE_OPS", "SERVICE_MAX_BYTES", "SERVICE_GPA", "SERVICE_TAG"]

ffi = _ffi.ffi
lib = _ffi.lib

#: The service protocol, from the header: its operations by name, the
#: payload limit, the header's address, the tag.
SERVICE_OPS = _ffi.enum_values("kvmlab_service_op")
_SERVICE = _ffi.enum_values("kvmlab_service_const")
SERVICE_MAX_BYTES = _SERVICE["max_bytes"]
SERVICE_GPA = _SERVICE["header_gpa"]
SERVICE_TAG = _SERVICE["wait_tag"]
_SERVICE_STATUS = _ffi.enum_values("kvmlab_service_status")
_CALL_OUTCOME = _ffi.enum_values("kvmlab_call_outcome")
_ANSWERED = _CALL_OUTCOME["answered"]

#: call()'s default timeout, and the same in the core's nanoseconds: the
#: default is recognised by identity (no conversion on the hot path).
_CALL_TIMEOUT_S = 5.0
_CALL_TIMEOUT_NS = _timeout_ns(_CALL_TIMEOUT_S)

#: Spare cells of call() (answer buffer, its pointer, the answer and run
#: result structs), shared by every VM; at most this many are kept.
_CALL_CELLS: list[tuple[bytearray, Any, Any, Any]] = []
_SPARE_CALL_CELLS = 16

_call_native = lib.kvmlab_vm_call  # looked up once: call() is a hot path


def _new_call_cells() -> tuple[bytearray, Any, Any, Any]:
    buf = bytearray(SERVICE_MAX_BYTES)
    return buf, ffi.from_buffer("uint8_t[]", buf), ffi.new("kvmlab_service_answer *"), ffi.new("kvmlab_run_result *")


class _ServiceOps:
    """call() (mixed into :class:`kvmlab.vm._VmHandle`)."""

    __slots__ = ()

    if TYPE_CHECKING:  # provided by kvmlab.vm._VmHandle
        _guest: str
        _lock: threading.Lock

        def _live(self) -> Any: ...

        def _interrupt_count(self) -> int: ...

        def _run_locked(self, h: Any, timeout_ns: int, run: Callable[[int, Any, int], int] | None = None,
                        out: Any = None, first_rc: int | None = None) -> RunResult: ...

    def call(self, payload: bytes | bytearray | memoryview, op: str = "echo",
             timeout_s: float = _CALL_TIMEOUT_S) -> bytes:
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
        # Every step here is short on purpose: after a run KVM (kvm_pvm here)
        # leaves the host's caches and TLB cold, so each Python step measured
        # microseconds; the answered call takes the straight path below.
        since = self._interrupt_count()  # an interrupt() from now on stops this call
        try:
            code = SERVICE_OPS[op]  # check_choice inline
        except (KeyError, TypeError):
            code = check_choice("op", op, SERVICE_OPS)
        data = payload if type(payload) is bytes else check_buffer("payload", payload)
        n = len(data)
        if n > SERVICE_MAX_BYTES:
            bad_argument("argument_range", "payload",
                         f"payload is {n} bytes; the service area takes at most {SERVICE_MAX_BYTES}")
        timeout_ns = _CALL_TIMEOUT_NS if timeout_s is _CALL_TIMEOUT_S else _timeout_ns(timeout_s)
        try:
            cells = _CALL_CELLS.pop()  # list.pop/append are atomic: one set per call in flight
        except IndexError:
            cells = _new_call_cells()
        buf, buf_ptr, ans, out = cells
        src = ffi.from_buffer("uint8_t[]", data)
        try:
            with self._lock:
                h = self._live()
                rc = _call_native(h, since, code, src, n, 0, timeout_ns, out, buf_ptr, SERVICE_MAX_BYTES, ans)
                if rc == 0 and ans.outcome == _ANSWERED and out.console_bytes == 0:
                    answer, status = bytes(buf[: ans.bytes]), ans.status
                else:  # a signal, console output, no answer or an error: the general run path
                    answer, status = self._call_rest(h, since, rc, code, src, n, timeout_ns, cells)
        finally:
            if len(_CALL_CELLS) < _SPARE_CALL_CELLS:
                _CALL_CELLS.append(cells)
        if status == _SERVICE_STATUS["bad_opcode"]:
            raise GuestError(f"guest {self._guest} does not know op {op!r}", check="service_op")
        return answer

    def _call_rest(self, h: Any, since: int, rc: int, code: int, src: Any, n: int, timeout_ns: int,
                   cells: tuple[bytearray, Any, Any, Any]) -> tuple[bytes, int]:
        """call() after a first native call that did not simply answer: the run
        loop's handling (resume after a signal, console, errors), then the
        answer or the error that says why there is none."""
        buf, buf_ptr, ans, out = cells
        r = self._run_locked(h, timeout_ns, lambda left, o, again: _call_native(
            h, since, code, src, n, again, left, o, buf_ptr, SERVICE_MAX_BYTES, ans), out, first_rc=rc)
        outcome = int(ans.outcome)
        if outcome == _CALL_OUTCOME["no_answer"]:
            err = GuestTimeoutError(
                f"guest {self._guest} did not answer the service request (run ended with {r.reason}"
                f"{' tag 0x%x' % r.checkpoint_tag if r.reason == 'checkpoint' else ''}); is it the service guest, waiting?",
                check="service_timeout",
            )
            err.console = r.console  # type: ignore[attr-defined]
            raise err
        if outcome == _CALL_OUTCOME["out_of_protocol"]:
            raise GuestError(f"guest {self._guest} answered out of protocol (sequence or length wrong)", check="service_protocol")
        return bytes(buf[: ans.bytes]), int(ans.status)
