"""VM and pool configuration, and the checks of every argument at the API boundary.

A bad argument raises :class:`~kvmlab.errors.ConfigError` whose ``check``
attribute is a machine-readable id (``"argument_type"``, ``"argument_range"``,
``"argument_path"``, ``"argument_buffer"``, ``"argument_value"`` for a name not
in a fixed set) and whose ``argument`` names the
parameter; the message says what to pass instead. The helpers below are the
one place these checks are written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, NoReturn

from .errors import BoundsError, ConfigError

__all__ = ["VmConfig", "MIN_MEMORY_MIB", "MAX_MEMORY_MIB", "MAX_VCPUS", "MAX_TIMEOUT_S"]

#: Limits of docs/guest-protocol.md (the core enforces them too).
MIN_MEMORY_MIB = 8
MAX_MEMORY_MIB = 4096
MAX_VCPUS = 8


#: The longest deadline accepted (~31 years; the core counts u64 nanoseconds).
#: None (or +inf) means no deadline.
MAX_TIMEOUT_S = 1e9

#: Largest value of a u32 field of the C ABI.
U32_MAX = 2**32 - 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def bad_argument(check: str, argument: str, message: str) -> NoReturn:
    """Raises ConfigError(message) with ``.check`` and ``.argument`` set."""
    err = ConfigError(message)
    err.check = check
    err.argument = argument  # type: ignore[attr-defined]
    raise err


def check_int(argument: str, v: object, lo: int, hi: int) -> int:
    """``v`` as an int in ``lo .. hi`` (bool is not an int here)."""
    if not _is_int(v):
        bad_argument("argument_type", argument, f"{argument} must be an int, got {v!r} ({type(v).__name__})")
    if not lo <= v <= hi:  # type: ignore[operator]
        use = f"{lo} .. {hi}" if hi <= U32_MAX else f"an int >= {lo}"
        bad_argument("argument_range", argument, f"{argument}={v} is out of range: use {use}")
    return v  # type: ignore[return-value]


def check_type(argument: str, v: Any, cls: type, what: str | None = None) -> Any:
    """``v`` if it is a ``cls``."""
    if not isinstance(v, cls):
        bad_argument("argument_type", argument, f"{argument} must be {what or 'a ' + cls.__name__}, got {type(v).__name__}")
    return v


def check_choice(argument: str, v: object, choices: Mapping[str, int]) -> int:
    """The code of the name ``v`` in ``choices`` (a name -> code table)."""
    try:
        return choices[v]  # type: ignore[index]
    except (KeyError, TypeError):
        bad_argument("argument_value", argument, f"{argument}={v!r}: use one of {', '.join(choices)}")


def timeout_ns(timeout_s: object, argument: str = "timeout_s") -> int:
    """Seconds -> the core's ``timeout_ns`` (0 = no deadline: None or +inf)."""
    if timeout_s is None:
        return 0
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        bad_argument("argument_type", argument, f"{argument} must be a number of seconds or None, got {timeout_s!r}")
    if timeout_s == math.inf:
        return 0
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # also refuses nan
        bad_argument(
            "argument_range", argument,
            f"{argument}={timeout_s!r} is out of range: use 0 < seconds <= {MAX_TIMEOUT_S:g}, or None for no deadline",
        )
    return max(1, int(timeout_s * 1_000_000_000))


def check_path(argument: str, path: object) -> str:
    """A file system path (str or PathLike) as str; a NUL byte would cut it short."""
    try:
        p = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        bad_argument("argument_type", argument, f"{argument} must be a path (str or os.PathLike), got {type(path).__name__}")
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if "\0" in p or not p:
        bad_argument("argument_path", argument, f"{argument}={p!r} is empty or contains a NUL byte: pass a plain path")
    return p


def check_buffer(argument: str, data: object) -> memoryview:
    """A bytes-like object as a flat byte view (no copy)."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        bad_argument("argument_type", argument, f"{argument} must be bytes-like (bytes, bytearray, memoryview), got {type(data).__name__}")
    if not view.c_contiguous:
        bad_argument(
            "argument_buffer", argument,
            f"{argument} is a non-contiguous buffer (e.g. a strided slice): pass bytes({argument}) or a contiguous copy",
        )
    return view.cast("B")


def check_range(gpa: int, n: int, memory_bytes: int) -> None:
    """Checks that guest-physical ``gpa .. gpa + n`` lies in guest memory (:class:`BoundsError` if not)."""
    for what, v in (("gpa", gpa), ("length", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            bad_argument("argument_type", what, f"{what} must be an int, got {v!r}")
    if gpa < 0 or n < 0 or gpa + n > memory_bytes:
        raise BoundsError(
            f"guest range 0x{gpa:x}+{n} is outside guest memory (0x0..0x{memory_bytes:x}); "
            f"addresses are guest-physical, 0 <= gpa and gpa + length <= {memory_bytes}",
            check="gpa_out_of_range",
        )


@dataclass(frozen=True)
class VmConfig:
    """The shape of a VM: guest memory in MiB and the number of vCPUs.

    ``memory_mib`` must be an int in 8 .. 4096 and even (guest memory is mapped
    with 2 MiB pages); ``vcpus`` an int in 1 .. 8. Invalid values raise
    :class:`~kvmlab.errors.ConfigError`.
    """

    memory_mib: int = 64
    vcpus: int = 1

    def __post_init__(self) -> None:
        m = check_int("memory_mib", self.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
        if m % 2:
            bad_argument(
                "argument_range", "memory_mib",
                f"memory_mib={m} must be even (guest memory is a multiple of 2 MiB): try {m + 1}",
            )
        check_int("vcpus", self.vcpus, 1, MAX_VCPUS)

    @property
    def memory_bytes(self) -> int:
        """Guest memory size in bytes."""
        return self.memory_mib << 20


#: The core's limit on ``PoolConfig.max_size`` (``max_pool_size`` in zigsrc/pool.zig).
MAX_POOL_SIZE = 256


def _int(name: str, v: object, lo: int, hi: int = U32_MAX) -> int:
    return check_int(f"PoolConfig {name}", v, lo, hi)


@dataclass(frozen=True)
class PoolConfig:
    """Pool bounds. ``max_size`` caps idle shells; ``max_in_use`` (None =
    unlimited) caps VMs handed out at once.

    Attributes:
        min_size: idle shells the worker keeps ready (refilled in the background).
        max_size: idle shells at most (1 .. 256).
        max_in_use: VMs handed out at once at most (None: no limit).

    Raises:
        ConfigError: a bound is not an int or out of range.
    """

    min_size: int = 1
    max_size: int = 4
    max_in_use: int | None = None

    def __post_init__(self) -> None:
        _int("min_size", self.min_size, 0)
        _int("max_size", self.max_size, 0)
        if self.max_size == 0:
            bad_argument("argument_range", "PoolConfig max_size", "PoolConfig max_size must be at least 1")
        if self.max_size > MAX_POOL_SIZE:
            bad_argument(
                "argument_range", "PoolConfig max_size",
                f"PoolConfig max_size={self.max_size} is over the limit of {MAX_POOL_SIZE}",
            )
        if self.min_size > self.max_size:
            bad_argument(
                "argument_range", "PoolConfig min_size",
                f"PoolConfig min_size={self.min_size} is larger than max_size={self.max_size}",
            )
        if self.max_in_use is not None:
            _int("max_in_use", self.max_in_use, 1)
