"""The binding to libkvmlab: the only module that imports cffi.

ABI mode: the generated header ``_native/kvmlab.h`` (rendered from
``zigsrc/capi/``, no preprocessor lines) is given to ``ffi.cdef`` as is, and
``_native/libkvmlab.so`` is opened with ``ffi.dlopen``. Every function and
struct in the header is therefore reachable as ``lib.<name>`` and
``ffi.new("kvmlab_<struct> *")`` without changes here.

The testing export group (benchmark floors, fault injection), declared in
``_native/kvmlab_testing.h``, is a separate lib object, :data:`testing`, used
only by ``kvmlab.bench`` and the fault tests; :data:`lib` has the product ABI.

Names come from the header, never from tables here: :func:`enum_names` and
:func:`enum_values` read any ``kvmlab_*`` enum through cffi, with the exact
spelling gen_header.zig emits (``KVMLAB_<TYPE>_<TAG>``; ``KVMLAB_<TAG>`` for
``kvmlab_result``).

At import this module checks that the library and the header agree:

* ``kvmlab_abi_version()`` equals :data:`ABI_VERSION`;
* for every enumerator ``KVMLAB_STRUCT_ID_<X>`` of ``kvmlab_struct_id``,
  ``kvmlab_struct_size(id)`` equals ``ffi.sizeof("kvmlab_<x>")``.

(A result code without its own exception class is not refused: it raises a
plain :class:`KvmlabError`, see ``_ERROR_CLASSES``.)

Any mismatch, or a missing library, raises ``ImportError`` saying what to do:
rebuild (a source checkout) or reinstall/report (an installed wheel). On
anything but x86_64 Linux the import fails and says so. Loading the library
does not open /dev/kvm.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any

import cffi

from . import errors as _errors

__all__ = [
    "ABI_VERSION",
    "NATIVE_DIR",
    "HEADER_PATH",
    "TESTING_HEADER_PATH",
    "LIBRARY_PATH",
    "GUESTS_DIR",
    "RESULTS",
    "ffi",
    "lib",
    "testing",
    "testing_ffi",
    "check",
    "error_for",
    "enum_names",
    "enum_values",
    "last_error_message",
    "last_error_check",
    "struct_ids",
    "struct_from_bytes",
]

#: The C ABI version this binding was written for (``abi_version`` in capi/common.zig).
ABI_VERSION = 5


def _fix_hint() -> str:
    """What to do when the native core does not load, for this kind of install."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "build.zig").is_file() and (checkout / "zigsrc").is_dir():
        return (
            f"this is a source checkout ({checkout}): rebuild the native core with "
            "`python -m ziglang build native -Dcpu=baseline --release=safe` or `pip install -e .` there"
        )
    from importlib import metadata

    try:
        urls = metadata.metadata("kvmlab").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    issues = next((u.split(",", 1)[1].strip() for u in urls if u.lower().startswith("issues,")), "")
    where = f" at {issues}" if issues else ""
    return (
        "this is an installed kvmlab: reinstall it (`pip install --force-reinstall kvmlab`); "
        f"if that does not help, report this message{where}"
    )


#: What a load failure tells the user to do (rebuild a checkout, or reinstall / report a wheel).
_REBUILD_HINT = _fix_hint()

#: Where the build puts the native artifacts. ``KVMLAB_NATIVE_DIR`` overrides it
#: (for trying a library built elsewhere).
NATIVE_DIR = Path(os.environ.get("KVMLAB_NATIVE_DIR") or Path(__file__).resolve().parent / "_native")
HEADER_PATH = NATIVE_DIR / "kvmlab.h"
TESTING_HEADER_PATH = NATIVE_DIR / "kvmlab_testing.h"
LIBRARY_PATH = NATIVE_DIR / "libkvmlab.so"
GUESTS_DIR = NATIVE_DIR / "guests"

#: The exception class of each result name of the header (``kvmlab_result``);
#: a code the header adds later still raises a :class:`KvmlabError`.
_ERROR_CLASSES: dict[str, type[_errors.KvmlabError]] = {
    "out_of_memory": _errors.KvmlabMemoryError,
    "kvm_unavailable": _errors.KvmUnavailableError,
    "kvm_failed": _errors.KvmError,
    "config": _errors.ConfigError,
    "guest": _errors.GuestError,
    "guest_crash": _errors.GuestCrashError,
    "timeout": _errors.GuestTimeoutError,
    "snapshot": _errors.SnapshotError,
    "closed": _errors.ClosedError,
    "busy": _errors.BusyError,
    "bounds": _errors.BoundsError,
    "pool_exhausted": _errors.PoolExhaustedError,
    "incompatible": _errors.IncompatibleError,
    "internal": _errors.InternalError,
}


def _enum_prefix(ctype: str) -> str:
    """The constant prefix gen_header.zig gives the enum ``ctype`` (``enumPrefix``)."""
    return "KVMLAB_" if ctype == "kvmlab_result" else ctype.upper() + "_"


def _read_enum(ffi_: cffi.FFI, ctype: str) -> dict[int, str]:
    """``{value: name}`` of the header's enum ``ctype``, names as in capi (lower case)."""
    t = ffi_.typeof(ctype)
    if t.kind != "enum":
        raise ImportError(f"{ctype} is not an enum in the header: {_REBUILD_HINT}")
    prefix = _enum_prefix(ctype)
    out: dict[int, str] = {}
    for value, constant in t.elements.items():
        if not constant.startswith(prefix):
            raise ImportError(f"{ctype} constant {constant} lacks the prefix {prefix}: {_REBUILD_HINT}")
        out[int(value)] = constant[len(prefix):].lower()
    return dict(sorted(out.items()))


def _load() -> tuple[cffi.FFI, Any, cffi.FFI, Any, dict[str, int]]:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise ImportError(
            f"kvmlab runs only on x86_64 Linux (its core drives x86_64 KVM through /dev/kvm); "
            f"this is {sys.platform}/{platform.machine()}"
        )
    missing = [str(p) for p in (HEADER_PATH, TESTING_HEADER_PATH, LIBRARY_PATH) if not p.is_file()]
    if missing:
        raise ImportError(f"kvmlab's native core is missing ({', '.join(missing)}): {_REBUILD_HINT}")
    ffi_ = cffi.FFI()
    testing_ffi_ = cffi.FFI()
    try:
        ffi_.cdef(HEADER_PATH.read_text(encoding="utf-8"))
        testing_ffi_.include(ffi_)
        testing_ffi_.cdef(TESTING_HEADER_PATH.read_text(encoding="utf-8"))
    except (cffi.CDefError, cffi.FFIError) as e:
        raise ImportError(f"kvmlab's headers in {NATIVE_DIR} cannot be parsed ({e}): {_REBUILD_HINT}") from e
    try:
        lib_ = ffi_.dlopen(str(LIBRARY_PATH))
        testing_ = testing_ffi_.dlopen(str(LIBRARY_PATH))
    except OSError as e:
        raise ImportError(f"cannot load kvmlab's native core {LIBRARY_PATH} ({e}): {_REBUILD_HINT}") from e

    try:
        version = int(lib_.kvmlab_abi_version())
    except AttributeError as e:
        raise ImportError(f"{LIBRARY_PATH} is not a kvmlab core ({e}): {_REBUILD_HINT}") from e
    if version != ABI_VERSION:
        raise ImportError(
            f"kvmlab's native core has ABI version {version} but this Python package expects "
            f"{ABI_VERSION}: {_REBUILD_HINT}"
        )
    by_struct: dict[str, int] = {}
    for sid, name in _read_enum(ffi_, "kvmlab_struct_id").items():
        struct_name = "kvmlab_" + name
        try:
            mine = ffi_.sizeof(struct_name)
        except (cffi.FFIError, cffi.CDefError) as e:
            raise ImportError(f"{HEADER_PATH}: struct id {name} names no struct {struct_name}: {_REBUILD_HINT}") from e
        native = int(lib_.kvmlab_struct_size(sid))
        if native != mine:
            raise ImportError(
                f"struct {struct_name} is {native} bytes in {LIBRARY_PATH.name} but {mine} bytes in "
                f"{HEADER_PATH.name}: the header and the library are from different builds; {_REBUILD_HINT}"
            )
        by_struct[struct_name] = sid
    return ffi_, lib_, testing_ffi_, testing_, by_struct


ffi, lib, testing_ffi, testing, _STRUCT_IDS = _load()


@functools.cache
def enum_names(ctype: str) -> dict[int, str]:
    """``{value: name}`` of a ``kvmlab_*`` enum of either header, e.g.
    ``enum_names("kvmlab_run_reason")[0] == "exit"``."""
    try:
        return _read_enum(ffi, ctype)
    except (cffi.FFIError, cffi.CDefError):
        return _read_enum(testing_ffi, ctype)


@functools.cache
def enum_values(ctype: str) -> dict[str, int]:
    """``{name: value}`` of a ``kvmlab_*`` enum, in declaration order of values."""
    return {name: value for value, name in sorted(enum_names(ctype).items())}


#: ``{code: (name, exception class)}`` for every result code of the header
#: (0 is success: class None).
RESULTS: dict[int, tuple[str, type[_errors.KvmlabError] | None]] = {
    code: (name, None if code == 0 else _ERROR_CLASSES.get(name, _errors.KvmlabError))
    for code, name in enum_names("kvmlab_result").items()
}


def struct_ids() -> dict[str, int]:
    """``{"kvmlab_vm_config": 1, ...}``: the structs checked at import."""
    return dict(_STRUCT_IDS)


def last_error_message() -> str:
    """The core's message for this thread's last failed call ("" if none)."""
    p = lib.kvmlab_last_error_message()
    if p == ffi.NULL:
        return ""
    return ffi.string(p).decode("utf-8", errors="replace")


def last_error_check() -> str | None:
    """The id of the check that refused this thread's last failed call
    (``kvmlab_check``, e.g. ``"cpuid_leaf"``), or None."""
    name = enum_names("kvmlab_check").get(int(lib.kvmlab_last_error_check()))
    return None if name in (None, "none") else name


def error_for(rc: int, message: str | None = None) -> _errors.KvmlabError:
    """The exception for result code ``rc`` (not raised). It carries the id
    of the check that refused the call (``KvmlabError.check``, from the core's
    ``kvmlab_check``), read on this thread like the message."""
    name, cls = RESULTS.get(rc, (f"unknown result {rc}", _errors.KvmlabError))
    if cls is None:
        raise ValueError("result code 0 is success, not an error")
    text = message if message is not None else last_error_message()
    if not text:
        text = f"kvmlab core call failed ({name})"
    return cls(text, check=last_error_check())


def check(rc: int) -> None:
    """Raises the exception for a failed result code; returns on success (0).

    Call it right after the native call, on the same thread: the message is
    per-thread and replaced by the next call.
    """
    rc = int(rc)
    if rc == 0:
        return
    raise error_for(rc)


def struct_from_bytes(ctype: str, raw: bytes | bytearray | memoryview) -> Any:
    """A ``ctype *`` holding a copy of the struct at the start of ``raw``
    (e.g. ``kvmlab_snapshot_header``: read fields by name, not offset)."""
    n = ffi.sizeof(ctype)
    if len(raw) < n:
        raise ValueError(f"{ctype} is {n} bytes, got {len(raw)}")
    p = ffi.new(ctype + " *")
    ffi.memmove(p, bytes(raw[:n]), n)
    return p


@functools.cache
def field_names(ctype: str) -> tuple[str, ...]:
    """The field names of a struct of the header, in order (looked up once)."""
    return tuple(name for name, _f in ffi.typeof(ctype).fields)


def as_dict(cdata: Any, ctype: str) -> dict[str, int]:
    """A struct of integers as a dict (``ctype`` names its type)."""
    return {name: int(getattr(cdata, name)) for name in field_names(ctype)}
