"""Exceptions raised by kvmlab.

Every error is a :class:`KvmlabError`. Each result code of the C core maps to
exactly one class here (the table lives in ``kvmlab._ffi``); some classes also
derive from a matching builtin so generic handlers keep working (for example
:class:`BoundsError` is an ``IndexError``, :class:`ConfigError` a ``ValueError``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KvmlabError",
    "KvmlabMemoryError",
    "KvmUnavailableError",
    "KvmError",
    "ConfigError",
    "GuestError",
    "GuestCrashError",
    "GuestTimeoutError",
    "SnapshotError",
    "ClosedError",
    "BusyError",
    "BoundsError",
    "PoolExhaustedError",
    "IncompatibleError",
    "InternalError",
    "PrepareError",
]


class KvmlabError(Exception):
    """Base class of every kvmlab error.

    ``check`` is the machine-readable id of what refused the call: the core's
    ``kvmlab_check`` for an error of the core (``"cpuid_features"``,
    ``"pool_exhausted"``, ``"vm_running"``, ``"magic"``, ...), else the id the
    Python layer raised with (``"argument_range"``, ``"snapshot_closed"``,
    ...). Every id is listed in docs/errors.md with what to do. Tests and
    callers match on it, not on the message (messages may be reworded).
    """

    check: str | None = None

    def __init__(self, *args: object, check: str | None = None) -> None:
        super().__init__(*args)
        if check is not None:
            self.check = check

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``check`` (and other attributes) across pickling
        return (_rebuild, (type(self), self.args, self.__dict__))


class KvmlabMemoryError(KvmlabError, MemoryError):
    """The host could not allocate memory (guest RAM, buffers, threads)."""


class KvmUnavailableError(KvmlabError):
    """/dev/kvm is missing, not accessible, or its API is unusable.

    Run ``kvmlab doctor`` to see what is wrong on this host.
    """


class KvmError(KvmlabError, OSError):
    """A KVM ioctl or system call failed unexpectedly."""


class ConfigError(KvmlabError, ValueError):
    """A configuration or argument value is invalid."""


class GuestError(KvmlabError, ValueError):
    """A guest image is missing, empty, too large or malformed."""


class GuestCrashError(KvmlabError):
    """The guest crashed (triple fault, unknown port, KVM could not emulate it).

    The message names the cause and includes the vCPU's registers.
    """


class GuestTimeoutError(KvmlabError, TimeoutError):
    """A call that must produce an answer in time did not."""


class SnapshotError(KvmlabError):
    """A snapshot is malformed, corrupt, or does not fit this VM.

    ``check`` names the check that refused it (e.g. ``"magic"``,
    ``"state_crc"``, ``"memory_crc"``, ``"shape"``, ``"damaged"``; the steps
    are listed in ``zigsrc/snapshot.zig`` and ``zigsrc/state.zig``).
    """


class ClosedError(KvmlabError):
    """The object was closed; create a new one."""


class BusyError(KvmlabError):
    """The object is in the wrong state for this call (e.g. already running)."""


class BoundsError(KvmlabError, IndexError):
    """A guest-physical address range lies outside guest memory."""


class PoolExhaustedError(KvmlabError):
    """The pool already has its maximum number of VMs in use."""


class IncompatibleError(KvmlabError):
    """A snapshot needs something this host's KVM cannot provide."""


class InternalError(KvmlabError):
    """A bug in kvmlab: please report it with the message."""


class PrepareError(KvmlabError):
    """``RestorePool.prepare``'s warmup raised or crashed the guest (``check``
    ``"warmup"``; ``__cause__`` is what it raised). Nothing stays prepared for
    that snapshot: fix the warmup and prepare again."""


def _rebuild(cls: type, args: tuple, attrs: dict) -> KvmlabError:
    err = cls(*args)
    err.__dict__.update(attrs)
    return err
