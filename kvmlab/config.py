"""VM configuration."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["VmConfig", "MIN_MEMORY_MIB", "MAX_MEMORY_MIB", "MAX_VCPUS"]

#: Limits of docs/guest-protocol.md (the core enforces them too).
MIN_MEMORY_MIB = 8
MAX_MEMORY_MIB = 4096
MAX_VCPUS = 8


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        m = self.memory_mib
        if not _is_int(m):
            raise ConfigError(f"memory_mib must be an int (MiB), got {m!r} ({type(m).__name__})")
        if not MIN_MEMORY_MIB <= m <= MAX_MEMORY_MIB:
            raise ConfigError(f"memory_mib={m} is out of range: use {MIN_MEMORY_MIB} .. {MAX_MEMORY_MIB}")
        if m % 2:
            raise ConfigError(f"memory_mib={m} must be even (guest memory is a multiple of 2 MiB): try {m + 1}")
        v = self.vcpus
        if not _is_int(v):
            raise ConfigError(f"vcpus must be an int, got {v!r} ({type(v).__name__})")
        if not 1 <= v <= MAX_VCPUS:
            raise ConfigError(f"vcpus={v} is out of range: use 1 .. {MAX_VCPUS}")

    @property
    def memory_bytes(self) -> int:
        """Guest memory size in bytes."""
        return self.memory_mib << 20
