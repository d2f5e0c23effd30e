//! kvmlab snapshots: guest memory plus the state blob of state.zig, in one
//! checked, self-describing file or byte string.
//!
//! File layout (little-endian; the header is `Header` below, an extern
//! struct in the C ABI as kvmlab_snapshot_header, so tools read it through
//! the generated header instead of offsets):
//!
//!   offset 0                          384            4096
//!   +---------------------------------+--------------+----------------+-----+------------------+
//!   | Header (with the section table)  | zero         | STATE section  | pad | MEMORY section   |
//!   +---------------------------------+--------------+----------------+-----+------------------+
//!                                                      CRC32C            page-aligned, CRC32C
//!
//! The header CRC32C covers the Header with its crc field zero. MEMORY comes
//! in two layouts. Full (files written by `save`): `memory_bytes`
//! long, page i at offset i*4096, all-zero pages left as holes, so the section
//! can be mapped copy-on-write straight into a VM (`map` restore) and a 256 MiB
//! guest that touched 2 MiB takes ~2 MiB of disk. Packed (`to_bytes`): only the
//! pages set in STATE's page map, in page order. Either way its CRC32C covers
//! the present pages in page order, so the checksum costs what is stored.
//!
//! `check` runs named steps in a fixed order (`check_order`) before anything
//! is allocated, each failing with its own id (errors.Check): sizes and
//! identity first, then section bounds, reserved bytes and padding, then
//! checksums, then the STATE blob (state.parse), then semantic agreement.
//! `load` of a full-layout file also checks that no page the page map calls
//! zero holds data (SEEK_DATA/SEEK_HOLE), since a `map` restore would show it.
const std = @import("std");
const linux = std.os.linux;
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const shell = @import("shell.zig");
const safe = @import("safe.zig");
const sigbus = @import("sigbus.zig");

const allocator = std.heap.c_allocator;
const Crc32c = std.hash.crc.@"CRC-32/ISCSI";

pub const magic = "KVMLSNAP".*;
pub const version_major: u16 = 1;
pub const version_minor: u16 = 0;
pub const header_bytes: u64 = 4096;
pub const max_sections: u32 = 8;
pub const page = boot.page_bytes;
/// Largest snapshot accepted: the largest guest plus its state.
pub const max_total_bytes: u64 = boot.max_memory_bytes + header_bytes + state.max_blob_bytes + page;

pub const SectionKind = enum(c_int) { state = 1, memory = 2 };
pub const Arch = enum(c_int) { x86_64 = 1 };
/// Header.flags bits.
pub const Flag = enum(c_int) {
    /// MEMORY holds only the present pages, in page order (to_bytes).
    packed_memory = 1,
};

/// One entry of the section table.
pub const Section = extern struct {
    /// A SectionKind value.
    kind: u32,
    reserved0: u32,
    offset: u64,
    bytes: u64,
    crc32c: u32,
    reserved1: u32,
};

/// The start of every snapshot; the rest of its 4096 bytes is zero.
pub const Header = extern struct {
    magic: [8]u8,
    version_major: u16,
    version_minor: u16,
    /// An Arch value.
    arch: u32,
    /// Always 4096.
    header_bytes: u32,
    section_count: u32,
    memory_bytes: u64,
    vcpus: u32,
    /// Flag bits.
    flags: u32,
    created_unix_ns: u64,
    total_bytes: u64,
    present_pages: u64,
    /// CRC32C of this struct with this field zero.
    header_crc32c: u32,
    reserved: [60]u8,
    sections: [max_sections]Section,
};

comptime {
    std.debug.assert(@import("builtin").cpu.arch.endian() == .little); // extern structs are the file format
    std.debug.assert(@sizeOf(Section) == 32);
    std.debug.assert(@offsetOf(Header, "memory_bytes") == 24);
    std.debug.assert(@offsetOf(Header, "vcpus") == 32);
    std.debug.assert(@offsetOf(Header, "created_unix_ns") == 40);
    std.debug.assert(@offsetOf(Header, "present_pages") == 56);
    std.debug.assert(@offsetOf(Header, "header_crc32c") == 64);
    std.debug.assert(@offsetOf(Header, "sections") == 128);
    std.debug.assert(@sizeOf(Header) == 384);
}

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
    head: [@sizeOf(Header)]u8 = @splat(0),
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
    /// use fails too (check id `damaged`). The restore and reset hot paths:
    /// the mapped header and section table against the copy from load (a
    /// few dozen ns; another snapshot written over the file differs there, a
    /// truncated header page reads as zeros), and the file's size and mtime
    /// (statx, ~5 us under kvm_pvm) at most every `stat_interval_ns`.
    pub fn checkIntact(s: *const Snapshot) errors.Error!void {
        return s.checkWhole(false);
    }

    /// checkIntact with statx every time (save, toBytes, info: not hot).
    pub fn checkFile(s: *const Snapshot) errors.Error!void {
        return s.checkWhole(true);
    }

    /// checkIntact without the statx: the take of a prepared VM, which was
    /// restored with the full check ahead and is checked again by the reset
    /// at each release (a statx measured ~8 us of a ~20 us take with cold
    /// caches). docs/security.md says what that leaves out.
    pub fn checkHeader(s: *const Snapshot) errors.Error!void {
        if (s.damaged.load(.acquire)) return safe.truncated();
        if (s.fd < 0) return;
        if (!std.mem.eql(u8, s.file_map[0..@sizeOf(Header)], &s.head)) return s.changed(s.file_id.size);
    }

    fn checkWhole(s: *const Snapshot, always_stat: bool) errors.Error!void {
        try s.checkHeader();
        if (s.fd < 0) return;
        const now_ns = shell.monotonicNs();
        if (!always_stat and now_ns -% s.last_stat_ns.load(.monotonic) < stat_interval_ns) return;
        @constCast(&s.last_stat_ns).store(now_ns, .monotonic);
        const now = FileId.of(s.fd) catch return;
        if (!std.meta.eql(now, s.file_id)) return s.changed(now.size);
    }

    fn changed(s: *const Snapshot, size_now: u64) errors.Error {
        @constCast(&s.damaged).store(true, .release);
        if (size_now < s.file_id.size) return safe.truncated();
        return errors.fail(.damaged, "the snapshot file was rewritten after it was loaded (its header, size or mtime changed); load it again", .{});
    }

    fn destroy(s: *Snapshot) void {
        sigbus.unregister(s.sigbus_slot);
        if (s.memory_owned and s.memory.len > 0) _ = linux.munmap(s.memory.ptr, s.memory.len);
        if (s.file_map.len > 0) _ = linux.munmap(s.file_map.ptr, s.file_map.len);
        if (s.fd >= 0) _ = linux.close(s.fd);
        allocator.free(s.blob);
        allocator.destroy(s);
    }

    pub fn fileBacked(s: *const Snapshot) bool {
        return s.fd >= 0;
    }

    /// How copies out of `memory` stay safe (safe.copyGuarded): null in
    /// memory; for a loaded file, fast while kvmlab's SIGBUS handler covers it.
    pub fn memoryGuard(s: *const Snapshot) ?safe.Guard {
        if (!s.fileBacked()) return null;
        return safe.Guard.init(&s.damaged, s.sigbus_slot != null);
    }

    pub fn guestName(s: *const Snapshot) []const u8 {
        const br = std.mem.bytesToValue(state.BootRecord, s.parsed.get(.boot, state.vm_wide).?);
        const n = std.mem.indexOfScalar(u8, &br.guest_name, 0) orelse br.guest_name.len;
        return s.parsed.get(.boot, state.vm_wide).?[0..n];
    }
};

fn bad(check_id: errors.Check, comptime fmt: []const u8, args: anytype) errors.Error {
    return errors.fail(check_id, "snapshot: " ++ fmt, args);
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
    if (linux.errno(addr) != .SUCCESS) return errors.fail(.snapshot_memory_map, "cannot map {d} MiB: E{s}", .{ bytes >> 20, @tagName(linux.errno(addr)) });
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
/// finds the resident ones, and a file-mapped VM adds `source_map`, the page
/// map of the snapshot its memory maps.
pub fn capture(vm: *shell.Vm, source_map: ?[]const u8) errors.Error!*Snapshot {
    if (!vm.booted) return errors.fail(.vm_no_guest, "the VM has no guest to snapshot", .{});
    if (vm.running.swap(true, .acq_rel)) return errors.fail(.vm_running, "cannot snapshot a running VM: wait for run() to return", .{});
    defer vm.running.store(false, .release);
    if (vm.crash_len > 0) return errors.fail(.snapshot_crashed, "cannot snapshot a crashed VM: {s}", .{vm.crash_msg[0..vm.crash_len]});

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
    // A map-restored VM's memory is a file mapping: copy it safely.
    const guard = vm.memoryGuard();
    while (i < pages) : (i += 1) {
        const maybe = (resident[@intCast(i)] & 1) != 0 or (if (source_map) |m| isPresent(m, i) else false);
        if (!maybe) continue;
        const dst: *[page]u8 = @ptrCast(memory[@intCast(i * page)..][0..page]);
        try safe.copyGuarded(dst, vm.mem[@intCast(i * page)..][0..page], guard);
        if (isZeroPage(dst)) continue;
        map[@intCast(i / 8)] |= @as(u8, 1) << @intCast(i % 8);
        present += 1;
    }
    try safe.finish(guard);
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
    return shell.clockNs(.REALTIME);
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

fn writeHeader(out: *[header_bytes]u8, s: *const Snapshot, flags: u32, total: u64, mem_bytes: u64, mem_crc: u32) void {
    var h = std.mem.zeroes(Header);
    h.magic = magic;
    h.version_major = version_major;
    h.version_minor = version_minor;
    h.arch = @intFromEnum(Arch.x86_64);
    h.header_bytes = header_bytes;
    h.section_count = 2;
    h.memory_bytes = s.parsed.memory_bytes;
    h.vcpus = s.parsed.vcpus;
    h.flags = flags;
    h.created_unix_ns = s.created_unix_ns;
    h.total_bytes = total;
    h.present_pages = s.present_pages;
    h.sections[0] = .{ .kind = @intFromEnum(SectionKind.state), .reserved0 = 0, .offset = header_bytes, .bytes = s.blob.len, .crc32c = Crc32c.hash(s.blob), .reserved1 = 0 };
    h.sections[1] = .{ .kind = @intFromEnum(SectionKind.memory), .reserved0 = 0, .offset = memoryOffset(s.blob.len), .bytes = mem_bytes, .crc32c = mem_crc, .reserved1 = 0 };
    h.header_crc32c = headerCrc(h);
    @memset(out, 0);
    @memcpy(out[0..@sizeOf(Header)], std.mem.asBytes(&h));
}

fn headerCrc(h: Header) u32 {
    var copy = h;
    copy.header_crc32c = 0;
    return Crc32c.hash(std.mem.asBytes(&copy));
}

/// The header of an encoded snapshot (copied out: `data` may be unaligned).
pub fn readHeader(data: []const u8) Header {
    std.debug.assert(data.len >= @sizeOf(Header));
    return std.mem.bytesToValue(Header, data[0..@sizeOf(Header)]);
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
    const guard = s.memoryGuard();
    while (i < pages) : (i += 1) {
        if (!isPresent(map, i)) continue;
        const dst = out[@intCast(mem_off + k * page)..][0..page];
        try safe.copyGuarded(dst, s.memory[@intCast(i * page)..][0..page], guard);
        crc.update(dst);
        k += 1;
    }
    try safe.finish(guard);
    const mem_crc = crc.final();
    try checkRead(s, mem_crc);
    writeHeader(out[0..header_bytes], s, @intFromEnum(Flag.packed_memory), out.len, s.present_pages * page, mem_crc);
}

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

/// How often a restore or reset of a loaded snapshot runs statx on its file.
const stat_interval_ns: u64 = 1_000_000;

/// Save and toBytes read all of memory: a read that hit a truncated page, or
/// memory whose checksum is not the one checked at load (the file was
/// rewritten in place), must not become a new file with valid checksums.
fn checkRead(s: *const Snapshot, mem_crc: u32) errors.Error!void {
    try s.checkFile();
    if (s.fileBacked() and mem_crc != s.memory_crc)
        return errors.fail(.damaged, "the snapshot file's memory changed after it was loaded (checksum 0x{x}, 0x{x} at load): load it again", .{ mem_crc, s.memory_crc });
}

/// Test/fuzz helper: recomputes the section and header CRCs of an encoded
/// snapshot in place, wherever its (untrusted) section table points inside it.
pub fn fixChecksums(data: []u8) void {
    if (data.len < header_bytes) return;
    var h = readHeader(data);
    for (h.sections[0..2], 0..) |*e, i| {
        if (e.offset > data.len or data.len - e.offset < e.bytes) continue;
        const body = data[@intCast(e.offset)..][0..@intCast(e.bytes)];
        e.crc32c = if (i == 0) Crc32c.hash(body) else blk: {
            // MEMORY's CRC covers present pages; recompute it when STATE parses.
            const st = h.sections[0];
            if (st.offset > data.len or data.len - st.offset < st.bytes) continue;
            const parsed = state.parse(data[@intCast(st.offset)..][0..@intCast(st.bytes)]) catch continue;
            const packed_layout = h.flags & @intFromEnum(Flag.packed_memory) != 0;
            const need = if (packed_layout) countPresent(parsed.pageMap()) * page else parsed.memory_bytes;
            if (body.len != need) continue;
            break :blk memoryCrc(body, parsed.pageMap(), state.pageCount(parsed.memory_bytes), packed_layout);
        };
    }
    h.header_crc32c = headerCrc(h);
    @memcpy(data[0..@sizeOf(Header)], std.mem.asBytes(&h));
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

/// The steps of `check`, in the order they run. Each refuses with its own id.
pub const check_order = [_]errors.Check{
    .size,          .magic,        .version,        .arch,           .header_size,
    .section_count, .total_bytes,  .section_kind,   .state_limit,    .section_bounds,
    .memory_alignment, .section_overlap, .memory_size, .present_pages, .flags,
    .memory_section_size, .reserved, .padding,      .header_crc,     .state_crc,
    .state_memory,  .page_count,   .memory_crc,     .vcpu_count,
};

/// What the steps of `check` have established so far.
const Progress = struct {
    data: []const u8,
    h: Header = undefined,
    packed_layout: bool = false,
    blob: []const u8 = &.{},
    memory: []const u8 = &.{},
    parsed: state.Parsed = undefined,

    fn state_section(p: *const Progress) Section {
        return p.h.sections[0];
    }
    fn memory_section(p: *const Progress) Section {
        return p.h.sections[1];
    }
};

/// Runs every step of `check_order` over an encoded snapshot.
pub fn check(data: []const u8) errors.Error!Checked {
    var p = Progress{ .data = data };
    inline for (check_order) |id| {
        try step(id, &p);
        // The STATE blob is parsed between the STATE checksum and the
        // semantic checks (it fails with its own state_* ids).
        if (id == .state_crc) p.parsed = try state.parse(p.blob);
    }
    return .{
        .parsed = p.parsed,
        .blob = p.blob,
        .memory = p.memory,
        .packed_layout = p.packed_layout,
        .memory_offset = p.memory_section().offset,
        .present_pages = p.h.present_pages,
        .created_unix_ns = p.h.created_unix_ns,
        .memory_crc = p.memory_section().crc32c,
    };
}

fn step(comptime id: errors.Check, p: *Progress) errors.Error!void {
    const data = p.data;
    const h = &p.h;
    switch (id) {
        .size => {
            if (data.len > max_total_bytes) return bad(id, "{d} bytes is over the {d}-byte limit", .{ data.len, max_total_bytes });
            if (data.len < header_bytes) return bad(id, "truncated: {d} bytes, the header alone is {d}", .{ data.len, header_bytes });
            h.* = readHeader(data);
        },
        .magic => if (!std.mem.eql(u8, &h.magic, &magic)) return bad(id, "bad magic: not a kvmlab snapshot", .{}),
        .version => if (h.version_major != version_major or h.version_minor > version_minor)
            return bad(id, "unsupported version {d}.{d} (this kvmlab reads {d}.0 .. {d}.{d})", .{ h.version_major, h.version_minor, version_major, version_major, version_minor }),
        .arch => if (h.arch != @intFromEnum(Arch.x86_64)) return bad(id, "architecture {d} is not x86_64", .{h.arch}),
        .header_size => if (h.header_bytes != header_bytes) return bad(id, "header size is not 4096", .{}),
        .section_count => if (h.section_count != 2) return bad(id, "{d} sections; version 1 has exactly 2 (STATE, MEMORY)", .{h.section_count}),
        .total_bytes => if (h.total_bytes != data.len) return bad(id, "truncated or padded: header says {d} bytes, got {d}", .{ h.total_bytes, data.len }),
        .section_kind => for (h.sections[0..2], 0..) |e, i| {
            if (e.kind != i + 1) return bad(id, "section {d} has kind {d}, expected {d}", .{ i, e.kind, i + 1 });
        },
        .state_limit => if (p.state_section().bytes > state.max_blob_bytes) return bad(id, "STATE section of {d} bytes is over the limit", .{p.state_section().bytes}),
        .section_bounds => for (h.sections[0..2], [_][]const u8{ "STATE", "MEMORY" }) |e, name| {
            if (e.offset < header_bytes or e.offset > data.len or data.len - e.offset < e.bytes)
                return bad(id, "section {s} (offset {d}, {d} bytes) lies outside the {d}-byte snapshot", .{ name, e.offset, e.bytes, data.len });
        },
        .memory_alignment => if (p.memory_section().offset % page != 0) return bad(id, "MEMORY section is not page-aligned", .{}),
        .section_overlap => if (p.state_section().offset + p.state_section().bytes > p.memory_section().offset) return bad(id, "STATE and MEMORY sections overlap", .{}),
        .memory_size => if (h.memory_bytes < boot.min_memory_bytes or h.memory_bytes > boot.max_memory_bytes or h.memory_bytes % boot.huge_page_bytes != 0)
            return bad(id, "memory size {d} bytes is out of range", .{h.memory_bytes}),
        .present_pages => if (h.present_pages > state.pageCount(h.memory_bytes)) return bad(id, "{d} present pages in a {d}-page guest", .{ h.present_pages, state.pageCount(h.memory_bytes) }),
        .flags => {
            if (h.flags & ~@as(u32, @intFromEnum(Flag.packed_memory)) != 0) return bad(id, "unknown flags 0x{x}", .{h.flags});
            p.packed_layout = h.flags & @intFromEnum(Flag.packed_memory) != 0;
        },
        .memory_section_size => {
            const want = if (p.packed_layout) h.present_pages * page else h.memory_bytes;
            if (p.memory_section().bytes != want) return bad(id, "MEMORY section is {d} bytes, expected {d}", .{ p.memory_section().bytes, want });
        },
        // Reserved space must be zero: bytes nobody checks could carry anything.
        .reserved => {
            if (!allZero(&h.reserved) or !allZero(std.mem.sliceAsBytes(h.sections[2..])) or !allZero(data[@sizeOf(Header)..header_bytes]))
                return bad(id, "reserved header bytes are not zero", .{});
            for (h.sections[0..2]) |e| if (e.reserved0 != 0 or e.reserved1 != 0) return bad(id, "reserved section table bytes are not zero", .{});
        },
        .padding => if (!allZero(data[@intCast(p.state_section().offset + p.state_section().bytes)..@intCast(p.memory_section().offset)]))
            return bad(id, "the padding before the MEMORY section is not zero", .{}),
        .header_crc => if (h.header_crc32c != headerCrc(h.*)) return bad(id, "checksum mismatch in the header", .{}),
        .state_crc => {
            p.blob = data[@intCast(p.state_section().offset)..][0..@intCast(p.state_section().bytes)];
            if (Crc32c.hash(p.blob) != p.state_section().crc32c) return bad(id, "checksum mismatch in section STATE", .{});
        },
        .state_memory => if (p.parsed.memory_bytes != h.memory_bytes) return bad(id, "STATE says {d} bytes of memory, the header {d}", .{ p.parsed.memory_bytes, h.memory_bytes }),
        .page_count => if (countPresent(p.parsed.pageMap()) != h.present_pages) return bad(id, "page map has {d} pages, the header {d}", .{ countPresent(p.parsed.pageMap()), h.present_pages }),
        .memory_crc => {
            p.memory = data[@intCast(p.memory_section().offset)..][0..@intCast(p.memory_section().bytes)];
            if (memoryCrc(p.memory, p.parsed.pageMap(), state.pageCount(h.memory_bytes), p.packed_layout) != p.memory_section().crc32c)
                return bad(id, "checksum mismatch in section MEMORY", .{});
        },
        .vcpu_count => if (h.vcpus != p.parsed.vcpus) return bad(id, "header says {d} vCPUs, STATE {d}", .{ h.vcpus, p.parsed.vcpus }),
        else => comptime unreachable,
    }
}

/// Builds an owned snapshot from checked parts, expanding memory densely.
fn fromChecked(c: Checked, stored_bytes: u64) errors.Error!*Snapshot {
    const blob = allocator.dupe(u8, c.blob) catch return error.OutOfMemory;
    errdefer allocator.free(blob);
    const memory = try anonMap(c.parsed.memory_bytes);
    errdefer _ = linux.munmap(memory.ptr, memory.len);
    const parsed = state.parse(blob) catch unreachable; // same bytes as checked
    try copyPresent(memory, c.memory, parsed.pageMap(), c.packed_layout, safe.Guard.unknown); // the caller's bytes
    const s = allocator.create(Snapshot) catch return error.OutOfMemory;
    s.* = .{ .blob = blob, .parsed = parsed, .memory = memory, .memory_owned = true, .present_pages = c.present_pages, .created_unix_ns = c.created_unix_ns, .stored_bytes = stored_bytes };
    return s;
}

/// Copies the present pages from a packed or dense source into dense memory
/// (`src_guard`: how reads of `src` stay safe, see safe.copyGuarded).
pub fn copyPresent(dst: []u8, src: []const u8, map: []const u8, packed_layout: bool, src_guard: ?safe.Guard) errors.Error!void {
    const pages = dst.len / page;
    var i: u64 = 0;
    var k: u64 = 0;
    while (i < pages) : (i += 1) {
        if (!isPresent(map, i)) continue;
        if (!packed_layout) {
            // Runs of present pages in one copy (one syscall on the safe path).
            var j = i;
            while (j < pages and isPresent(map, j)) j += 1;
            try safe.copyGuarded(dst[@intCast(i * page)..@intCast(j * page)], src[@intCast(i * page)..@intCast(j * page)], src_guard);
            i = j - 1;
            continue;
        }
        try safe.copyGuarded(dst[@intCast(i * page)..][0..page], src[@intCast(k * page)..][0..page], src_guard);
        k += 1;
    }
    try safe.finish(src_guard);
}

pub fn fromBytes(data: []const u8) errors.Error!*Snapshot {
    const c = try check(data);
    return fromChecked(c, data.len);
}

/// Maps a snapshot file read-only and checks it. A full-layout file's memory
/// is used in place (never read into the heap); the fd stays open for `map`.
pub fn load(path: [*:0]const u8) errors.Error!*Snapshot {
    const rc = linux.open(path, .{ .ACCMODE = .RDONLY, .CLOEXEC = true, .NOFOLLOW = false }, 0);
    if (linux.errno(rc) != .SUCCESS) return bad(.file, "cannot open {s}: E{s}", .{ path, @tagName(linux.errno(rc)) });
    const fd: linux.fd_t = @intCast(rc);
    var close_fd = true;
    defer if (close_fd) {
        _ = linux.close(fd);
    };
    var st: linux.Statx = undefined;
    if (linux.errno(linux.statx(fd, "", linux.AT.EMPTY_PATH, .{ .TYPE = true, .SIZE = true, .BLOCKS = true }, &st)) != .SUCCESS)
        return bad(.file, "cannot stat {s}", .{path});
    if (st.mode & linux.S.IFMT != linux.S.IFREG) return bad(.file, "{s} is not a regular file", .{path});
    // Before reading: a write from here on shows at the first use.
    const file_id = FileId.of(fd) catch return bad(.file, "cannot stat {s}", .{path});
    const size = st.size;
    if (size > max_total_bytes) return bad(.size, "{d} bytes is over the {d}-byte limit", .{ size, max_total_bytes });
    if (size < header_bytes) return bad(.size, "truncated: {d} bytes, the header alone is {d}", .{ size, header_bytes });
    const addr = linux.mmap(null, size, .{ .READ = true }, .{ .TYPE = .PRIVATE }, fd, 0);
    if (linux.errno(addr) != .SUCCESS) return bad(.file, "cannot map {s}: E{s}", .{ path, @tagName(linux.errno(addr)) });
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
        .head = file_map[0..@sizeOf(Header)].*,
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
            if (!isZeroPage(&buf)) return bad(.holes, "page {d} (guest address 0x{x}) holds data although the page map says it is zero: the file was modified", .{ pg, pg * page });
        }
        at = @max(stop, at + page);
    }
}

/// Writes the full layout (zero pages as holes) atomically: a 0600 temp file
/// in the same directory, fsync, rename over `path`, fsync the directory.
pub fn save(s: *const Snapshot, path: [*:0]const u8) errors.Error!void {
    const p = std.mem.span(path);
    if (p.len == 0 or p.len > 3000) return errors.fail(.snapshot_path, "snapshot path is empty or too long", .{});
    var tmp_buf: [4096]u8 = undefined;
    const tmp = std.fmt.bufPrintSentinel(&tmp_buf, "{s}.tmp-{d}-{d}", .{ p, linux.getpid(), unixNs() }, 0) catch unreachable;
    const rc = linux.open(tmp.ptr, .{ .ACCMODE = .WRONLY, .CREAT = true, .EXCL = true, .CLOEXEC = true }, 0o600);
    if (linux.errno(rc) != .SUCCESS) return errors.fail(.save_create, "cannot create {s}: E{s}", .{ tmp, @tagName(linux.errno(rc)) });
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
    if (linux.errno(linux.ftruncate(fd, @intCast(total))) != .SUCCESS) return errors.fail(.save_write, "cannot size {s}", .{tmp});
    if (linux.errno(linux.fsync(fd)) != .SUCCESS) return errors.fail(.save_write, "fsync of {s} failed", .{tmp});
    try s.checkFile(); // the pages written were read after the checksum
    if (linux.errno(linux.rename(tmp.ptr, path)) != .SUCCESS) return errors.fail(.save_rename, "cannot rename {s} to {s}: E{s}", .{ tmp, p, @tagName(linux.errno(linux.rename(tmp.ptr, path))) });
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
            else => |e| return errors.fail(.save_write, "writing {s} failed: E{s}", .{ what, @tagName(e) }),
        }
    }
}

