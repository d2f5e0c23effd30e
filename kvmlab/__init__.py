"""kvmlab: KVM VM snapshot/restore experiments from Python.

    >>> import kvmlab
    >>> with kvmlab.Vm.boot("hello") as vm:
    ...     print(vm.run().console)
    hello from kvmlab guest

Importing kvmlab loads the native core (``kvmlab/_native/libkvmlab.so``) but
does not open /dev/kvm; ``kvmlab.doctor()`` (or ``kvmlab doctor``) checks a host.
"""

from importlib import metadata as _metadata

try:
    #: The installed distribution's version (pyproject.toml is its one source).
    __version__: str = _metadata.version("kvmlab")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

from . import errors, guests  # noqa: E402 - after __version__, which needs no native core
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
