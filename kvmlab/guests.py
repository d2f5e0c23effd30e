"""Guest images: the built-in guests shipped in ``kvmlab/_native/guests`` and
images from files or bytes (a flat binary loaded at 1 MiB, or a static x86_64
ELF). See docs/guest-protocol.md for what a guest is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from . import _ffi
from .errors import ConfigError, GuestError

__all__ = [
    "Guest",
    "names",
    "format_args",
    "build_zig",
    "guest_sdk_dir",
    "ZIG_GUEST_FLAGS",
    "MAX_IMAGE_BYTES",
    "MAX_ARGS_BYTES",
    "parser_outcome",
    "PARSER_WAIT_TAG",
    "INPUT_GPA",
]

#: A guest image is loaded into [1 MiB, 4 MiB) of guest memory.
MAX_IMAGE_BYTES = 3 << 20
#: The argument text lives in the boot-info page (4096 - 64 bytes, NUL included).
MAX_ARGS_BYTES = 4031

PathLike = Union[str, "os.PathLike[str]"]

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WORD_RE = re.compile(r"[!-~]+\Z")  # printable ASCII, no space


def names() -> list[str]:
    """Names of the built-in guests, sorted (``["counter", "crash", ...]``)."""
    d = _ffi.GUESTS_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.bin") if p.is_file())


def _check_image(data: bytes, what: str) -> bytes:
    if len(data) == 0:
        raise GuestError(f"{what} is empty: a guest image needs at least one instruction", check="image_empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise GuestError(
            f"{what} is {len(data)} bytes; a guest image must fit in {MAX_IMAGE_BYTES} bytes "
            "(3 MiB, loaded at 0x100000 .. 0x400000)",
            check="image_size",
        )
    return data


class Guest:
    """A guest image: ``name`` and ``image`` (the bytes booted).

    Build one with :meth:`builtin`, :meth:`from_file` or :meth:`from_bytes`.
    ELF images are fully validated by the core when booted.
    """

    __slots__ = ("name", "image", "path")

    def __init__(self, name: str, image: bytes, path: Path | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise GuestError(f"a guest name must be a non-empty str, got {name!r}", check="guest_name")
        self.name = name
        self.image = _check_image(bytes(image), f"guest image {name!r}")
        self.path = path

    @classmethod
    def builtin(cls, name: str) -> "Guest":
        """A built-in guest by name (see :func:`names`)."""
        available = names()
        if name not in available:
            if available:
                hint = "available: " + ", ".join(available)
            else:
                hint = f"no built-in guests are installed in {_ffi.GUESTS_DIR}; rebuild: pip install -e ."
            raise GuestError(f"unknown built-in guest {name!r}; {hint}", check="unknown_guest")
        path = _ffi.GUESTS_DIR / f"{name}.bin"
        return cls(name, path.read_bytes(), path)

    @classmethod
    def from_file(cls, path: PathLike, name: str | None = None) -> "Guest":
        """A guest image from a file: a flat binary or a static x86_64 ELF."""
        p = Path(os.fspath(path))
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise GuestError(f"guest image {str(p)!r} does not exist", check="image_missing") from None
        except OSError as e:
            raise GuestError(f"cannot read guest image {str(p)!r}: {e.strerror}", check="image_read") from None
        if not p.is_file():
            raise GuestError(f"guest image {str(p)!r} is not a regular file", check="image_file")
        if size > MAX_IMAGE_BYTES:
            # Do not read a huge file only to reject it.
            raise GuestError(
                f"guest image {str(p)!r} is {size} bytes; a guest image must fit in "
                f"{MAX_IMAGE_BYTES} bytes (3 MiB, loaded at 0x100000 .. 0x400000)",
                check="image_size",
            )
        try:
            data = p.read_bytes()
        except OSError as e:
            raise GuestError(f"cannot read guest image {str(p)!r}: {e.strerror}", check="image_read") from None
        _check_image(data, f"guest image {str(p)!r}")
        return cls(name or p.stem or "custom", data, p)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, name: str = "custom") -> "Guest":
        """A guest image from bytes (e.g. hand-assembled x86_64 code)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise GuestError(f"guest image must be bytes, got {type(data).__name__}", check="argument_type")
        return cls(name, bytes(data))

    @property
    def is_elf(self) -> bool:
        return self.image[:4] == b"\x7fELF"

    def __repr__(self) -> str:
        kind = "ELF" if self.is_elf else "flat"
        return f"Guest(name={self.name!r}, {kind}, {len(self.image)} bytes)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Guest):
            return NotImplemented
        return self.name == other.name and self.image == other.image

    def __hash__(self) -> int:
        return hash((self.name, self.image))


def format_args(args: Mapping[str, object] | str | None) -> str:
    """``{"steps": 200, "checkpoint_at": 100}`` -> ``"steps=200 checkpoint_at=100"``.

    Keys must be identifiers; values non-negative ints or plain words
    (printable ASCII without spaces or ``=``). A ``str`` is validated and
    returned as is. Raises :class:`~kvmlab.errors.ConfigError` otherwise.
    """
    if args is None:
        return ""
    if isinstance(args, str):
        pairs: list[tuple[str, object]] = []
        for item in args.split():
            name, sep, word = item.partition("=")
            if not sep:
                raise ConfigError(f"guest argument {item!r} is not key=value", check="guest_arg_syntax")
            pairs.append((name, word))
        items = pairs
    elif isinstance(args, Mapping):
        items = list(args.items())
    else:
        raise ConfigError(f"guest args must be a dict like {{'steps': 20}}, got {type(args).__name__}", check="argument_type")
    parts: list[str] = []
    for key, value in items:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ConfigError(f"guest argument name {key!r} must be an identifier (letters, digits, _)", check="guest_arg_name")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(
                f"guest argument {key}={value!r}: values are non-negative ints or plain words, "
                f"not {type(value).__name__}",
                check="guest_arg_value",
            )
        if isinstance(value, int):
            if value < 0:
                raise ConfigError(f"guest argument {key}={value}: ints must be non-negative", check="guest_arg_value")
            text = str(value)
        else:
            if not _WORD_RE.match(value) or "=" in value:
                raise ConfigError(
                    f"guest argument {key}={value!r}: a word must be non-empty printable ASCII "
                    "without spaces or '='",
                    check="guest_arg_value",
                )
            text = value
        parts.append(f"{key}={text}")
    out = " ".join(parts)
    if len(out) > MAX_ARGS_BYTES:
        raise ConfigError(f"guest arguments are {len(out)} bytes; the limit is {MAX_ARGS_BYTES}", check="guest_args_size")
    return out


# -- building your own guest in Zig ------------------------------------------------------

#: Files a guest build needs besides the user's source (the built-in guests'
#: runtime and linker script, see docs/guest-protocol.md "Image layout"; the
#: service protocol's definition, for guests that serve it). hatch_build.py
#: ships these in the wheel (it reads this tuple).
GUEST_SDK_FILES = ("rt.zig", "guest.ld", "service_protocol.zig")

#: The flags the built-in guests are compiled with (build.zig): freestanding
#: x86_64 for any CPU and without SSE/MMX (CPL0 guest code is emulated on
#: kvm_pvm hosts, whose emulator stops on SSE instructions), small, no red
#: zone, no PIC (linked at 0x100000), single-threaded, no stack probes.
ZIG_GUEST_FLAGS = (
    "-target", "x86_64-freestanding-none",
    "-mcpu=baseline-mmx-sse-sse2+soft_float",
    "-O", "ReleaseSmall",
    "-mno-red-zone",
    "-fstrip",
    "-fno-PIC",
    "-mcmodel=small",
    "-fsingle-threaded",
    "-fno-stack-check",
    "-fentry=_start",
)  # fmt: skip

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")


def guest_sdk_dir() -> Path:
    """The directory holding the guest SDK (:data:`GUEST_SDK_FILES`: ``rt.zig``,
    ``guest.ld``, ``service_protocol.zig``) for :func:`build_zig`.

    Looked up in this order: ``$KVMLAB_GUEST_SDK``; ``kvmlab/_native/guest_sdk``
    (installed packages); ``zigsrc/guests`` of the source tree this package
    lives in (editable installs). Raises :class:`GuestError` if none has both.
    """
    candidates = []
    env = os.environ.get("KVMLAB_GUEST_SDK")
    if env:
        candidates.append(Path(env))
    candidates.append(_ffi.NATIVE_DIR / "guest_sdk")
    candidates.append(Path(__file__).resolve().parent.parent / "zigsrc" / "guests")
    for d in candidates:
        if all((d / f).is_file() for f in GUEST_SDK_FILES):
            return d
    raise GuestError(
        f"the guest SDK ({', '.join(GUEST_SDK_FILES)}) was not found; looked in "
        + ", ".join(str(c) for c in candidates)
        + " (set KVMLAB_GUEST_SDK to a directory holding them, e.g. zigsrc/guests of a kvmlab checkout)",
        check="guest_sdk",
    )


def _zig_command() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("ziglang") is None:
        raise GuestError(
            "building a Zig guest needs the Zig compiler from PyPI: pip install \"kvmlab[guests]\" "
            "(it brings ziglang==0.17.1)",
            check="missing_extra",
        )
    return [sys.executable, "-m", "ziglang"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmlab" / "zig-guests"


def build_zig(
    source: Union[str, "os.PathLike[str]"],
    name: str = "custom",
    *,
    timeout_s: float = 300.0,
    keep_dir: PathLike | None = None,
) -> Guest:
    """Compiles a guest written in Zig and returns it as a :class:`Guest`.

    ``source`` is Zig source text (or a path to a ``.zig`` file) written
    against the guest runtime ``rt.zig`` like the built-in guests::

        const rt = @import("rt.zig");
        pub const panic = rt.panic;
        comptime { rt.exportEntry(main); }
        fn main(vcpu: u64) noreturn {
            if (vcpu == 0) rt.write("hi\\n");
            rt.exit(0);
        }

    It is compiled with the packaged Zig (``python -m ziglang``, PyPI
    ``ziglang``) for freestanding x86_64 (baseline CPU without SSE,
    ReleaseSmall, no red zone; see :data:`ZIG_GUEST_FLAGS`), linked at 0x100000 with ``guest.ld`` and flattened with
    ``zig objcopy -O binary``: the same recipe as the built-in guests. Zig's
    cache lives in ``~/.cache/kvmlab/zig-guests`` (a rebuild of unchanged
    source takes well under a second). ``keep_dir``: also leave the source,
    ELF and flat image there. Raises :class:`GuestError` with the compiler's
    messages when the source does not compile.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GuestError(f"guest name {name!r} must be an identifier-like word (letters, digits, _ or -)", check="guest_name")
    if isinstance(source, os.PathLike):
        try:
            text = Path(os.fspath(source)).read_text()
        except OSError as e:
            raise GuestError(f"cannot read Zig source {os.fspath(source)!r}: {e.strerror}", check="source_read") from None
    elif isinstance(source, str):
        text = source
    else:
        raise GuestError(f"source must be Zig source text or a path, got {type(source).__name__}", check="argument_type")
    if not text.strip():
        raise GuestError("the Zig source is empty", check="source_empty")
    sdk = guest_sdk_dir()
    zig = _zig_command()

    with tempfile.TemporaryDirectory(prefix="kvmlab-guest-") as tmp:
        work = Path(tmp)
        for f in GUEST_SDK_FILES:
            shutil.copyfile(sdk / f, work / f)
        # The root file's name only matters for error messages.
        src = work / f"{name.replace('-', '_')}.zig"
        src.write_text(text)
        elf = work / f"{name}.elf"
        image = work / f"{name}.bin"
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        steps = [
            zig + ["build-exe", src.name, *ZIG_GUEST_FLAGS, "-T", "guest.ld", "--name", name,
                   "--cache-dir", str(cache), f"-femit-bin={elf}"],
            zig + ["objcopy", "-O", "binary", str(elf), str(image)],
        ]  # fmt: skip
        for cmd in steps:
            try:
                p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise GuestError(f"zig {cmd[3]} did not finish within {timeout_s} s", check="guest_build_timeout") from None
            if p.returncode != 0:
                msg = (p.stderr or p.stdout).strip().replace(str(work) + os.sep, "")
                raise GuestError(f"zig {cmd[3]} failed for guest {name!r}:\n{msg}", check="guest_build")
        if keep_dir is not None:
            out = Path(os.fspath(keep_dir))
            out.mkdir(parents=True, exist_ok=True)
            for kept in (src, elf, image):
                shutil.copyfile(kept, out / kept.name)
        data = image.read_bytes()
    return Guest(name, _check_image(data, f"the image built from guest {name!r}"))


# -- IPython: %%kvmlab_guest -------------------------------------------------------------


def load_ipython_extension(ipython: Any) -> None:  # pragma: no cover - exercised through notebooks
    """``%load_ext kvmlab.guests`` registers the ``%%kvmlab_guest`` cell magic::

        %%kvmlab_guest hello2
        const rt = @import("rt.zig");
        ...

    compiles the cell with :func:`build_zig` and binds the :class:`Guest` to
    ``hello2`` in the notebook (the name is also the guest's name).
    """

    def kvmlab_guest(line: str, cell: str) -> None:
        words = line.split()
        if len(words) != 1 or not words[0].isidentifier():
            raise GuestError("usage: %%kvmlab_guest VARIABLE  (a Python identifier; the cell is the Zig source)", check="magic_usage")
        var = words[0]
        guest = build_zig(cell, name=var)
        ipython.user_ns[var] = guest
        print(f"built {guest!r} -> {var}")

    ipython.register_magic_function(kvmlab_guest, magic_kind="cell", magic_name="kvmlab_guest")


# -- the built-in `parser` guest (docs/guest-protocol.md, "parser details") ------------------

#: Where the host writes an input (the input protocol's default; the free area's start).
INPUT_GPA = 0x400000
#: The checkpoint tag at which `parser` waits for its input (the snapshot point).
PARSER_WAIT_TAG = 0x5E5E0002
#: Record types with a planted bug: 0x7F with len > 32 crashes, 0x3C with len 0 hangs.
PARSER_CRASH_TYPE = 0x7F
PARSER_HANG_TYPE = 0x3C
PARSER_NAME_BYTES = 32


def parser_outcome(data: bytes) -> tuple[str, int | None]:
    """What the `parser` guest does with input ``data``, from its specification:
    ``("exit", complete_records % 256)``, ``("crash", None)`` or ``("timeout", None)``.

    Records ``[type u8][len u8][len bytes]`` are parsed in order until the input
    ends or a record does not fit; the first complete record with a planted bug
    decides the outcome."""
    count = pos = 0
    while len(data) - pos >= 2:
        kind, n = data[pos], data[pos + 1]
        if len(data) - pos - 2 < n:
            break
        if kind == PARSER_CRASH_TYPE and n > PARSER_NAME_BYTES:
            return "crash", None
        if kind == PARSER_HANG_TYPE and n == 0:
            return "timeout", None
        count += 1
        pos += 2 + n
    return "exit", count % 256
