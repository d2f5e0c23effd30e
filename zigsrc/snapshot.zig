//! kvmlab snapshots: guest memory plus the state blob of state.zig, in one
//! checked, self-describing file or byte string.
//!
//! File layout (little-endian):
//!
//!   offset 0                                            4096
//!   +---------------------------------------------------+----------------+-----+------------------+
//!   | header (4096 bytes)                                | STATE section  | pad | MEMORY section   |
//!   +---------------------------------------------------+----------------+-----+------------------+
//!                                                         CRC32C            page-aligned, CRC32C
//!   header:
//!     0   magic "KVMLSNAP"          8   version major u16, minor u16
//!     12  arch u32 (1 = x86_64)     16  header bytes u32 (4096)
//!     20  section count u32 (<= 8)  24  memory bytes u64
//!     32  vCPU count u32            36  flags u32 (bit 0: MEMORY is packed)
//!     40  created, unix ns u64      48  total bytes u64
//!     56  present pages u64         64  header CRC32C u32 (bytes 0..64 and the
//!                                       section table, with this field zero)
//!     128 section table, 32 bytes each:
//!         kind u32 (1 STATE, 2 MEMORY) | reserved u32 | offset u64 | bytes u64 | CRC32C u32 | reserved u32
//!
//! MEMORY comes in two layouts. Full (files written by `save`): `memory bytes`
//! long, page i at offset i*4096, all-zero pages left as holes, so the section
//! can be mapped copy-on-write straight into a VM (`map` restore) and a 256 MiB
//! guest that touched 2 MiB takes ~2 MiB of disk. Packed (`to_bytes`): only the
//! pages set in STATE's page map, in page order. Either way its CRC32C covers
//! the present pages in page order, so the checksum costs what is stored.
//!
//! Checks, in this order, before anything is allocated: total size limit,
//! magic, version, section bounds (and reserved bytes and padding all zero),
//! checksums (header, STATE, then MEMORY using STATE's checked page map), then
//! semantic checks (counts and sizes agree). `load` of a full-layout file also
//! checks that no page the page map calls zero holds data (SEEK_DATA/SEEK_HOLE),
//! since a `map` restore would show it.
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const vm_mod = @import("vm.zig");
const safe = @import("safe.zig");
const sigbus = @import("sigbus.zig");
const Vm = vm_mod.Vm;

const allocator = std.heap.c_allocator;
const Crc32c = std.hash.crc.@"CRC-32/ISCSI";

pub const magic = "KVMLSNAP".*;
pub const version_major: u16 = 1;
pub const version_minor: u16 = 0;
pub const arch_x86_64: u32 = 1;
pub const header_bytes: u64 = 4096;
pub const max_sections: u32 = 8;
pub const section_table_offset = 128;
pub const section_entry_bytes = 32;
pub const flag_packed: u32 = 1;
pub const kind_state: u32 = 1;
pub const kind_memory: u32 = 2;
pub const page = boot.page_bytes;
/// Largest snapshot accepted: the largest guest plus its state.
pub const max_total_bytes: u64 = boot.max_memory_bytes + header_bytes + state.max_blob_bytes + page;

pub const Strategy = enum(u32) { auto = 0, copy = 1, map = 2 };

pub const Snapshot = struct {
    /// The checked state blob (owned) and where its records are.
    blob: []u8,
    parsed: state.Parsed,
    /// A dense, read-only view of guest memory: an anonymous mapping holding
    /// the present pages, or the full-layout MEMORY section of a mapped file.
    memory: []align(4096) u8,
    memory_owned: bool,
    /// File-backed snapshots: the open file, its mapping, and where MEMORY is.
    fd: linux.fd_t = -1,
    file_map: []align(4096) u8 = &.{},
    memory_offset: u64 = 0,
    present_pages: u64,
    created_unix_ns: u64,
    stored_bytes: u64,
    /// Owners: the handle given to the caller, plus each resettable VM that
    /// restores from it. Freed when the last one lets go.
    refs: std.atomic.Value(u32) = .init(1),
    /// Set when a read of the file mapping faulted (the file shrank): the
    /// page now reads as zeros, so the snapshot is no longer trustworthy.
    damaged: std.atomic.Value(bool) = .init(false),
    sigbus_slot: ?usize = null,
    /// File-backed snapshots: what statx said of the file at load, and the
    /// MEMORY checksum it was checked against. A rewrite in place keeps the
    /// inode (the fd) but changes the size or mtime; save/toBytes
    /// also compare the checksum.
    file_id: FileId = .{},
    memory_crc: u32 = 0,
    /// The header and section table as checked at load (their CRCs cover
    /// the whole file): every use compares the mapped ones with it.
    head: [head_bytes]u8 = @splat(0),
    /// When the hot check last ran statx (monotonic ns; see checkIntact).
    last_stat_ns: std.atomic.Value(u64) = .init(0),

    pub fn retain(s: *Snapshot) *Snapshot {
        _ = s.refs.fetchAdd(1, .acq_rel);
        return s;
    }

    pub fn release(s: *Snapshot) void {
        if (s.refs.fetchSub(1, .acq_rel) == 1) s.destroy();
    }

    /// Fails when the file behind a loaded snapshot was truncated, or
    /// rewritten in place since load; marks it damaged then, so every later
    /// use fails too. The restore and reset hot paths: the mapped header and
    /// section table against the copy from load (a few dozen ns; another
    /// snapshot written over the file differs there, a truncated header page
    /// reads as zeros), and the file's size and mtime (statx, ~5 us under
    /// kvm_pvm) at most every `stat_interval_ns`.
    pub fn checkIntact(s: *const Snapshot) errors.Error!void {
        return s.check(false);
    }

    /// checkIntact with statx every time (save, toBytes, info: not hot).
    pub fn checkFile(s: *const Snapshot) errors.Error!void {
        return s.check(true);
    }

    fn check(s: *const Snapshot, always_stat: bool) errors.Error!void {
        if (s.damaged.load(.acquire)) return safe.truncated();
        if (s.fd < 0) return;
        if (!std.mem.eql(u8, s.file_map[0..head_bytes], &s.head)) return s.changed(s.file_id.size);
        const now_ns = vm_mod.monotonicNs();
        if (!always_stat and now_ns -% s.last_stat_ns.load(.monotonic) < stat_interval_ns) return;
        @constCast(&s.last_stat_ns).store(now_ns, .monotonic);
        const now = FileId.of(s.fd) catch return;
        if (!std.meta.eql(now, s.file_id)) return s.changed(now.size);
    }

    fn changed(s: *const Snapshot, size_now: u64) errors.Error {
        @constCast(&s.damaged).store(true, .release);
        if (size_now < s.file_id.size) return safe.truncated();
        return errors.fail(error.Snapshot, "the snapshot file was rewritten after it was loaded (its header, size or mtime changed); load it again", .{});
    }

    fn destroy(s: *Snapshot) void {
        sigbus.unregister(s.sigbus_slot);
        if (s.memory_owned and s.memory.len > 0) _ = linux.munmap(s.memory.ptr, s.memory.len);
        if (s.file_map.len > 0) _ = linux.munmap(s.file_map.ptr, s.file_map.len);
        if (s.fd >= 0) _ = linux.close(s.fd);
        allocator.free(s.blob);
        allocator.destroy(s);
    }

    /// Whether `strategy` maps this snapshot's file (else its memory is copied).
    pub fn useMap(s: *const Snapshot, strategy: Strategy) errors.Error!bool {
        return switch (strategy) {
            .auto => s.fileBacked(),
            .map => if (s.fileBacked()) true else errors.fail(error.Config, "strategy 'map' needs a file-backed snapshot (Snapshot.load); use 'copy'", .{}),
            .copy => false,
        };
    }

    pub fn fileBacked(s: *const Snapshot) bool {
        return s.fd >= 0;
    }

    pub fn guestName(s: *const Snapshot) []const u8 {
        const br = std.mem.bytesToValue(state.BootRecord, s.parsed.get(.boot, state.vm_wide).?);
        const n = std.mem.indexOfScalar(u8, &br.guest_name, 0) orelse br.guest_name.len;
        return s.parsed.get(.boot, state.vm_wide).?[0..n];
    }
};

fn bad(comptime fmt: []const u8, args: anytype) errors.Error {
    return errors.fail(error.Snapshot, "snapshot: " ++ fmt, args);
}

/// Bit `i` of a page map (state.zig's page_map record): page i may be non-zero.
pub fn isPresent(map: []const u8, i: u64) bool {
    return (map[@intCast(i / 8)] >> @intCast(i % 8)) & 1 != 0;
}

fn countPresent(map: []const u8) u64 {
    var n: u64 = 0;
    for (map) |b| n += @popCount(b);
    return n;
}

fn anonMap(bytes: u64) errors.Error![]align(4096) u8 {
    const addr = linux.mmap(null, bytes, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .ANONYMOUS = true, .NORESERVE = true }, -1, 0);
    if (linux.errno(addr) != .SUCCESS) return errors.fail(error.OutOfMemory, "cannot map {d} MiB: E{s}", .{ bytes >> 20, @tagName(linux.errno(addr)) });
    return @as([*]align(4096) u8, @ptrFromInt(addr))[0..bytes];
}

fn allZero(bytes: []const u8) bool {
    for (bytes) |b| if (b != 0) return false;
    return true;
}

fn isZeroPage(p: *const [page]u8) bool {
    const words: *const [page / 8]u64 = @ptrCast(@alignCast(p));
    var acc: u64 = 0;
    for (words) |w| acc |= w;
    return acc == 0;
}

/// Captures a stopped VM. Only pages that can be non-zero are read: mincore
/// finds the resident ones, and a file-mapped VM adds its source page map.
pub fn capture(vm: *Vm) errors.Error!*Snapshot {
    if (!vm.booted) return errors.fail(error.Busy, "the VM has no guest to snapshot", .{});
    if (vm.running.swap(true, .acq_rel)) return errors.fail(error.Busy, "cannot snapshot a running VM: wait for run() to return", .{});
    defer vm.running.store(false, .release);
    if (vm.crash_len > 0) return errors.fail(error.GuestCrash, "cannot snapshot a crashed VM: {s}", .{vm.crash_msg[0..vm.crash_len]});

    try vm.completePendingIo();
    const pages = state.pageCount(vm.mem.len);
    const map = allocator.alloc(u8, @intCast(state.pageMapBytes(vm.mem.len))) catch return error.OutOfMemory;
    defer allocator.free(map);
    @memset(map, 0);
    const resident = allocator.alloc(u8, @intCast(pages)) catch return error.OutOfMemory;
    defer allocator.free(resident);
    if (linux.errno(linux.mincore(vm.mem.ptr, vm.mem.len, resident.ptr)) != .SUCCESS) @memset(resident, 1);

    const memory = try anonMap(vm.mem.len);
    errdefer _ = linux.munmap(memory.ptr, memory.len);
    var present: u64 = 0;
    var i: u64 = 0;
    while (i < pages) : (i += 1) {
        const maybe = (resident[@intCast(i)] & 1) != 0 or (if (vm.source_snap) |sn| isPresent(sn.parsed.pageMap(), i) else false);
        if (!maybe) continue;
        const dst: *[page]u8 = @ptrCast(memory[@intCast(i * page)..][0..page]);
        // A map-restored VM's memory is a file mapping: copy it safely first.
        try safe.copyMaybeMapped(dst, vm.mem[@intCast(i * page)..][0..page], vm.mapped());
        if (isZeroPage(dst)) continue;
        map[@intCast(i / 8)] |= @as(u8, 1) << @intCast(i % 8);
        present += 1;
    }
    const n = std.mem.indexOfScalar(u8, &vm.guest_name, 0) orelse vm.guest_name.len;
    const blob = try state.capture(vm, map, vm.guest_name[0..n]);
    errdefer allocator.free(blob);
    const parsed = try state.parse(blob);
    const s = allocator.create(Snapshot) catch return error.OutOfMemory;
    s.* = .{
        .blob = blob,
        .parsed = parsed,
        .memory = memory,
        .memory_owned = true,
        .present_pages = present,
        .created_unix_ns = unixNs(),
        .stored_bytes = 0,
    };
    s.stored_bytes = encodedBytes(s);
    return s;
}

fn unixNs() u64 {
    var ts: linux.timespec = undefined;
    _ = linux.clock_gettime(.REALTIME, &ts);
    return @as(u64, @intCast(ts.sec)) * std.time.ns_per_s + @as(u64, @intCast(ts.nsec));
}


fn memoryOffset(blob_len: u64) u64 {
    return std.mem.alignForward(u64, header_bytes + blob_len, page);
}

/// Size of the packed encoding, which is also what a full-layout file stores
/// (its zero pages are holes).
pub fn encodedBytes(s: *const Snapshot) u64 {
    return memoryOffset(s.blob.len) + s.present_pages * page;
}

fn memoryCrc(memory: []const u8, map: []const u8, pages: u64, packed_layout: bool) u32 {
    var crc = Crc32c.init();
    var i: u64 = 0;
    var k: u64 = 0;
    while (i < pages) : (i += 1) {
        if (!isPresent(map, i)) continue;
        const at = if (packed_layout) k * page else i * page;
        crc.update(memory[@intCast(at)..][0..page]);
        k += 1;
    }
    return crc.final();
}

fn writeHeader(h: *[header_bytes]u8, s: *const Snapshot, flags: u32, total: u64, mem_bytes: u64, mem_crc: u32) void {
    @memset(h, 0);
    @memcpy(h[0..8], &magic);
    std.mem.writeInt(u16, h[8..10], version_major, .little);
    std.mem.writeInt(u16, h[10..12], version_minor, .little);
    std.mem.writeInt(u32, h[12..16], arch_x86_64, .little);
    std.mem.writeInt(u32, h[16..20], header_bytes, .little);
    std.mem.writeInt(u32, h[20..24], 2, .little);
    std.mem.writeInt(u64, h[24..32], s.parsed.memory_bytes, .little);
    std.mem.writeInt(u32, h[32..36], s.parsed.vcpus, .little);
    std.mem.writeInt(u32, h[36..40], flags, .little);
    std.mem.writeInt(u64, h[40..48], s.created_unix_ns, .little);
    std.mem.writeInt(u64, h[48..56], total, .little);
    std.mem.writeInt(u64, h[56..64], s.present_pages, .little);
    writeSection(h, 0, kind_state, header_bytes, s.blob.len, Crc32c.hash(s.blob));
    writeSection(h, 1, kind_memory, memoryOffset(s.blob.len), mem_bytes, mem_crc);
    std.mem.writeInt(u32, h[64..68], headerCrc(h), .little);
}

fn writeSection(h: *[header_bytes]u8, i: usize, kind: u32, offset: u64, bytes: u64, crc: u32) void {
    const e = h[section_table_offset + i * section_entry_bytes ..][0..section_entry_bytes];
    std.mem.writeInt(u32, e[0..4], kind, .little);
    std.mem.writeInt(u64, e[8..16], offset, .little);
    std.mem.writeInt(u64, e[16..24], bytes, .little);
    std.mem.writeInt(u32, e[24..28], crc, .little);
}

fn headerCrc(h: *const [header_bytes]u8) u32 {
    var crc = Crc32c.init();
    crc.update(h[0..64]);
    crc.update(&[_]u8{ 0, 0, 0, 0 });
    crc.update(h[68 .. section_table_offset + max_sections * section_entry_bytes]);
    return crc.final();
}

/// The packed encoding, written into `out` (which must be encodedBytes long).
pub fn toBytes(s: *const Snapshot, out: []u8) errors.Error!void {
    std.debug.assert(out.len == encodedBytes(s));
    const map = s.parsed.pageMap();
    const pages = state.pageCount(s.parsed.memory_bytes);
    const mem_off = memoryOffset(s.blob.len);
    @memset(out[@intCast(header_bytes + s.blob.len)..@intCast(mem_off)], 0);
    @memcpy(out[@intCast(header_bytes)..][0..s.blob.len], s.blob);
    var crc = Crc32c.init();
    var i: u64 = 0;
    var k: u64 = 0;
    while (i < pages) : (i += 1) {
        if (!isPresent(map, i)) continue;
        const dst = out[@intCast(mem_off + k * page)..][0..page];
        try safe.copyMaybeMapped(dst, s.memory[@intCast(i * page)..][0..page], s.fileBacked());
        crc.update(dst);
        k += 1;
    }
    const mem_crc = crc.final();
    try checkRead(s, mem_crc);
    writeHeader(out[0..header_bytes], s, flag_packed, out.len, s.present_pages * page, mem_crc);
}

const Section = struct { offset: u64, bytes: u64, crc: u32 };

/// The parts of a file's status that a write changes (the inode cannot:
/// the snapshot holds its fd). Not ctime: renaming another file over the
/// path (what save() does) unlinks this one, which changes its ctime but
/// not its content. mtime has the file system's timestamp granularity.
pub const FileId = struct {
    size: u64 = 0,
    mtime_sec: i64 = 0,
    mtime_nsec: u32 = 0,

    pub fn of(fd: linux.fd_t) error{Stat}!FileId {
        var st: linux.Statx = undefined;
        if (linux.errno(linux.statx(fd, "", linux.AT.EMPTY_PATH, .{ .SIZE = true, .MTIME = true }, &st)) != .SUCCESS) return error.Stat;
        return .{ .size = st.size, .mtime_sec = st.mtime.sec, .mtime_nsec = st.mtime.nsec };
    }
};

/// The header and section table (`Snapshot.head`).
const head_bytes = section_table_offset + max_sections * section_entry_bytes;
/// How often a restore or reset of a loaded snapshot runs statx on its file.
const stat_interval_ns: u64 = 1_000_000;

/// Save and toBytes read all of memory: a read that hit a truncated page, or
/// memory whose checksum is not the one checked at load (the file was
/// rewritten in place), must not become a new file with valid checksums.
fn checkRead(s: *const Snapshot, mem_crc: u32) errors.Error!void {
    try s.checkFile();
    if (s.fileBacked() and mem_crc != s.memory_crc)
        return errors.fail(error.Snapshot, "the snapshot file's memory changed after it was loaded (checksum 0x{x}, 0x{x} at load): load it again", .{ mem_crc, s.memory_crc });
}

/// Test/fuzz helper: recomputes the section and header CRCs of an encoded
/// snapshot in place, wherever its (untrusted) section table points inside it.
pub fn fixChecksums(data: []u8) void {
    if (data.len < header_bytes) return;
    const h = data[0..header_bytes];
    var i: usize = 0;
    while (i < 2) : (i += 1) {
        const e = h[section_table_offset + i * section_entry_bytes ..][0..section_entry_bytes];
        const off = std.mem.readInt(u64, e[8..16], .little);
        const len = std.mem.readInt(u64, e[16..24], .little);
        if (off > data.len or data.len - off < len) continue;
        const body = data[@intCast(off)..][0..@intCast(len)];
        const crc = if (i == 0) Crc32c.hash(body) else blk: {
            // MEMORY's CRC covers present pages; recompute it when STATE parses.
            const st_e = h[section_table_offset..][0..section_entry_bytes];
            const so = std.mem.readInt(u64, st_e[8..16], .little);
            const sl = std.mem.readInt(u64, st_e[16..24], .little);
            if (so > data.len or data.len - so < sl) continue;
            const parsed = state.parse(data[@intCast(so)..][0..@intCast(sl)]) catch continue;
            const pages = state.pageCount(parsed.memory_bytes);
            const packed_layout = std.mem.readInt(u32, h[36..40], .little) & flag_packed != 0;
            const need = if (packed_layout) countPresent(parsed.pageMap()) * page else parsed.memory_bytes;
            if (body.len != need) continue;
            break :blk memoryCrc(body, parsed.pageMap(), pages, packed_layout);
        };
        std.mem.writeInt(u32, e[24..28], crc, .little);
    }
    std.mem.writeInt(u32, h[64..68], headerCrc(h), .little);
}

pub const Checked = struct {
    parsed: state.Parsed,
    blob: []const u8,
    memory: []const u8,
    packed_layout: bool,
    memory_offset: u64,
    present_pages: u64,
    created_unix_ns: u64,
    memory_crc: u32,
};

/// Runs every check, in the documented order, over an encoded snapshot.
pub fn check(data: []const u8) errors.Error!Checked {
    // 1. total size limit
    if (data.len > max_total_bytes) return bad("{d} bytes is over the {d}-byte limit", .{ data.len, max_total_bytes });
    if (data.len < header_bytes) return bad("truncated: {d} bytes, the header alone is {d}", .{ data.len, header_bytes });
    const h = data[0..header_bytes];
    // 2. magic
    if (!std.mem.eql(u8, h[0..8], &magic)) return bad("bad magic: not a kvmlab snapshot", .{});
    // 3. version
    const major = std.mem.readInt(u16, h[8..10], .little);
    const minor = std.mem.readInt(u16, h[10..12], .little);
    if (major != version_major or minor > version_minor)
        return bad("unsupported version {d}.{d} (this kvmlab reads {d}.0 .. {d}.{d})", .{ major, minor, version_major, version_major, version_minor });
    const arch = std.mem.readInt(u32, h[12..16], .little);
    if (arch != arch_x86_64) return bad("architecture {d} is not x86_64", .{arch});
    if (std.mem.readInt(u32, h[16..20], .little) != header_bytes) return bad("header size is not 4096", .{});
    // 4. section bounds
    const count = std.mem.readInt(u32, h[20..24], .little);
    if (count != 2) return bad("{d} sections; version 1 has exactly 2 (STATE, MEMORY)", .{count});
    const total = std.mem.readInt(u64, h[48..56], .little);
    if (total != data.len) return bad("truncated or padded: header says {d} bytes, got {d}", .{ total, data.len });
    var sections: [2]Section = undefined;
    for (&sections, 0..) |*sec, i| {
        const e = h[section_table_offset + i * section_entry_bytes ..][0..section_entry_bytes];
        const kind = std.mem.readInt(u32, e[0..4], .little);
        if (kind != i + 1) return bad("section {d} has kind {d}, expected {d}", .{ i, kind, i + 1 });
        sec.* = .{ .offset = std.mem.readInt(u64, e[8..16], .little), .bytes = std.mem.readInt(u64, e[16..24], .little), .crc = std.mem.readInt(u32, e[24..28], .little) };
        if (sec.offset < header_bytes or sec.offset > data.len or data.len - sec.offset < sec.bytes)
            return bad("section {s} (offset {d}, {d} bytes) lies outside the {d}-byte snapshot", .{ if (i == 0) "STATE" else "MEMORY", sec.offset, sec.bytes, data.len });
    }
    if (sections[0].bytes > state.max_blob_bytes) return bad("STATE section of {d} bytes is over the limit", .{sections[0].bytes});
    if (sections[1].offset % page != 0) return bad("MEMORY section is not page-aligned", .{});
    if (sections[0].offset + sections[0].bytes > sections[1].offset) return bad("STATE and MEMORY sections overlap", .{});
    const memory_bytes = std.mem.readInt(u64, h[24..32], .little);
    if (memory_bytes < boot.min_memory_bytes or memory_bytes > boot.max_memory_bytes or memory_bytes % boot.huge_page_bytes != 0)
        return bad("memory size {d} bytes is out of range", .{memory_bytes});
    const present = std.mem.readInt(u64, h[56..64], .little);
    if (present > state.pageCount(memory_bytes)) return bad("{d} present pages in a {d}-page guest", .{ present, state.pageCount(memory_bytes) });
    const flags = std.mem.readInt(u32, h[36..40], .little);
    if (flags & ~flag_packed != 0) return bad("unknown flags 0x{x}", .{flags});
    const packed_layout = flags & flag_packed != 0;
    const want_mem = if (packed_layout) present * page else memory_bytes;
    if (sections[1].bytes != want_mem) return bad("MEMORY section is {d} bytes, expected {d}", .{ sections[1].bytes, want_mem });
    // Reserved space must be zero: bytes nobody checks could carry anything.
    if (!allZero(h[68..section_table_offset]) or !allZero(h[section_table_offset + 2 * section_entry_bytes ..]))
        return bad("reserved header bytes are not zero", .{});
    for (0..2) |i| {
        const e = h[section_table_offset + i * section_entry_bytes ..][0..section_entry_bytes];
        if (!allZero(e[4..8]) or !allZero(e[28..32])) return bad("reserved section table bytes are not zero", .{});
    }
    if (!allZero(data[@intCast(sections[0].offset + sections[0].bytes)..@intCast(sections[1].offset)]))
        return bad("the padding before the MEMORY section is not zero", .{});
    // 5. checksums
    if (std.mem.readInt(u32, h[64..68], .little) != headerCrc(h)) return bad("checksum mismatch in the header", .{});
    const blob = data[@intCast(sections[0].offset)..][0..@intCast(sections[0].bytes)];
    if (Crc32c.hash(blob) != sections[0].crc) return bad("checksum mismatch in section STATE", .{});
    const parsed = try state.parse(blob);
    if (parsed.memory_bytes != memory_bytes) return bad("STATE says {d} bytes of memory, the header {d}", .{ parsed.memory_bytes, memory_bytes });
    if (countPresent(parsed.pageMap()) != present) return bad("page map has {d} pages, the header {d}", .{ countPresent(parsed.pageMap()), present });
    const memory = data[@intCast(sections[1].offset)..][0..@intCast(sections[1].bytes)];
    if (memoryCrc(memory, parsed.pageMap(), state.pageCount(memory_bytes), packed_layout) != sections[1].crc)
        return bad("checksum mismatch in section MEMORY", .{});
    // 6. semantic checks
    const vcpus = std.mem.readInt(u32, h[32..36], .little);
    if (vcpus != parsed.vcpus) return bad("header says {d} vCPUs, STATE {d}", .{ vcpus, parsed.vcpus });
    return .{
        .parsed = parsed,
        .blob = blob,
        .memory = memory,
        .packed_layout = packed_layout,
        .memory_offset = sections[1].offset,
        .present_pages = present,
        .created_unix_ns = std.mem.readInt(u64, h[40..48], .little),
        .memory_crc = sections[1].crc,
    };
}

/// Builds an owned snapshot from checked parts, expanding memory densely.
fn fromChecked(c: Checked, stored_bytes: u64) errors.Error!*Snapshot {
    const blob = allocator.dupe(u8, c.blob) catch return error.OutOfMemory;
    errdefer allocator.free(blob);
    const memory = try anonMap(c.parsed.memory_bytes);
    errdefer _ = linux.munmap(memory.ptr, memory.len);
    const parsed = state.parse(blob) catch unreachable; // same bytes as checked
    try copyPresent(memory, c.memory, parsed.pageMap(), c.packed_layout, true);
    const s = allocator.create(Snapshot) catch return error.OutOfMemory;
    s.* = .{ .blob = blob, .parsed = parsed, .memory = memory, .memory_owned = true, .present_pages = c.present_pages, .created_unix_ns = c.created_unix_ns, .stored_bytes = stored_bytes };
    return s;
}

/// Copies the present pages from a packed or dense source into dense memory.
pub fn copyPresent(dst: []u8, src: []const u8, map: []const u8, packed_layout: bool, src_mapped: bool) errors.Error!void {
    const pages = dst.len / page;
    var i: u64 = 0;
    var k: u64 = 0;
    while (i < pages) : (i += 1) {
        if (!isPresent(map, i)) continue;
        if (!packed_layout) {
            // Runs of present pages in one copy (one syscall on the safe path).
            var j = i;
            while (j < pages and isPresent(map, j)) j += 1;
            try safe.copyMaybeMapped(dst[@intCast(i * page)..@intCast(j * page)], src[@intCast(i * page)..@intCast(j * page)], src_mapped);
            i = j - 1;
            continue;
        }
        try safe.copyMaybeMapped(dst[@intCast(i * page)..][0..page], src[@intCast(k * page)..][0..page], src_mapped);
        k += 1;
    }
}

pub fn fromBytes(data: []const u8) errors.Error!*Snapshot {
    const c = try check(data);
    return fromChecked(c, data.len);
}

/// Maps a snapshot file read-only and checks it. A full-layout file's memory
/// is used in place (never read into the heap); the fd stays open for `map`.
pub fn load(path: [*:0]const u8) errors.Error!*Snapshot {
    const rc = linux.open(path, .{ .ACCMODE = .RDONLY, .CLOEXEC = true, .NOFOLLOW = false }, 0);
    if (linux.errno(rc) != .SUCCESS) return bad("cannot open {s}: E{s}", .{ path, @tagName(linux.errno(rc)) });
    const fd: linux.fd_t = @intCast(rc);
    var close_fd = true;
    defer if (close_fd) {
        _ = linux.close(fd);
    };
    var st: linux.Statx = undefined;
    if (linux.errno(linux.statx(fd, "", linux.AT.EMPTY_PATH, .{ .TYPE = true, .SIZE = true, .BLOCKS = true }, &st)) != .SUCCESS)
        return bad("cannot stat {s}", .{path});
    if (st.mode & linux.S.IFMT != linux.S.IFREG) return bad("{s} is not a regular file", .{path});
    // Before reading: a write from here on shows at the first use.
    const file_id = FileId.of(fd) catch return bad("cannot stat {s}", .{path});
    const size = st.size;
    if (size > max_total_bytes) return bad("{d} bytes is over the {d}-byte limit", .{ size, max_total_bytes });
    if (size < header_bytes) return bad("truncated: {d} bytes, the header alone is {d}", .{ size, header_bytes });
    const addr = linux.mmap(null, size, .{ .READ = true }, .{ .TYPE = .PRIVATE }, fd, 0);
    if (linux.errno(addr) != .SUCCESS) return bad("cannot map {s}: E{s}", .{ path, @tagName(linux.errno(addr)) });
    const file_map = @as([*]align(4096) u8, @ptrFromInt(addr))[0..size];
    errdefer _ = linux.munmap(file_map.ptr, file_map.len);
    const c = try check(file_map);
    const stored = @as(u64, st.blocks) * 512;
    if (c.packed_layout) {
        const s = try fromChecked(c, stored);
        _ = linux.munmap(file_map.ptr, file_map.len);
        return s;
    }
    try checkHoles(fd, file_map, c);
    const blob = allocator.dupe(u8, c.blob) catch return error.OutOfMemory;
    errdefer allocator.free(blob);
    const s = allocator.create(Snapshot) catch return error.OutOfMemory;
    s.* = .{
        .blob = blob,
        .parsed = state.parse(blob) catch unreachable,
        .memory = @alignCast(@constCast(c.memory)),
        .memory_owned = false,
        .fd = fd,
        .file_map = file_map,
        .memory_offset = c.memory_offset,
        .present_pages = c.present_pages,
        .created_unix_ns = c.created_unix_ns,
        .stored_bytes = stored,
        .file_id = file_id,
        .memory_crc = c.memory_crc,
        .head = file_map[0..head_bytes].*,
    };
    // A mapping the SIGBUS handler does not cover is refused: a lost page
    // of it (the file truncated) would kill the process.
    s.sigbus_slot = sigbus.register(@intFromPtr(file_map.ptr), file_map.len, &s.damaged) orelse {
        allocator.destroy(s); // the errdefers free the blob and the mapping
        return sigbus.unprotected();
    };
    close_fd = false;
    return s;
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

/// A full-layout file's MEMORY checksum covers the present pages only, and a
/// `map` restore shows every page of the file. So every page that the page
/// map says is zero must really be zero: walk the file's data extents
/// (SEEK_DATA/SEEK_HOLE: holes need no reading) and check the non-present
/// pages inside them. Costs what the file stores beyond its present pages:
/// nothing for a file written by save().
fn checkHoles(fd: linux.fd_t, file_map: []const u8, c: Checked) errors.Error!void {
    const map = c.parsed.pageMap();
    const start = c.memory_offset;
    const end = c.memory_offset + c.parsed.memory_bytes;
    var at = start;
    var buf: [page]u8 align(8) = undefined;
    while (at < end) {
        const d = linux.lseek(fd, @intCast(at), SEEK_DATA);
        if (linux.errno(d) != .SUCCESS) break; // ENXIO: no data after `at`
        if (d >= end) break;
        var h = linux.lseek(fd, @intCast(d), SEEK_HOLE);
        if (linux.errno(h) != .SUCCESS) h = end;
        const stop = @min(h, end);
        var pg = (d - start) / page;
        while (start + pg * page < stop) : (pg += 1) {
            if (isPresent(map, pg)) continue;
            try safe.copy(&buf, file_map[@intCast(start + pg * page)..][0..page]);
            if (!isZeroPage(&buf)) return bad("page {d} (guest address 0x{x}) holds data although the page map says it is zero: the file was modified", .{ pg, pg * page });
        }
        at = @max(stop, at + page);
    }
}

/// Writes the full layout (zero pages as holes) atomically: a 0600 temp file
/// in the same directory, fsync, rename over `path`, fsync the directory.
pub fn save(s: *const Snapshot, path: [*:0]const u8) errors.Error!void {
    const p = std.mem.span(path);
    if (p.len == 0 or p.len > 3000) return errors.fail(error.Config, "snapshot path is empty or too long", .{});
    var tmp_buf: [4096]u8 = undefined;
    const tmp = std.fmt.bufPrintSentinel(&tmp_buf, "{s}.tmp-{d}-{d}", .{ p, linux.getpid(), unixNs() }, 0) catch unreachable;
    const rc = linux.open(tmp.ptr, .{ .ACCMODE = .WRONLY, .CREAT = true, .EXCL = true, .CLOEXEC = true }, 0o600);
    if (linux.errno(rc) != .SUCCESS) return errors.fail(error.Config, "cannot create {s}: E{s}", .{ tmp, @tagName(linux.errno(rc)) });
    const fd: linux.fd_t = @intCast(rc);
    var ok = false;
    defer {
        _ = linux.close(fd);
        if (!ok) _ = linux.unlink(tmp.ptr);
    }
    const map = s.parsed.pageMap();
    const pages = state.pageCount(s.parsed.memory_bytes);
    const mem_off = memoryOffset(s.blob.len);
    const total = mem_off + s.parsed.memory_bytes;
    var hdr: [header_bytes]u8 align(8) = undefined;
    const mem_crc = memoryCrc(s.memory, map, pages, false);
    try checkRead(s, mem_crc);
    writeHeader(&hdr, s, 0, total, s.parsed.memory_bytes, mem_crc);
    try pwriteAll(fd, &hdr, 0, tmp);
    try pwriteAll(fd, s.blob, header_bytes, tmp);
    // Runs of present pages, one write each; zero pages stay holes.
    var i: u64 = 0;
    while (i < pages) {
        if (!isPresent(map, i)) {
            i += 1;
            continue;
        }
        var j = i;
        while (j < pages and isPresent(map, j)) j += 1;
        try pwriteAll(fd, s.memory[@intCast(i * page)..@intCast(j * page)], mem_off + i * page, tmp);
        i = j;
    }
    if (linux.errno(linux.ftruncate(fd, @intCast(total))) != .SUCCESS) return errors.fail(error.Config, "cannot size {s}", .{tmp});
    if (linux.errno(linux.fsync(fd)) != .SUCCESS) return errors.fail(error.Config, "fsync of {s} failed", .{tmp});
    try s.checkFile(); // the pages written were read after the checksum
    if (linux.errno(linux.rename(tmp.ptr, path)) != .SUCCESS) return errors.fail(error.Config, "cannot rename {s} to {s}: E{s}", .{ tmp, p, @tagName(linux.errno(linux.rename(tmp.ptr, path))) });
    ok = true;
    // Make the rename durable.
    const dir_end = std.mem.lastIndexOfScalar(u8, p, '/');
    var dir_buf: [4096]u8 = undefined;
    const dir = if (dir_end) |e| (std.fmt.bufPrintSentinel(&dir_buf, "{s}", .{if (e == 0) "/" else p[0..e]}, 0) catch unreachable) else @as([:0]const u8, ".");
    const dfd = linux.open(dir.ptr, .{ .ACCMODE = .RDONLY, .DIRECTORY = true, .CLOEXEC = true }, 0);
    if (linux.errno(dfd) == .SUCCESS) {
        _ = linux.fsync(@intCast(dfd));
        _ = linux.close(@intCast(dfd));
    }
}

fn pwriteAll(fd: linux.fd_t, bytes: []const u8, offset: u64, what: []const u8) errors.Error!void {
    var done: usize = 0;
    while (done < bytes.len) {
        const chunk = @min(bytes.len - done, 1 << 30);
        const rc = linux.pwrite(fd, bytes[done..].ptr, chunk, @intCast(offset + done));
        switch (linux.errno(rc)) {
            .SUCCESS => done += rc,
            .INTR => {},
            else => |e| return errors.fail(error.Config, "writing {s} failed: E{s}", .{ what, @tagName(e) }),
        }
    }
}

/// Per-phase times of one restore, integer nanoseconds.
pub const RestoreTimes = struct { memory_ns: u64 = 0, vcpu_ns: u64 = 0, devices_ns: u64 = 0 };

/// Restores into a fresh shell (never run, zeroed memory) of the same shape.
/// `file`: map that loaded snapshot's memory over guest memory instead of
/// copying `memory`.
pub fn restoreInto(vm: *Vm, parsed: *const state.Parsed, memory: []const u8, packed_layout: bool, source_mapped: bool, file: ?*Snapshot, times: *RestoreTimes) errors.Error!void {
    if (parsed.memory_bytes != vm.mem.len or parsed.vcpus != vm.vcpu_count)
        return errors.fail(error.Snapshot, "snapshot is {d} MiB with {d} vCPU(s); the VM shell is {d} MiB with {d} vCPU(s)", .{ parsed.memory_bytes >> 20, parsed.vcpus, vm.mem.len >> 20, vm.vcpu_count });
    if (vm.booted) return errors.fail(error.Busy, "restore needs an empty VM shell", .{});
    try state.checkHost(parsed, vm.vm_fd, vm.vcpus[0].fd);
    const t0 = vm_mod.monotonicNs();
    if (file) |f| {
        // Copy-on-write mapping of the file over guest memory: O(1) in memory
        // size. KVM's MMU notifier drops stale translations of the old pages.
        const addr = linux.mmap(vm.mem.ptr, vm.mem.len, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .FIXED = true, .NORESERVE = true }, f.fd, @intCast(f.memory_offset));
        if (linux.errno(addr) != .SUCCESS) return errors.fail(error.KvmFailed, "mapping the snapshot over guest memory failed: E{s}", .{@tagName(linux.errno(addr))});
        vm.source_snap = f.retain();
        if (vm.sigbus_slot == null) vm.sigbus_slot = sigbus.register(@intFromPtr(vm.mem.ptr), vm.mem.len, &vm.mem_damaged) orelse return sigbus.unprotected();
    } else {
        try copyPresent(vm.mem, memory, parsed.pageMap(), packed_layout, source_mapped);
    }
    const t1 = vm_mod.monotonicNs();
    var st: state.RestoreTimes = .{};
    try state.restore(vm, parsed, &st);
    const br = std.mem.bytesToValue(state.BootRecord, parsed.get(.boot, state.vm_wide).?);
    vm.guest_name = br.guest_name;
    times.* = .{ .memory_ns = t1 - t0, .vcpu_ns = st.vcpu_ns, .devices_ns = st.devices_ns };
}

/// Restores a snapshot into a fresh shell with the chosen memory strategy.
pub fn restoreSnapshot(vm: *Vm, s: *Snapshot, strategy: Strategy, times: *RestoreTimes) errors.Error!void {
    try s.checkIntact();
    try restoreInto(vm, &s.parsed, s.memory, false, s.fileBacked(), if (try s.useMap(strategy)) s else null, times);
}

test "check order: size, magic, version, bounds" {
    try std.testing.expectError(error.Snapshot, check("short"));
    var h: [header_bytes]u8 = @splat(0);
    try std.testing.expectError(error.Snapshot, check(&h)); // bad magic
    @memcpy(h[0..8], &magic);
    std.mem.writeInt(u16, h[8..10], 9, .little);
    try std.testing.expectError(error.Snapshot, check(&h)); // version
    std.mem.writeInt(u16, h[8..10], 1, .little);
    std.mem.writeInt(u32, h[12..16], 1, .little);
    std.mem.writeInt(u32, h[16..20], header_bytes, .little);
    std.mem.writeInt(u32, h[20..24], 0xFFFF_FFFF, .little); // hostile section count
    try std.testing.expectError(error.Snapshot, check(&h));
}
