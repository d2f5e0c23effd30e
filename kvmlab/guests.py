"""Guest images: the built-in guests shipped in ``kvmlab/_native/guests`` and
images from files or bytes (a flat binary loaded at 1 MiB, or a static x86_64
ELF). See docs/guest-protocol.md for what a guest is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from . import _ffi
from .errors import ConfigError, GuestError

__all__ = ["Guest", "names", "format_args", "MAX_IMAGE_BYTES", "MAX_ARGS_BYTES"]

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
        raise GuestError(f"{what} is empty: a guest image needs at least one instruction")
    if len(data) > MAX_IMAGE_BYTES:
        raise GuestError(
            f"{what} is {len(data)} bytes; a guest image must fit in {MAX_IMAGE_BYTES} bytes "
            "(3 MiB, loaded at 0x100000 .. 0x400000)"
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
            raise GuestError(f"a guest name must be a non-empty str, got {name!r}")
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
            raise GuestError(f"unknown built-in guest {name!r}; {hint}")
        path = _ffi.GUESTS_DIR / f"{name}.bin"
        return cls(name, path.read_bytes(), path)

    @classmethod
    def from_file(cls, path: PathLike, name: str | None = None) -> "Guest":
        """A guest image from a file: a flat binary or a static x86_64 ELF."""
        p = Path(os.fspath(path))
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise GuestError(f"guest image {str(p)!r} does not exist") from None
        except OSError as e:
            raise GuestError(f"cannot read guest image {str(p)!r}: {e.strerror}") from None
        if not p.is_file():
            raise GuestError(f"guest image {str(p)!r} is not a regular file")
        if size > MAX_IMAGE_BYTES:
            # Do not read a huge file only to reject it.
            raise GuestError(
                f"guest image {str(p)!r} is {size} bytes; a guest image must fit in "
                f"{MAX_IMAGE_BYTES} bytes (3 MiB, loaded at 0x100000 .. 0x400000)"
            )
        try:
            data = p.read_bytes()
        except OSError as e:
            raise GuestError(f"cannot read guest image {str(p)!r}: {e.strerror}") from None
        _check_image(data, f"guest image {str(p)!r}")
        return cls(name or p.stem or "custom", data, p)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, name: str = "custom") -> "Guest":
        """A guest image from bytes (e.g. hand-assembled x86_64 code)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise GuestError(f"guest image must be bytes, got {type(data).__name__}")
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
        pairs = []
        for item in args.split():
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"guest argument {item!r} is not key=value")
            pairs.append((key, value))
        items = pairs
    elif isinstance(args, Mapping):
        items = list(args.items())
    else:
        raise ConfigError(f"guest args must be a dict like {{'steps': 20}}, got {type(args).__name__}")
    parts = []
    for key, value in items:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ConfigError(f"guest argument name {key!r} must be an identifier (letters, digits, _)")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(
                f"guest argument {key}={value!r}: values are non-negative ints or plain words, "
                f"not {type(value).__name__}"
            )
        if isinstance(value, int):
            if value < 0:
                raise ConfigError(f"guest argument {key}={value}: ints must be non-negative")
            text = str(value)
        else:
            if not _WORD_RE.match(value) or "=" in value:
                raise ConfigError(
                    f"guest argument {key}={value!r}: a word must be non-empty printable ASCII "
                    "without spaces or '='"
                )
            text = value
        parts.append(f"{key}={text}")
    out = " ".join(parts)
    if len(out) > MAX_ARGS_BYTES:
        raise ConfigError(f"guest arguments are {len(out)} bytes; the limit is {MAX_ARGS_BYTES}")
    return out
