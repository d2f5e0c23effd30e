"""The binding to libkvmlab: the only module that imports cffi.

ABI mode: the generated header ``_native/kvmlab.h`` (rendered from
``zigsrc/capi.zig``, no preprocessor lines) is given to ``ffi.cdef`` as is, and
``_native/libkvmlab.so`` is opened with ``ffi.dlopen``. Every function and
struct in the header is therefore reachable as ``lib.<name>`` and
``ffi.new("kvmlab_<struct> *")`` without changes here.

At import this module checks that the library and the header agree:

* ``kvmlab_abi_version()`` equals :data:`ABI_VERSION`;
* for every enumerator of ``kvmlab_struct_id``, ``kvmlab_struct_size(id)``
  equals ``ffi.sizeof`` of the matching ``kvmlab_*`` struct.

Any mismatch, or a missing library, raises ``ImportError`` saying what to do:
rebuild (a source checkout) or reinstall/report (an installed wheel). On
anything but x86_64 Linux the import fails and says so. Loading the library
does not open /dev/kvm.

Result codes: :data:`RESULTS` is the one table mapping each code of the C ABI
to an exception class; :func:`check` raises it with the core's message.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import cffi

from . import errors as _errors

__all__ = [
    "ABI_VERSION",
    "NATIVE_DIR",
    "HEADER_PATH",
    "LIBRARY_PATH",
    "GUESTS_DIR",
    "RESULTS",
    "ffi",
    "lib",
    "check",
    "error_for",
    "last_error_message",
    "struct_ids",
]

#: The C ABI version this binding was written for (``abi_version`` in capi.zig).
ABI_VERSION = 2


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
LIBRARY_PATH = NATIVE_DIR / "libkvmlab.so"
GUESTS_DIR = NATIVE_DIR / "guests"

#: The one table of result codes (zigsrc/errors.zig ``Result``):
#: code -> (name, exception class). 0 is success.
RESULTS: dict[int, tuple[str, type[_errors.KvmlabError] | None]] = {
    0: ("ok", None),
    -1: ("out_of_memory", _errors.KvmlabMemoryError),
    -2: ("kvm_unavailable", _errors.KvmUnavailableError),
    -3: ("kvm_failed", _errors.KvmError),
    -4: ("config", _errors.ConfigError),
    -5: ("guest", _errors.GuestError),
    -6: ("guest_crash", _errors.GuestCrashError),
    -7: ("timeout", _errors.GuestTimeoutError),
    -8: ("snapshot", _errors.SnapshotError),
    -9: ("closed", _errors.ClosedError),
    -10: ("busy", _errors.BusyError),
    -11: ("bounds", _errors.BoundsError),
    -12: ("pool_exhausted", _errors.PoolExhaustedError),
    -13: ("incompatible", _errors.IncompatibleError),
    -99: ("internal", _errors.InternalError),
}


def _normalize_enumerator(name: str, *prefixes: str) -> str:
    """``KVMLAB_RESULT_OUT_OF_MEMORY`` -> ``out_of_memory`` (given the prefixes)."""
    n = name.lower()
    for p in prefixes:
        if n.startswith(p):
            return n[len(p):]
    return n


def _enum_elements(ffi_: cffi.FFI, header: str, type_name: str) -> dict[str, int] | None:
    """Enumerators of the C enum ``type_name`` (typedef or tag), or None if absent."""
    for spelling in (type_name, "enum " + type_name):
        try:
            t = ffi_.typeof(spelling)
        except (ffi_.error, cffi.CDefError):
            continue
        if t.kind == "enum":
            return {name: int(value) for name, value in t.relements.items()}
    # Not an enum type in the header: look for named constants carrying the
    # type's name as prefix (e.g. `#define`-free `static const int`s are not
    # possible in a cdef, but an anonymous enum is).
    prefix = type_name.upper() + "_"
    found: dict[str, int] = {}
    for m in re.finditer(r"\b(%s\w+)\s*=" % re.escape(prefix), header, flags=re.IGNORECASE):
        try:
            found[m.group(1)] = int(ffi_.integer_const(m.group(1)))
        except (ffi_.error, AttributeError, KeyError):
            pass
    return found or None


def _struct_typedefs(ffi_: cffi.FFI) -> set[str]:
    """Names ``kvmlab_*`` that the header declares as complete structs."""
    typedefs, structs, _unions = ffi_.list_types()
    names = set()
    for n in typedefs:
        if not n.startswith("kvmlab_"):
            continue
        t = ffi_.typeof(n)
        if t.kind == "struct" and t.fields is not None:
            names.add(n)
    for n in structs:
        if n.startswith("kvmlab_") and ffi_.typeof("struct " + n).fields is not None:
            names.add(n)
    return names


def _struct_for_enumerator(enumerator: str, struct_names: set[str]) -> str | None:
    """Matches ``KVMLAB_STRUCT_ID_VM_CONFIG`` (any spelling) to ``kvmlab_vm_config``."""
    e = enumerator.lower()
    best = None
    for s in struct_names:
        suffix = s[len("kvmlab_"):]
        if e == suffix or e.endswith("_" + suffix):
            if best is None or len(suffix) > len(best) - len("kvmlab_"):
                best = s
    return best


def _load() -> tuple[cffi.FFI, object, dict[str, int]]:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise ImportError(
            f"kvmlab runs only on x86_64 Linux (its core drives x86_64 KVM through /dev/kvm); "
            f"this is {sys.platform}/{platform.machine()}"
        )
    if not HEADER_PATH.is_file() or not LIBRARY_PATH.is_file():
        missing = [str(p) for p in (HEADER_PATH, LIBRARY_PATH) if not p.is_file()]
        raise ImportError(f"kvmlab's native core is missing ({', '.join(missing)}): {_REBUILD_HINT}")
    header = HEADER_PATH.read_text(encoding="utf-8")
    ffi_ = cffi.FFI()
    try:
        ffi_.cdef(header)
    except (cffi.CDefError, cffi.FFIError) as e:
        raise ImportError(f"kvmlab's header {HEADER_PATH} cannot be parsed ({e}): {_REBUILD_HINT}") from e
    try:
        lib_ = ffi_.dlopen(str(LIBRARY_PATH))
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

    ids = _enum_elements(ffi_, header, "kvmlab_struct_id")
    if not ids:
        raise ImportError(f"{HEADER_PATH} has no kvmlab_struct_id enum: {_REBUILD_HINT}")
    structs = _struct_typedefs(ffi_)
    by_struct: dict[str, int] = {}
    for enumerator, sid in ids.items():
        s = _struct_for_enumerator(enumerator, structs)
        if s is None:
            raise ImportError(
                f"{HEADER_PATH}: struct id {enumerator}={sid} names no kvmlab_* struct in the header: {_REBUILD_HINT}"
            )
        native = int(lib_.kvmlab_struct_size(sid))
        mine = ffi_.sizeof(s)
        if native != mine:
            raise ImportError(
                f"struct {s} is {native} bytes in {LIBRARY_PATH.name} but {mine} bytes in "
                f"{HEADER_PATH.name}: the header and the library are from different builds; {_REBUILD_HINT}"
            )
        by_struct[s] = sid

    codes = _enum_elements(ffi_, header, "kvmlab_result")
    if codes:
        known = {name: code for code, (name, _cls) in RESULTS.items()}
        for enumerator, code in codes.items():
            name = _normalize_enumerator(enumerator, "kvmlab_result_", "kvmlab_")
            if name in known and known[name] != code:
                raise ImportError(
                    f"result code {enumerator} is {code} in {HEADER_PATH.name} but kvmlab expects "
                    f"{known[name]}: {_REBUILD_HINT}"
                )
            if code not in RESULTS:
                # A code added to the core after this binding: still raise a KvmlabError.
                RESULTS[code] = (name, _errors.KvmlabError)
    return ffi_, lib_, by_struct


ffi, lib, _STRUCT_IDS = _load()


def struct_ids() -> dict[str, int]:
    """``{"kvmlab_vm_config": 1, ...}``: the structs checked at import."""
    return dict(_STRUCT_IDS)


def last_error_message() -> str:
    """The core's message for this thread's last failed call ("" if none)."""
    p = lib.kvmlab_last_error_message()
    if p == ffi.NULL:
        return ""
    return ffi.string(p).decode("utf-8", errors="replace")


def error_for(rc: int, message: str | None = None) -> _errors.KvmlabError:
    """The exception for result code ``rc`` (not raised)."""
    name, cls = RESULTS.get(rc, (f"unknown result {rc}", _errors.KvmlabError))
    if cls is None:
        raise ValueError("result code 0 is success, not an error")
    text = message if message is not None else last_error_message()
    if not text:
        text = f"kvmlab core call failed ({name})"
    return cls(text)


def check(rc: int) -> None:
    """Raises the exception for a failed result code; returns on success (0).

    Call it right after the native call, on the same thread: the message is
    per-thread and replaced by the next call.
    """
    rc = int(rc)
    if rc == 0:
        return
    raise error_for(rc)


@functools.cache
def field_names(ctype: str) -> tuple[str, ...]:
    """The field names of a struct of the header, in order (looked up once)."""
    return tuple(name for name, _f in ffi.typeof(ctype).fields)


def as_dict(cdata: Any, ctype: str) -> dict[str, int]:
    """A struct of integers as a dict (``ctype`` names its type)."""
    return {name: int(getattr(cdata, name)) for name in field_names(ctype)}
