import struct

import pytest

from kvmlab import ConfigError, Guest, GuestError, Vm, guests
from kvmlab.guests import MAX_IMAGE_BYTES, format_args

BUILTINS = ["counter", "crash", "hello", "memtouch", "service", "spin"]


def test_builtin_names():
    assert set(BUILTINS) <= set(guests.names())
    assert guests.names() == sorted(guests.names())


def test_builtin_guest():
    g = Guest.builtin("hello")
    assert g.name == "hello"
    assert isinstance(g.image, bytes) and 0 < len(g.image) <= MAX_IMAGE_BYTES


def test_unknown_builtin_lists_available_names():
    with pytest.raises(GuestError) as e:
        Guest.builtin("nope")
    assert e.value.check == "unknown_guest"
    assert "nope" in str(e.value)  # and the message lists the names there are
    for n in BUILTINS:
        assert n in str(e.value)


def test_from_bytes_and_from_file(tmp_path):
    g = Guest.from_bytes(b"\xeb\xfe")
    assert (g.name, g.image) == ("custom", b"\xeb\xfe")
    p = tmp_path / "loop.bin"
    p.write_bytes(b"\xeb\xfe")
    f = Guest.from_file(p)
    assert (f.name, f.image) == ("loop", b"\xeb\xfe")
    assert Guest.from_file(str(p), name="x").name == "x"


def test_missing_file(tmp_path):
    with pytest.raises(GuestError) as e:
        Guest.from_file(tmp_path / "missing.bin")
    assert e.value.check == "image_missing"


def test_empty_file(tmp_path):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    with pytest.raises(GuestError) as e:
        Guest.from_file(p)
    assert e.value.check == "image_empty"


def test_directory_is_not_a_guest(tmp_path):
    with pytest.raises(GuestError):
        Guest.from_file(tmp_path)


def test_too_large_file(tmp_path):
    p = tmp_path / "big.bin"
    with open(p, "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(GuestError) as e:
        Guest.from_file(p)
    assert e.value.check == "image_size"
    with pytest.raises(GuestError):
        Guest.from_bytes(b"\x90" * (MAX_IMAGE_BYTES + 1))


def test_empty_bytes():
    with pytest.raises(GuestError):
        Guest.from_bytes(b"")


def _elf_header(phoff: int, phnum: int, entry: int = 0x100000) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, phnum, 0, 0, 0
    )


@pytest.mark.kvm
@pytest.mark.parametrize(
    "image",
    [
        _elf_header(phoff=0xFFFF_FFFF_FFFF_FFF0, phnum=1),  # program headers outside the file
        _elf_header(phoff=64, phnum=60000),  # absurd count
        _elf_header(phoff=64, phnum=1) + struct.pack("<IIQQQQQQ", 1, 5, 0, 0x100000, 0, 1 << 40, 1 << 40, 0),
        _elf_header(phoff=64, phnum=1) + struct.pack("<IIQQQQQQ", 1, 5, 0, 0x10, 0, 16, 16, 0),  # below 1 MiB
        _elf_header(phoff=64, phnum=1) + struct.pack("<IIQQQQQQ", 2, 5, 0, 0x100000, 0, 16, 16, 0),  # no PT_LOAD
        b"\x7fELF\x02\x01",  # truncated
    ],
    ids=["phoff-overflow", "phnum-huge", "segment-huge", "segment-low", "no-load", "truncated"],
)
def test_bad_elf_files(tmp_path, image):
    p = tmp_path / "bad.elf"
    p.write_bytes(image)
    with pytest.raises(GuestError):
        Vm.boot(p)


def test_format_args():
    assert format_args(None) == ""
    assert format_args({}) == ""
    assert format_args({"steps": 200, "checkpoint_at": 100}) == "steps=200 checkpoint_at=100"
    assert format_args({"mode": "fast"}) == "mode=fast"
    assert format_args("steps=3 x=y") == "steps=3 x=y"


@pytest.mark.parametrize(
    "args",
    [
        {"steps": -1},
        {"steps": True},
        {"steps": 1.5},
        {"steps": None},
        {"bad key": 1},
        {"1x": 1},
        {"": 1},
        {"mode": "two words"},
        {"mode": "a=b"},
        {"mode": ""},
        {"mode": "caf\u00e9"},
        {1: 2},
        "novalue",
        ["steps", 1],
        {"k": "x" * 5000},
    ],
)
def test_bad_args(args):
    with pytest.raises(ConfigError):
        format_args(args)
