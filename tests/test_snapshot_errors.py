"""Corrupt, hostile and foreign snapshots: every check, one test per error kind.

Corruptions are made by editing fields of a real ``to_bytes()`` output at the
offsets drawn in ``zigsrc/snapshot.zig``. The header CRC (offset 64) covers
bytes 0..64 and the section table, so a test of a check that comes after the
checksums recomputes the CRC32Cs with the pure-Python helper in
``snapshot_codec``; a test of an earlier check leaves them stale on purpose
(which also shows that the earlier check runs first).
"""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conftest
from conftest import MiB
import snapshot_codec as C
from kvmlab import ConfigError, Snapshot, SnapshotError, Vm, VmConfig, _ffi

pytestmark = pytest.mark.kvm

#: Largest snapshot the core accepts (snapshot.zig max_total_bytes).
MAX_TOTAL = (4096 * MiB) + 4096 + (8 * MiB) + 4096
#: "Fails fast": far below anything that reads or allocates guest memory.
FAST_S = 0.25


@pytest.fixture(scope="module")
def good() -> bytes:
    """A packed snapshot of an 8 MiB counter guest at its checkpoint."""
    conftest._require_kvm()
    with Vm.boot("counter", VmConfig(memory_mib=8), args={"steps": 4, "checkpoint_at": 2, "region_pages": 1}) as vm:
        assert vm.run().reason == "checkpoint"
        with vm.snapshot() as snap:
            data = snap.to_bytes()
    with Snapshot.from_bytes(data):  # the baseline is valid
        pass
    return data


def rejected(data, check: str) -> SnapshotError:
    """from_bytes(data) raises SnapshotError from the check ``check`` (the
    core's id, ``SnapshotError.check``), quickly, with a message."""
    t0 = time.perf_counter()
    with pytest.raises(SnapshotError) as e:
        Snapshot.from_bytes(data)
    assert time.perf_counter() - t0 < FAST_S
    assert e.value.check == check, str(e.value)
    assert str(e.value)
    return e.value


def edit(data: bytes, fix_crc: bool = False, **fields: int) -> bytes:
    """``data`` with header fields set (name -> value), optionally with a fresh header CRC."""
    widths = {
        "major": (C.OFF["version_major"], 2), "minor": (C.OFF["version_minor"], 2), "arch": (C.OFF["arch"], 4),
        "header_bytes": (C.OFF["header_bytes"], 4), "count": (C.OFF["section_count"], 4),
        "memory_bytes": (C.OFF["memory_bytes"], 8), "vcpus": (C.OFF["vcpus"], 4), "flags": (C.OFF["flags"], 4),
        "total": (C.OFF["total_bytes"], 8), "present": (C.OFF["present_pages"], 8),
    }
    buf = bytearray(data)
    for name, value in fields.items():
        off, w = widths[name]
        buf[off : off + w] = value.to_bytes(w, "little")
    if fix_crc:
        C.fix_header_crc(buf)
    return bytes(buf)


def edit_section(data: bytes, index: int, fix_crc: bool = False, **fields: int) -> bytes:
    buf = bytearray(data)
    e = C.SECTION_TABLE + index * C.SECTION_ENTRY
    for name, value in fields.items():
        off, w = C.SECTION_FIELDS[name]
        buf[e + off : e + off + w] = value.to_bytes(w, "little")
    if fix_crc:
        C.fix_header_crc(buf)
    return bytes(buf)


# -- 1. size -------------------------------------------------------------------------


def test_empty_input_is_truncated():
    rejected(b"", "size")


def test_14_byte_input_claiming_a_huge_count_fails_fast():
    # magic, version 1.0, then 0xffff...: a header cut after 14 bytes.
    rejected(b"KVMLSNAP" + struct.pack("<HH", 1, 0) + b"\xff\xff", "size")
    # The same claim in a complete 4096-byte header: 2^32-1 sections, 2^64-1 bytes.
    h = bytearray(4096)
    h[:8] = b"KVMLSNAP"
    struct.pack_into("<HHIII", h, 8, 1, 0, 1, 4096, 0xFFFF_FFFF)
    struct.pack_into("<Q", h, C.OFF["total_bytes"], 2**64 - 1)
    rejected(bytes(h), "section_count")


def test_truncated_snapshot(good):
    rejected(good[:-1], "total_bytes")
    rejected(good[:4096], "total_bytes")
    rejected(good[:4095], "size")


def test_padded_snapshot(good):
    rejected(good + b"\0", "total_bytes")


def test_size_over_limit_before_reading_anything(tmp_path):
    """A 5 GiB sparse file: load() and from_bytes() of its mapping refuse it by size
    alone (nothing of it is read: its pages are holes, so no header, no magic)."""
    p = tmp_path / "huge.kvmsnap"
    with open(p, "wb") as f:
        f.truncate(5 << 30)
    t0 = time.perf_counter()
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "size"
    assert time.perf_counter() - t0 < FAST_S
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        with memoryview(m) as view:
            rejected(view, "size")
    assert os.stat(p).st_blocks == 0  # still all holes: nothing was ever written


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_checks_finish_before_guest_memory_is_allocated(good, tmp_path):
    """A 4 GiB full-layout file whose header, section table and STATE are all
    well-formed and checksummed, but whose STATE describes an 8 MiB guest: the
    semantic check refuses it without allocating (or reading) 4 GiB."""
    blob = C.state_of(good)
    mem_off = -(-(4096 + len(blob)) // 4096) * 4096
    total = mem_off + (4 << 30)
    h = bytearray(good[:4096])
    C.put64(h, C.OFF["memory_bytes"], 4 << 30)
    C.put32(h, C.OFF["flags"], 0)  # full layout: MEMORY is all 4 GiB, holes
    C.put64(h, C.OFF["total_bytes"], total)
    st, mem = C.sections(h)
    C.put64(h, mem.entry + C.SECTION_FIELDS["offset"][0], mem_off)
    C.put64(h, mem.entry + C.SECTION_FIELDS["bytes"][0], 4 << 30)
    C.fix_header_crc(h)
    p = tmp_path / "4g.kvmsnap"
    with open(p, "wb") as f:
        f.write(h)
        f.write(blob)
        f.truncate(total)
    base = rss_anon()
    t0 = time.perf_counter()
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "state_memory"
    assert time.perf_counter() - t0 < FAST_S
    assert rss_anon() - base < 4 * MiB
    assert os.stat(p).st_blocks * 512 < 1 * MiB


# -- 2. magic, 3. version --------------------------------------------------------------


def test_bad_magic(good):
    rejected(b"KVMLSNAQ" + good[8:], "magic")
    rejected(b"\x7fELF" + bytes(4092), "magic")


def test_newer_minor_version_is_refused(good):
    rejected(edit(good, minor=1, fix_crc=True), "version")


def test_newer_major_version_is_refused(good):
    rejected(edit(good, major=2, fix_crc=True), "version")
    rejected(edit(good, major=0xFFFF, minor=0xFFFF), "version")


def test_older_major_version_is_refused(good):
    rejected(edit(good, major=0, fix_crc=True), "version")


def test_other_architecture(good):
    rejected(edit(good, arch=2, fix_crc=True), "arch")


def test_header_size_field(good):
    rejected(edit(good, header_bytes=8192, fix_crc=True), "header_size")


# -- 4. section bounds ----------------------------------------------------------------------


def test_section_count(good):
    rejected(edit(good, count=3, fix_crc=True), "section_count")
    rejected(edit(good, count=0, fix_crc=True), "section_count")


def test_section_kind(good):
    rejected(edit_section(good, 0, kind=2, fix_crc=True), "section_kind")


def test_section_outside_the_snapshot(good):
    st, mem = C.sections(good)
    rejected(edit_section(good, 1, bytes=1 << 40), "section_bounds")
    rejected(edit_section(good, 0, offset=2**64 - 1), "section_bounds")
    rejected(edit_section(good, 0, offset=100), "section_bounds")  # inside the header
    # offset + bytes would overflow 64 bits: still "outside", no wrap-around.
    rejected(edit_section(good, 1, offset=mem.offset, bytes=2**64 - mem.offset + 1), "section_bounds")


def test_state_section_over_its_limit(tmp_path):
    # STATE larger than 8 MiB (the blob limit), inside a file that is big enough.
    h = bytearray(4096)
    h[:8] = b"KVMLSNAP"
    struct.pack_into("<HHIII", h, 8, 1, 0, 1, 4096, 2)
    total = 4096 + (9 * MiB)
    struct.pack_into("<Q", h, C.OFF["total_bytes"], total)
    struct.pack_into("<IIQQ", h, C.SECTION_TABLE, 1, 0, 4096, 9 * MiB)
    struct.pack_into("<IIQQ", h, C.SECTION_TABLE + 32, 2, 0, total, 0)
    p = tmp_path / "big-state.kvmsnap"
    with open(p, "wb") as f:
        f.write(h)
        f.truncate(total)
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "state_limit"


def test_memory_section_not_page_aligned(good):
    st, mem = C.sections(good)
    data = edit_section(good, 1, offset=mem.offset - 8, bytes=mem.bytes)
    rejected(data, "memory_alignment")


def test_sections_overlap(good):
    st, mem = C.sections(good)
    rejected(edit_section(good, 0, bytes=mem.offset - st.offset + 4096), "section_overlap")


def test_memory_size_out_of_range(good):
    rejected(edit(good, memory_bytes=4 * MiB), "memory_size")
    rejected(edit(good, memory_bytes=9 * MiB), "memory_size")
    rejected(edit(good, memory_bytes=8 << 30), "memory_size")


def test_more_present_pages_than_the_guest_has(good):
    rejected(edit(good, present=2049), "present_pages")


def test_unknown_flags(good):
    rejected(edit(good, flags=0x3), "flags")


def test_memory_section_size_disagrees_with_the_header(good):
    rejected(edit(good, present=C.u64(good, C.OFF["present_pages"]) + 1), "memory_section_size")
    rejected(edit(good, flags=0), "memory_section_size")


# -- 5. checksums ----------------------------------------------------------------------------


def test_header_checksum_mismatch(good):
    rejected(edit(good, vcpus=2), "header_crc")
    buf = bytearray(good)
    buf[C.OFF["header_crc32c"]] ^= 1
    rejected(bytes(buf), "header_crc")
    buf = bytearray(good)
    buf[C.SECTION_TABLE + 28] ^= 0x80  # a reserved byte of the section table: structure check first
    rejected(bytes(buf), "reserved")


def test_state_section_checksum_mismatch(good):
    st, _ = C.sections(good)
    for off in (st.offset, st.offset + st.bytes // 2, st.offset + st.bytes - 1):
        buf = bytearray(good)
        buf[off] ^= 0x01
        rejected(bytes(buf), "state_crc")


def test_memory_section_checksum_mismatch(good):
    _, mem = C.sections(good)
    for off in (mem.offset, mem.offset + mem.bytes // 2, len(good) - 1):
        buf = bytearray(good)
        buf[off] ^= 0x80
        rejected(bytes(buf), "memory_crc")


def test_saved_file_checksum_mismatch_names_the_file(good, tmp_path):
    with Snapshot.from_bytes(good) as snap:
        p = snap.save(tmp_path / "s.kvmsnap")
    raw = bytearray(p.read_bytes())
    st, mem = C.sections(raw)
    page = 0x400000 // 4096  # the counter region: a present page
    raw[mem.offset + page * 4096 + 8] ^= 0xFF
    p.write_bytes(raw)
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "memory_crc"
    assert str(p) in str(e.value)  # the message names the file


def test_data_in_a_hole_of_a_saved_file_is_detected(good, tmp_path):
    """The MEMORY CRC covers the present pages only; load() checks that the
    pages the page map calls zero hold no data (walking the file's data
    extents with SEEK_DATA/SEEK_HOLE)."""
    with Snapshot.from_bytes(good) as snap:
        p = snap.save(tmp_path / "s.kvmsnap")
    raw = bytearray(p.read_bytes())
    mem = C.sections(raw)[1]
    gpa = 0x600000  # never touched by the guest: a hole in the file
    assert raw[mem.offset + gpa : mem.offset + gpa + 4096] == bytes(4096)
    raw[mem.offset + gpa] = 0xAA
    p.write_bytes(raw)
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "holes"
    # A non-sparse copy of a good file (holes written as zero data) still loads.
    with Snapshot.from_bytes(good) as snap:
        q = snap.save(tmp_path / "t.kvmsnap")
    dense = tmp_path / "dense.kvmsnap"
    dense.write_bytes(q.read_bytes())  # write_bytes allocates every block
    with Snapshot.load(dense) as s2:
        assert s2.present_pages == Snapshot.from_bytes(good).present_pages


def test_reserved_bytes_must_be_zero(good):
    raw = bytearray(good)
    raw[1000] = 1  # inside the header, past the section table
    with pytest.raises(SnapshotError) as e:
        Snapshot.from_bytes(bytes(raw))
    assert e.value.check == "reserved"


# -- 6. semantic checks (CRCs recomputed so they pass) ------------------------------------------


def test_vcpu_count_disagrees_with_state(good):
    rejected(edit(good, vcpus=2, fix_crc=True), "vcpu_count")


def test_memory_size_disagrees_with_state(good):
    # 16 MiB in the header: the packed MEMORY size still matches, the STATE blob says 8.
    rejected(edit(good, memory_bytes=16 * MiB, fix_crc=True), "state_memory")


def test_page_map_disagrees_with_present_count(good):
    header, recs = C.parse_state(C.state_of(good))
    pm = C.find(recs, C.TAG_PAGE_MAP, C.VM_WIDE)
    bits = bytearray(pm.data)
    first_zero = next(i for i in range(len(bits) * 8) if not bits[i // 8] >> (i % 8) & 1)
    bits[first_zero // 8] |= 1 << (first_zero % 8)
    pm.data = bytes(bits)
    n = C.u64(good, C.OFF["present_pages"])
    rejected(C.with_state(good, C.build_state(header, recs)), "page_count")


# -- the check order -----------------------------------------------------------------------------


def test_checks_run_in_the_documented_order(good):
    """With several faults at once, the first check in the documented order
    (size, magic, version, bounds, checksums, semantic) is the one reported."""
    st, mem = C.sections(good)
    semantic = edit(good, vcpus=2, fix_crc=True)
    buf = bytearray(semantic)
    buf[len(buf) - 1] ^= 1  # + MEMORY checksum
    mem_crc = bytes(buf)
    buf[st.offset + 40] ^= 1  # + STATE checksum
    state_crc = bytes(buf)
    buf[C.OFF["header_crc32c"]] ^= 1  # + header checksum
    header_crc = bytes(buf)
    bounds = edit_section(header_crc, 1, bytes=1 << 40)  # + section bounds
    version = edit(bounds, major=9)  # + version
    magic = b"XXXXXXXX" + version[8:]  # + magic
    truncated = magic[:100]  # + size
    for data, message in [
        (semantic, "vcpu_count"),
        (mem_crc, "memory_crc"),
        (state_crc, "state_crc"),
        (header_crc, "header_crc"),
        (bounds, "section_bounds"),
        (version, "version"),
        (magic, "magic"),
        (truncated, "size"),
    ]:
        rejected(data, message)


# -- not a snapshot at all ------------------------------------------------------------------------


def test_load_refuses_a_directory(tmp_path):
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(tmp_path)
    assert e.value.check == "file"
    # The core refuses it too, without the Python pre-check.
    out = _ffi.ffi.new("kvmlab_snapshot **")
    with pytest.raises(SnapshotError) as e:
        _ffi.check(_ffi.lib.kvmlab_snapshot_load(os.fsencode(tmp_path), out))
    assert e.value.check == "file"


def test_load_refuses_dev_null():
    with pytest.raises(SnapshotError) as e:
        Snapshot.load("/dev/null")
    assert e.value.check == "file"
    out = _ffi.ffi.new("kvmlab_snapshot **")
    with pytest.raises(SnapshotError) as e:
        _ffi.check(_ffi.lib.kvmlab_snapshot_load(b"/dev/null", out))
    assert e.value.check == "file"


def test_load_refuses_a_fifo_without_blocking(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    t0 = time.perf_counter()
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "file"
    assert time.perf_counter() - t0 < FAST_S


def test_load_missing_file_and_bad_paths(tmp_path):
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(tmp_path / "missing.kvmsnap")
    assert e.value.check == "file"
    with pytest.raises(ConfigError) as e:  # a bad argument, checked before the file system
        Snapshot.load("bad\0path")
    assert e.value.check == "argument_path"


def test_load_short_file(tmp_path):
    p = tmp_path / "short.kvmsnap"
    p.write_bytes(b"KVMLSNAP" + struct.pack("<HH", 1, 0) + b"\xff\xff")
    with pytest.raises(SnapshotError) as e:
        Snapshot.load(p)
    assert e.value.check == "size"


def test_from_bytes_refuses_non_buffers():
    for bad in ("KVMLSNAP", 12, None, [1, 2]):
        with pytest.raises(SnapshotError) as e:
            Snapshot.from_bytes(bad)  # type: ignore[arg-type]
        assert e.value.check == "argument_type"
    with pytest.raises(SnapshotError) as e:
        Snapshot.from_bytes(memoryview(bytes(8192))[::2])
    assert e.value.check == "argument_buffer"


# -- hostile vcpu_state (STATE) blobs, CRCs made valid ------------------------------------------------


def _hostile_blobs(blob: bytes) -> dict[str, tuple[bytes, str]]:
    header, recs = C.parse_state(blob)
    n = len(recs)

    def with_count(count: int) -> bytes:
        b = bytearray(blob)
        C.put32(b, 24, count)
        return bytes(b)

    def first_record(**f: int) -> bytes:
        b = bytearray(blob)
        off = C.STATE_HEADER
        for name, value in f.items():
            C.put32(b, off + {"tag": 0, "vcpu": 4, "bytes": 8}[name], value)
        return bytes(b)

    def without(tag: int) -> bytes:
        return C.build_state(header, [r for r in recs if r.tag != tag])

    def replaced(tag: int, data: bytes) -> bytes:
        return C.build_state(header, [C.Record(r.tag, r.vcpu, data) if r.tag == tag else r for r in recs])

    b = bytearray(blob)
    C.put16(b, 10, 1)
    newer_minor = bytes(b)
    b = bytearray(blob)
    C.put32(b, 12, 0)
    no_vcpus = bytes(b)
    b = bytearray(blob)
    C.put64(b, 16, 3 * MiB)
    odd_memory = bytes(b)
    return {
        "bad-magic": (b"KVMLSTAX" + blob[8:], "state_magic"),
        "huge-record-count": (with_count(0xFFFF_FFFF), "state_record_count"),
        "count-one-too-many": (with_count(n + 1), "state_record"),
        "count-one-too-few": (with_count(n - 1), "state_trailing"),
        "truncated-mid-record": (blob[: len(blob) - 16], "state_record"),
        "truncated-header": (blob[:14], "state_size"),
        "huge-record-length": (first_record(bytes=0xFFFF_FFF8), "state_record"),
        "unknown-tag": (first_record(tag=99), "state_record"),
        "vcpu-out-of-range": (first_record(vcpu=5), "state_record"),
        "vm-wide-tag-on-a-vcpu": (first_record(vcpu=C.VM_WIDE), "state_record"),
        "wrong-fixed-size": (C.build_state(header, [C.Record(1, 0, recs[0].data[:-8])] + recs[1:]), "state_record"),
        "duplicate-record": (C.build_state(header, recs + [recs[0]]), "state_record"),
        "missing-record": (without(8), "state_missing"),
        "missing-vm-record": (without(35), "state_missing"),
        "newer-minor": (newer_minor, "state_version"),
        "zero-vcpus": (no_vcpus, "state_shape"),
        "odd-memory-size": (odd_memory, "state_shape"),
        # The per-record limits of docs/security.md: 64 KiB XSAVE, 1,024 MSRs, 256 CPUID entries.
        "oversized-xsave": (replaced(4, bytes((64 << 10) + 64)), "state_record"),
        "oversized-msrs": (replaced(6, bytes(1025 * 16)), "state_record"),
        "oversized-cpuid": (replaced(11, bytes(257 * 40)), "state_record"),
    }


HOSTILE_IDS = [
    "bad-magic", "huge-record-count", "count-one-too-many", "count-one-too-few", "truncated-mid-record",
    "truncated-header", "huge-record-length", "unknown-tag", "vcpu-out-of-range", "vm-wide-tag-on-a-vcpu",
    "wrong-fixed-size", "duplicate-record", "missing-record", "missing-vm-record", "newer-minor",
    "zero-vcpus", "odd-memory-size", "oversized-xsave", "oversized-msrs", "oversized-cpuid",
]


@pytest.mark.parametrize("kind", HOSTILE_IDS)
def test_hostile_vcpu_state_via_from_bytes(good, kind):
    """A STATE blob that is hostile, in a snapshot whose checksums are all valid:
    from_bytes refuses it with a message naming the fault, and fast."""
    blob, message = _hostile_blobs(C.state_of(good))[kind]
    data = C.with_state(good, blob)
    assert C.u32(data, C.OFF["header_crc32c"]) == C.header_crc(data)  # only the STATE contents are wrong
    rejected(data, message)


def test_hostile_ids_cover_every_case(good):
    assert sorted(_hostile_blobs(C.state_of(good))) == sorted(HOSTILE_IDS)


# -- property: random mutations never crash or hang ---------------------------------------------


def _positions(n: int, good_sections) -> st.SearchStrategy[int]:
    st_sec, mem = good_sections
    hot = [0, 8, 10, 12, 16, 20, 24, 32, 36, 40, 48, 56, 64]
    hot += [C.SECTION_TABLE + i for i in range(0, 64, 4)]
    hot += [st_sec.offset + i for i in (0, 8, 12, 16, 24, 28, 32, 36, 40, 44)]
    hot += [mem.offset, mem.offset - 1, n - 1]
    return st.one_of(
        st.sampled_from([h for h in hot if h < n]),
        st.integers(8, 383),  # the header fields after the magic, and the section table
        st.integers(st_sec.offset, st_sec.offset + st_sec.bytes - 1),  # the STATE blob
        st.integers(0, n - 1),
    )


def _mutations(n: int, good_sections) -> st.SearchStrategy:
    pos = _positions(n, good_sections)
    interesting = st.sampled_from([0, 1, 2, 7, 0x7F, 0xFF, 0xFFFF, 0xFFFF_FFFF, 2**63, 2**64 - 1, n, n - 4096, 4096, 8 * MiB])
    flip = st.tuples(st.just("flip"), pos, st.integers(0, 7))
    overwrite = st.tuples(st.just("overwrite"), pos, st.binary(min_size=1, max_size=16))
    field32 = st.tuples(st.just("field32"), pos, interesting)
    # In-place edits are drawn more often than size changes, which most of the
    # time just trip the size checks.
    return st.lists(
        st.one_of(
            flip,
            flip,
            overwrite,
            overwrite,
            field32,
            field32,
            st.tuples(st.just("field64"), pos, interesting),
            st.tuples(st.just("truncate"), st.one_of(st.integers(4096, n), st.integers(0, n))),
            st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        ),
        min_size=1,
        max_size=4,
    )


def _apply(data: bytes, ops) -> bytearray:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            del buf[op[1] :]
        elif not buf:
            continue
        elif kind == "flip":
            buf[op[1] % len(buf)] ^= 1 << op[2]
        elif kind == "overwrite":
            at = op[1] % len(buf)
            buf[at : at + len(op[2])] = op[2]
        elif kind == "insert":
            buf[op[1] % (len(buf) + 1) : op[1] % (len(buf) + 1)] = op[2]
        elif kind in ("field64", "field32"):
            w = 8 if kind == "field64" else 4
            at = op[1] % len(buf)
            buf[at : at + w] = (op[2] % (1 << (8 * w))).to_bytes(w, "little")
    return buf


def _refresh_crcs(buf: bytearray) -> None:
    """Makes the total size, the section CRCs and the header CRC valid again
    where the section table still points inside the data (so mutations reach
    the later checks)."""
    if len(buf) < 4096:
        return
    C.put64(buf, C.OFF["total_bytes"], len(buf))
    for s in C.sections(buf)[:2]:
        if s.offset <= len(buf) and s.bytes <= len(buf) - s.offset and s.bytes <= 16 * MiB:
            C.put32(buf, s.entry + C.SECTION_FIELDS["crc"][0], C.crc32c(buf[s.offset : s.offset + s.bytes]))
    C.fix_header_crc(buf)


def _outcome(data: bytes) -> str:
    """'ok' or 'SnapshotError'; anything else fails the test. Also bounded in time."""
    t0 = time.perf_counter()
    try:
        snap = Snapshot.from_bytes(data)
    except SnapshotError as e:
        assert str(e), "a SnapshotError must say what is wrong"
        return "SnapshotError"
    finally:
        assert time.perf_counter() - t0 < 2.0, "from_bytes took too long"
    with snap:
        # What loaded is self-consistent and encodes back to a loadable snapshot.
        assert 8 * MiB <= snap.memory_bytes <= 4096 * MiB and 1 <= snap.vcpus <= 8
        again = snap.to_bytes()
        assert snap.vcpu_state[:8] == b"KVMLSTAT"
    with Snapshot.from_bytes(again):
        pass
    return "ok"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=1700, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(data=st.data())
def test_random_mutations_load_or_raise_snapshot_error(good, fuzz_dir, data):
    """Bit flips, truncations, overwrites and insertions anywhere (biased to
    the header, section table and STATE records): from_bytes and load either
    accept the result or raise SnapshotError, and agree with each other."""
    ops = data.draw(_mutations(len(good), C.sections(good)))
    buf = _apply(good, ops)
    outcome = _outcome(bytes(buf))
    p = fuzz_dir / "m.kvmsnap"
    p.write_bytes(buf)
    try:
        with Snapshot.load(p):
            via_load = "ok"
    except SnapshotError:
        via_load = "SnapshotError"
    assert via_load == outcome


# -- structured mutations with valid checksums -------------------------------------------
#
# Mutations mostly inside the STATE records (their bytes, length, tag, vCPU; records
# dropped, duplicated, swapped), some in the blob header, the file header and the
# memory; then everything a mutation invalidates is rebuilt (record count, STATE
# section size and offset, MEMORY offset, total size, every checksum), so the
# examples get past the layout and checksum checks to the STATE parser and the
# semantic checks after it. Each example is classified by the stage that rejected it.

#: Check stages, in the core's order (snapshot.zig check(), state.zig parse()).
STAGES = ("layout", "checksum", "state", "cross", "ok")

_INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0xFF, 0xFFFF, 0xFFFF_FFFF, 2**63, 2**64 - 1, 4096, 8 * MiB]


def _stage(data: bytes) -> str:
    """The check stage that rejects ``data``, or "ok" (then it is also
    self-consistent: see _outcome)."""
    t0 = time.perf_counter()
    try:
        Snapshot.from_bytes(data).close()
    except SnapshotError as e:
        check = e.check
    else:
        assert _outcome(data) == "ok"
        return "ok"
    assert time.perf_counter() - t0 < 2.0, "from_bytes took too long"
    assert check is not None, "every refusal of the core names its check"
    if check in ("header_crc", "state_crc", "memory_crc"):
        return "checksum"
    if check in ("state_memory", "page_count", "vcpu_count"):
        return "cross"  # after the parser: the header against STATE
    if check.startswith("state_") and check != "state_limit":
        return "state"  # the STATE parser: blob header, records, completeness
    return "layout"


def _record_mutations(records: list[C.Record]) -> st.SearchStrategy:
    rec = st.integers(0, len(records) - 1)
    at = st.integers(0, 1 << 16)  # taken modulo the record's length
    value = st.sampled_from(_INTERESTING)
    inside = st.one_of(
        st.tuples(st.just("flip"), rec, at, st.integers(0, 7)),
        st.tuples(st.just("overwrite"), rec, at, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("field32"), rec, at, value),
        st.tuples(st.just("field64"), rec, at, value),
    )
    tags = st.one_of(st.sampled_from([r.tag for r in records]), st.sampled_from(_INTERESTING), st.integers(0, 64))
    record_ops = st.one_of(
        st.tuples(st.just("resize"), rec, st.integers(-64, 64)),
        st.tuples(st.just("tag"), rec, tags),
        st.tuples(st.just("vcpu"), rec, st.sampled_from([0, 1, 7, 8, C.VM_WIDE, 0xFFFF_FFFE])),
        st.tuples(st.just("drop"), rec),
        st.tuples(st.just("dup"), rec),
        st.tuples(st.just("swap"), rec, rec),
    )
    file_header = st.tuples(
        st.just("file_header"), st.sampled_from([C.OFF["memory_bytes"], C.OFF["vcpus"], C.OFF["present_pages"], C.OFF["created_unix_ns"]]),
        st.one_of(value, st.integers(1, 8), st.sampled_from([8 * MiB, 16 * MiB, 10 * MiB])),
    )
    outside = st.one_of(
        st.tuples(st.just("blob_header"), st.sampled_from([8, 10, 12, 16, 24, 28]), value),
        st.tuples(st.just("memory"), st.integers(0, 1 << 30), st.integers(0, 7)),
    )
    # Mostly inside records, which is where the deep checks are.
    return st.lists(st.one_of(inside, inside, inside, record_ops, record_ops, file_header, outside), min_size=1, max_size=3)


def _rebuild(good: bytes, ops) -> bytes:
    """``good`` with ``ops`` applied and everything they invalidate rebuilt."""
    head, records = C.parse_state(C.state_of(good))
    records = [C.Record(r.tag, r.vcpu, r.data) for r in records]
    blob_edits, file_edits, mem_flips = [], [], []
    for op in ops:
        kind = op[0]
        if kind in ("flip", "overwrite", "field32", "field64") and records:
            r = records[op[1] % len(records)]
            if not r.data:
                continue
            buf = bytearray(r.data)
            pos = op[2] % len(buf)
            if kind == "flip":
                buf[pos] ^= 1 << op[3]
            elif kind == "overwrite":
                buf[pos : pos + len(op[3])] = op[3]
            else:
                w = 4 if kind == "field32" else 8
                buf[pos : pos + w] = (op[3] % (1 << (8 * w))).to_bytes(w, "little")
            r.data = bytes(buf)
        elif kind == "resize" and records:
            r = records[op[1] % len(records)]
            r.data = r.data[: max(0, len(r.data) + op[2])] if op[2] < 0 else r.data + bytes(op[2])
        elif kind in ("tag", "vcpu") and records:
            r = records[op[1] % len(records)]
            setattr(r, kind, op[2] % 2**32)
        elif kind == "drop" and records:
            records.pop(op[1] % len(records))
        elif kind == "dup" and records:
            r = records[op[1] % len(records)]
            records.append(C.Record(r.tag, r.vcpu, r.data))
        elif kind == "swap" and records:
            i, j = op[1] % len(records), op[2] % len(records)
            records[i], records[j] = records[j], records[i]
        elif kind == "blob_header":
            blob_edits.append(op[1:])
        elif kind == "file_header":
            file_edits.append(op[1:])
        elif kind == "memory":
            mem_flips.append(op[1:])
    blob = bytearray(C.build_state(head, records))
    for off, v in blob_edits:
        w = 8 if off == 16 else 2 if off in (8, 10) else 4
        blob[off : off + w] = (v % (1 << (8 * w))).to_bytes(w, "little")
    out = bytearray(C.with_state(good, bytes(blob)))
    mem = C.sections(out)[1]
    for at, bit in mem_flips:
        if mem.bytes:
            out[mem.offset + at % mem.bytes] ^= 1 << bit
    C.put32(out, mem.entry + 24, C.crc32c(out[mem.offset : mem.offset + mem.bytes]))
    for off, v in file_edits:
        w = 4 if off == C.OFF["vcpus"] else 8
        out[off : off + w] = (v % (1 << (8 * w))).to_bytes(w, "little")
    return bytes(C.fix_header_crc(out))


def test_mutations_with_valid_checksums_reach_every_check_stage(good):
    """Structured mutations with everything rebuilt: each loads or raises
    SnapshotError (never anything else, always quickly), and the examples
    reach each stage in a fair share: the STATE parser most often, the
    cross-checks after it and whole loads too (a share under the minimum
    means the generator stopped reaching that stage)."""
    assert _rebuild(good, []) == good  # the rebuild is exact
    _head, records = C.parse_state(C.state_of(good))
    stages = dict.fromkeys(STAGES, 0)

    # Only the health check this design needs suppressed: each example loads
    # a snapshot (milliseconds), which hypothesis calls too slow. Derandomized:
    # the shares are a property of the generator, and a random run fell under
    # a minimum once in CI-like conditions (a flaky gate helps nobody).
    @settings(max_examples=700, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=_record_mutations(records))
    def mutate(ops):
        stages[_stage(_rebuild(good, ops))] += 1

    mutate()
    n = sum(stages.values())
    share = {k: v / n for k, v in stages.items()}
    # Seen here over 700 examples: layout ~6%, state ~50%, cross ~3.5%, ok ~40%.
    assert stages["checksum"] == 0, stages  # the rebuild makes every checksum valid
    assert share["layout"] <= 0.25, stages  # most get past the layout checks
    assert share["state"] >= 0.30, stages
    assert share["cross"] >= 0.01, stages
    assert share["ok"] >= 0.15, stages


def test_fuzz_baseline_is_reachable(good):
    """The mutation helpers do reach deep checks: a field edit in the STATE
    blob with refreshed CRCs is reported by the STATE parser, not a checksum."""
    st_sec, _ = C.sections(good)
    buf = _apply(good, [("field32", st_sec.offset + 24, 0xFFFF_FFFF)])
    _refresh_crcs(buf)
    with pytest.raises(SnapshotError) as e:
        Snapshot.from_bytes(bytes(buf))
    assert e.value.check == "state_record_count"
