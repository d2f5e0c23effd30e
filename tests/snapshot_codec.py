"""A small reader/writer of the snapshot format, for tests only.

The file header and section table are ``kvmlab_snapshot_header`` and
``kvmlab_snapshot_section`` of the C ABI: every offset, size, kind and flag
here is read from the generated header through cffi (``_ffi.ffi``), none is
written by hand. The STATE blob (``zigsrc/state.zig``) is not in the ABI; its
few constants are below. Tests craft corrupt or hostile snapshots from a real
``to_bytes()`` output: edit a field, then (for checks that come after the
checksums) recompute the CRC32Cs with :func:`crc32c`. Nothing here calls the
native core.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmlab import _ffi

_HEADER = "kvmlab_snapshot_header"
_SECTION = "kvmlab_snapshot_section"


def _off(field: str) -> int:
    return _ffi.ffi.offsetof(_HEADER, field)


HEADER_BYTES = 4096  # the header block (the struct, then zeros): snapshot.zig header_bytes
PAGE = 4096
SECTION_TABLE = _off("sections")
SECTION_ENTRY = _ffi.ffi.sizeof(_SECTION)
MAX_SECTIONS = len(_ffi.ffi.new(_HEADER + " *").sections)
KIND_STATE = _ffi.enum_values("kvmlab_section_kind")["state"]
KIND_MEMORY = _ffi.enum_values("kvmlab_section_kind")["memory"]
FLAG_PACKED = _ffi.enum_values("kvmlab_snapshot_flag")["packed_memory"]

#: Header field name -> offset, and section entry field name -> offset, from the ABI structs.
OFF = {name: field.offset for name, field in _ffi.ffi.typeof(_HEADER).fields}
SEC = {name: field.offset for name, field in _ffi.ffi.typeof(_SECTION).fields}
#: Section table entry fields: name -> (offset in the entry, width).
SECTION_FIELDS = {"kind": (SEC["kind"], 4), "offset": (SEC["offset"], 8), "bytes": (SEC["bytes"], 8), "crc": (SEC["crc32c"], 4)}

# STATE blob (state.zig).
STATE_HEADER = 32
RECORD_HEADER = 16
VM_WIDE = 0xFFFF_FFFF
TAG_CPUID = 11
TAG_XSAVE = 4
TAG_PAGE_MAP = 37
CPUID_ENTRY = 40  # {function, index, flags, eax, ebx, ecx, edx, padding[3]}


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli), as ``std.hash.crc.Crc32c``; ``crc`` continues a previous value."""
    t = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def u16(buf, off: int) -> int:
    return struct.unpack_from("<H", buf, off)[0]


def u32(buf, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def u64(buf, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def put16(buf: bytearray, off: int, v: int) -> None:
    struct.pack_into("<H", buf, off, v)


def put32(buf: bytearray, off: int, v: int) -> None:
    struct.pack_into("<I", buf, off, v)


def put64(buf: bytearray, off: int, v: int) -> None:
    struct.pack_into("<Q", buf, off, v)


@dataclass
class Section:
    index: int
    kind: int
    offset: int
    bytes: int
    crc: int

    @property
    def entry(self) -> int:
        """Offset of this section's table entry in the header."""
        return SECTION_TABLE + self.index * SECTION_ENTRY


def sections(data) -> list[Section]:
    """The section table, read through the ABI struct."""
    h = _ffi.struct_from_bytes(_HEADER, data)
    out = []
    for i in range(min(h.section_count, MAX_SECTIONS)):
        e = h.sections[i]
        out.append(Section(i, e.kind, e.offset, e.bytes, e.crc32c))
    return out


def header_crc(data) -> int:
    """The header CRC: CRC32C of the header struct with its CRC field zero."""
    end = _ffi.ffi.sizeof(_HEADER)
    crc_end = OFF["header_crc32c"] + 4
    return crc32c(bytes(data[crc_end:end]), crc32c(bytes(data[:OFF["header_crc32c"]]) + b"\0\0\0\0"))


def fix_header_crc(buf: bytearray) -> bytearray:
    put32(buf, OFF["header_crc32c"], header_crc(buf))
    return buf


def state_of(data) -> bytes:
    s = sections(data)[0]
    return bytes(data[s.offset : s.offset + s.bytes])


def memory_section_of(data) -> bytes:
    s = sections(data)[1]
    return bytes(data[s.offset : s.offset + s.bytes])


def with_state(data, blob: bytes) -> bytes:
    """``data`` (a packed or full snapshot) with its STATE section replaced by
    ``blob``: the MEMORY section moves to the next page boundary, and the
    section table, total size and every CRC are made consistent again."""
    st, mem = sections(data)[:2]
    mem_bytes = bytes(data[mem.offset : mem.offset + mem.bytes])
    mem_off = -(-(HEADER_BYTES + len(blob)) // PAGE) * PAGE
    out = bytearray(data[:HEADER_BYTES])
    out += blob
    out += bytes(mem_off - len(out))
    out += mem_bytes
    put64(out, st.entry + SEC["offset"], HEADER_BYTES)
    put64(out, st.entry + SEC["bytes"], len(blob))
    put32(out, st.entry + SEC["crc32c"], crc32c(blob))
    put64(out, mem.entry + SEC["offset"], mem_off)
    put64(out, OFF["total_bytes"], len(out))
    return bytes(fix_header_crc(out))


# -- the STATE blob ------------------------------------------------------------------


@dataclass
class Record:
    tag: int
    vcpu: int
    data: bytes


def parse_state(blob: bytes) -> tuple[bytes, list[Record]]:
    """(the 32-byte blob header, the records) of a well-formed blob."""
    assert blob[:8] == b"KVMLSTAT"
    count = u32(blob, 24)
    off = STATE_HEADER
    recs = []
    for _ in range(count):
        tag, vcpu, n = struct.unpack_from("<III", blob, off)
        off += RECORD_HEADER
        recs.append(Record(tag, vcpu, bytes(blob[off : off + n])))
        off += -(-n // 8) * 8
    assert off == len(blob)
    return bytes(blob[:STATE_HEADER]), recs


def build_state(header: bytes, records: list[Record]) -> bytes:
    out = bytearray(header)
    put32(out, 24, len(records))
    for r in records:
        out += struct.pack("<IIII", r.tag, r.vcpu, len(r.data), 0)
        out += r.data
        out += bytes(-len(r.data) % 8)
    return bytes(out)


def find(records: list[Record], tag: int, vcpu: int) -> Record:
    for r in records:
        if r.tag == tag and r.vcpu == vcpu:
            return r
    raise KeyError((tag, vcpu))


def cpuid_entries(data: bytes) -> list[list[int]]:
    """CPUID record -> [function, index, flags, eax, ebx, ecx, edx] per entry."""
    return [list(struct.unpack_from("<7I", data, i)) for i in range(0, len(data), CPUID_ENTRY)]


def set_cpuid(data: bytes, function: int, index: int, reg: str, value: int) -> bytes:
    """The CPUID record with ``reg`` (eax/ebx/ecx/edx) of leaf ``function.index`` replaced."""
    col = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}[reg]
    out = bytearray(data)
    for i in range(0, len(out), CPUID_ENTRY):
        f, idx = struct.unpack_from("<II", out, i)
        if f == function and idx == index:
            put32(out, i + 4 * col, value)
            return bytes(out)
    raise KeyError((function, index))
