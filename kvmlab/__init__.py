"""kvmlab: KVM VM snapshot/restore experiments from Python.

    >>> import kvmlab
    >>> with kvmlab.Vm.boot("hello") as vm:
    ...     print(vm.run().console)
    hello from kvmlab guest

Importing kvmlab loads the native core (``kvmlab/_native/libkvmlab.so``) but
does not open /dev/kvm; ``kvmlab.doctor()`` (or ``kvmlab doctor``) checks a host.
"""

from . import errors, guests
from ._version import __version__
from .config import VmConfig
from .doctor import DoctorReport, doctor
from .errors import *  # noqa: F403 - every exception class, listed once in errors.__all__
from .fork import ForkSet, fork_many
from .guests import Guest
from .pool import PoolConfig, PooledRestoreVm, PoolStats, RestorePool, RestoreTiming, timings_frame
from .snapshot import Snapshot
from .vm import RunResult, Vm

__all__ = [
    "__version__",
    "doctor",
    "DoctorReport",
    "fork_many",
    "ForkSet",
    "Snapshot",
    "RestorePool",
    "PoolConfig",
    "PoolStats",
    "RestoreTiming",
    "PooledRestoreVm",
    "timings_frame",
    "Vm",
    "VmConfig",
    "RunResult",
    "Guest",
    "guests",
    "errors",
    *errors.__all__,
]
