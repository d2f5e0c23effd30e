"""A small, independent reader/writer of the snapshot format, for tests only.

It follows the layout drawn in ``zigsrc/snapshot.zig`` (file header and section
table) and ``zigsrc/state.zig`` (the STATE blob), so tests can craft corrupt or
hostile snapshots from a real ``to_bytes()`` output: edit a field, then (for
checks that come after the checksums) recompute the CRC32Cs with
:func:`crc32c`. Nothing here calls the native core.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_BYTES = 4096
PAGE = 4096
SECTION_TABLE = 128
SECTION_ENTRY = 32
MAX_SECTIONS = 8
KIND_STATE, KIND_MEMORY = 1, 2
FLAG_PACKED = 1

# Header field offsets (snapshot.zig).
OFF_MAGIC = 0
OFF_MAJOR = 8
OFF_MINOR = 10
OFF_ARCH = 12
OFF_HEADER_BYTES = 16
OFF_SECTION_COUNT = 20
OFF_MEMORY_BYTES = 24
OFF_VCPUS = 32
OFF_FLAGS = 36
OFF_CREATED = 40
OFF_TOTAL = 48
OFF_PRESENT = 56
OFF_HEADER_CRC = 64

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
    n = min(u32(data, OFF_SECTION_COUNT), MAX_SECTIONS)
    out = []
    for i in range(n):
        e = SECTION_TABLE + i * SECTION_ENTRY
        out.append(Section(i, u32(data, e), u64(data, e + 8), u64(data, e + 16), u32(data, e + 24)))
    return out


def header_crc(data) -> int:
    """The header CRC: bytes 0..64, the CRC field as zero, then up to the end of the section table."""
    end = SECTION_TABLE + MAX_SECTIONS * SECTION_ENTRY
    return crc32c(bytes(data[68:end]), crc32c(bytes(data[:64]) + b"\0\0\0\0"))


def fix_header_crc(buf: bytearray) -> bytearray:
    put32(buf, OFF_HEADER_CRC, header_crc(buf))
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
    put64(out, st.entry + 8, HEADER_BYTES)
    put64(out, st.entry + 16, len(blob))
    put32(out, st.entry + 24, crc32c(blob))
    put64(out, mem.entry + 8, mem_off)
    put64(out, OFF_TOTAL, len(out))
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
