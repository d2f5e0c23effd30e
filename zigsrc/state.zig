//! VM state other than memory: capture from a stopped VM into a blob, check a
//! blob, and restore it into a fresh shell. The blob is `snap.vcpu_state` in
//! Python and the STATE section of a snapshot file.
//!
//! Blob layout (little-endian, every record 8-byte aligned):
//!
//!   0        8        12       16       24          28        32
//!   +--------+--------+--------+--------+-----------+---------+------------------
//!   | magic  | major  | minor  | vcpus  | memory    | records | reserved | records...
//!   |KVMLSTAT| u16    | u16    | u32    | bytes u64 | u32     | u32      |
//!   +--------+--------+--------+--------+-----------+---------+------------------
//!   record:  | tag u32 | vcpu u32 (0xffffffff = VM-wide) | bytes u32 | reserved u32 | data, padded to 8 |
//!
//! Tags are `Tag` below. Per vCPU: REGS, SREGS, XSAVE or FPU, XCRS (if the host
//! has them), MSRS (every MSR KVM_GET_MSR_INDEX_LIST reports and the vCPU can
//! read), LAPIC, MP_STATE, EVENTS, DEBUGREGS, CPUID, TSC_KHZ, HOST_VCPU (kvmlab's
//! own per-vCPU device state). VM-wide: PIC_MASTER, PIC_SLAVE, IOAPIC, PIT2,
//! CLOCK, PAGE_MAP (1 bit per 4 KiB page: set = the page is not all zero),
//! CONSOLE (console bytes not yet taken), BOOT (guest name).
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const host = @import("host.zig");
const boot = @import("boot.zig");
const vm_mod = @import("vm.zig");
const Vm = vm_mod.Vm;

const allocator = std.heap.c_allocator;

pub const magic = "KVMLSTAT".*;
pub const version_major: u16 = 1;
pub const version_minor: u16 = 0;
pub const header_bytes = 32;
pub const record_header_bytes = 16;
pub const vm_wide: u32 = 0xFFFF_FFFF;

/// Limits: a blob larger than this, or a record over its limit, is rejected
/// before anything else is read from it.
pub const max_blob_bytes: usize = 8 << 20;
pub const max_records: u32 = 64 * boot.max_vcpus + 64;
pub const max_msrs: u32 = 1024;
pub const max_xsave_bytes: u32 = 64 << 10;
pub const max_console_bytes: u32 = vm_mod.console_capacity_bytes;

pub const Tag = enum(u32) {
    regs = 1,
    sregs = 2,
    fpu = 3,
    xsave = 4,
    xcrs = 5,
    msrs = 6,
    lapic = 7,
    mp_state = 8,
    events = 9,
    debugregs = 10,
    cpuid = 11,
    tsc_khz = 12,
    host_vcpu = 13,
    pic_master = 32,
    pic_slave = 33,
    ioapic = 34,
    pit2 = 35,
    clock = 36,
    page_map = 37,
    console = 38,
    boot = 39,
};

/// kvmlab's per-vCPU device state (run-loop status and port values).
pub const HostVcpu = extern struct {
    status: u32,
    exit_code: u32,
    checkpoint_tag: u32,
    reserved: u32,
};

pub const BootRecord = extern struct {
    guest_name: [32]u8,
};

/// Where each record of a checked blob is (slices into the blob).
pub const Parsed = struct {
    vcpus: u32,
    memory_bytes: u64,
    per_vcpu: [boot.max_vcpus][tag_slots]?[]const u8,
    vm: [tag_slots]?[]const u8,
    /// Memo of checkHost, which depends only on the blob and on this host
    /// (both fixed) and sits on the restore hot path: a loaded snapshot pays
    /// for it on its first restore only. Bit 63: the blob passed; bit i:
    /// vCPU i's CPUID equals a fresh shell's (KVM_SET_CPUID2 is skipped).
    /// A cache, not state: mutated through @constCast from const readers.
    memo: std.atomic.Value(u64) = .init(0),

    pub fn get(p: *const Parsed, tag: Tag, vcpu: u32) ?[]const u8 {
        const i = tagIndex(tag);
        return if (vcpu == vm_wide) p.vm[i] else p.per_vcpu[vcpu][i];
    }
    pub fn pageMap(p: *const Parsed) []const u8 {
        return p.vm[tagIndex(.page_map)].?;
    }
};

/// Records are indexed by tag value (all tags are below this).
const tag_slots = 40;
fn tagIndex(tag: Tag) usize {
    return @intFromEnum(tag);
}

fn isVmWide(tag: Tag) bool {
    return @intFromEnum(tag) >= 32;
}

/// Exact sizes of fixed-size records (0 = variable, checked separately).
fn fixedBytes(tag: Tag) u32 {
    return switch (tag) {
        .regs => @sizeOf(kvm.Regs),
        .sregs => @sizeOf(kvm.Sregs),
        .fpu => kvm.FPU_BYTES,
        .xcrs => kvm.XCRS_BYTES,
        .lapic => kvm.LAPIC_BYTES,
        .mp_state => kvm.MP_STATE_BYTES,
        .events => kvm.VCPU_EVENTS_BYTES,
        .debugregs => kvm.DEBUGREGS_BYTES,
        .tsc_khz => 4,
        .host_vcpu => @sizeOf(HostVcpu),
        .pic_master, .pic_slave, .ioapic => kvm.IRQCHIP_BYTES,
        .pit2 => kvm.PIT_STATE2_BYTES,
        .clock => kvm.CLOCK_DATA_BYTES,
        .boot => @sizeOf(BootRecord),
        .xsave, .msrs, .cpuid, .page_map, .console => 0,
    };
}

pub fn pageCount(memory_bytes: u64) u64 {
    return memory_bytes / boot.page_bytes;
}
pub fn pageMapBytes(memory_bytes: u64) u64 {
    return (pageCount(memory_bytes) + 7) / 8;
}

fn bad(comptime fmt: []const u8, args: anytype) errors.Error {
    return errors.fail(error.Snapshot, "vCPU state: " ++ fmt, args);
}

/// Checks a blob completely (bounds first, then every record) without
/// allocating. Every length is bounded before it is used.
pub fn parse(blob: []const u8) errors.Error!Parsed {
    if (blob.len > max_blob_bytes) return bad("{d} bytes is over the {d}-byte limit", .{ blob.len, max_blob_bytes });
    if (blob.len < header_bytes) return bad("truncated: {d} bytes, the header alone is {d}", .{ blob.len, header_bytes });
    if (!std.mem.eql(u8, blob[0..8], &magic)) return bad("bad magic (not a kvmlab state blob)", .{});
    const major = std.mem.readInt(u16, blob[8..10], .little);
    const minor = std.mem.readInt(u16, blob[10..12], .little);
    if (major != version_major or minor > version_minor)
        return bad("unsupported version {d}.{d} (this kvmlab reads {d}.0 .. {d}.{d})", .{ major, minor, version_major, version_major, version_minor });
    const vcpus = std.mem.readInt(u32, blob[12..16], .little);
    const memory_bytes = std.mem.readInt(u64, blob[16..24], .little);
    const count = std.mem.readInt(u32, blob[24..28], .little);
    if (vcpus < 1 or vcpus > boot.max_vcpus) return bad("vCPU count {d} is out of range 1..{d}", .{ vcpus, boot.max_vcpus });
    if (memory_bytes < boot.min_memory_bytes or memory_bytes > boot.max_memory_bytes or memory_bytes % boot.huge_page_bytes != 0)
        return bad("memory size {d} bytes is out of range or not a multiple of 2 MiB", .{memory_bytes});
    if (count > max_records) return bad("{d} records is over the limit of {d}", .{ count, max_records });

    var p = Parsed{ .vcpus = vcpus, .memory_bytes = memory_bytes, .per_vcpu = @splat(@splat(null)), .vm = @splat(null) };
    var off: usize = header_bytes;
    var i: u32 = 0;
    while (i < count) : (i += 1) {
        if (blob.len - off < record_header_bytes) return bad("truncated in record {d}", .{i});
        const raw_tag = std.mem.readInt(u32, blob[off..][0..4], .little);
        const vcpu = std.mem.readInt(u32, blob[off + 4 ..][0..4], .little);
        const len = std.mem.readInt(u32, blob[off + 8 ..][0..4], .little);
        off += record_header_bytes;
        const padded = std.mem.alignForward(u64, len, 8);
        if (blob.len - off < padded) return bad("record {d} ({d} bytes) runs past the end", .{ i, len });
        const data = blob[off..][0..len];
        off += @intCast(padded);
        const tag = std.enums.fromInt(Tag, raw_tag) orelse return bad("record {d} has unknown tag {d}", .{ i, raw_tag });
        if (isVmWide(tag) != (vcpu == vm_wide)) return bad("record {d} ({s}) has vCPU {d}", .{ i, @tagName(tag), vcpu });
        if (vcpu != vm_wide and vcpu >= vcpus) return bad("record {d} ({s}) names vCPU {d} of {d}", .{ i, @tagName(tag), vcpu, vcpus });
        const fixed = fixedBytes(tag);
        if (fixed != 0 and len != fixed) return bad("record {s} is {d} bytes, expected {d}", .{ @tagName(tag), len, fixed });
        switch (tag) {
            .xsave => if (len < kvm.XSAVE_LEGACY_BYTES or len > max_xsave_bytes or len % 64 != 0) return bad("XSAVE record of {d} bytes", .{len}),
            .msrs => if (len % @sizeOf(kvm.MsrEntry) != 0 or len / @sizeOf(kvm.MsrEntry) > max_msrs) return bad("MSR record of {d} bytes", .{len}),
            .cpuid => if (len == 0 or len % @sizeOf(kvm.CpuidEntry2) != 0 or len / @sizeOf(kvm.CpuidEntry2) > host.max_cpuid_entries) return bad("CPUID record of {d} bytes", .{len}),
            .page_map => if (len != pageMapBytes(memory_bytes)) return bad("page map is {d} bytes; {d} MiB of memory needs {d}", .{ len, memory_bytes >> 20, pageMapBytes(memory_bytes) }),
            .console => if (len > max_console_bytes) return bad("console record of {d} bytes", .{len}),
            else => {},
        }
        const slot = if (vcpu == vm_wide) &p.vm[tagIndex(tag)] else &p.per_vcpu[vcpu][tagIndex(tag)];
        if (slot.* != null) return bad("duplicate {s} record for vCPU {d}", .{ @tagName(tag), vcpu });
        slot.* = data;
    }
    if (off != blob.len) return bad("{d} trailing bytes after the last record", .{blob.len - off});

    // Semantic completeness: everything restore needs is there.
    const vm_required = [_]Tag{ .pic_master, .pic_slave, .ioapic, .pit2, .page_map, .boot };
    for (vm_required) |t| if (p.vm[tagIndex(t)] == null) return bad("missing {s} record", .{@tagName(t)});
    const vcpu_required = [_]Tag{ .regs, .sregs, .msrs, .lapic, .mp_state, .events, .cpuid, .host_vcpu };
    var v: u32 = 0;
    while (v < vcpus) : (v += 1) {
        for (vcpu_required) |t| if (p.per_vcpu[v][tagIndex(t)] == null) return bad("missing {s} record for vCPU {d}", .{ @tagName(t), v });
        if (p.per_vcpu[v][tagIndex(.xsave)] == null and p.per_vcpu[v][tagIndex(.fpu)] == null)
            return bad("missing XSAVE/FPU record for vCPU {d}", .{v});
        const hv = std.mem.bytesToValue(HostVcpu, p.per_vcpu[v][tagIndex(.host_vcpu)].?);
        if (hv.status > @intFromEnum(vm_mod.VcpuStatus.interrupted)) return bad("vCPU {d} has run status {d}", .{ v, hv.status });
    }
    return p;
}

/// A growable blob writer.
const Writer = struct {
    buf: std.ArrayList(u8) = .empty,
    count: u32 = 0,

    fn record(w: *Writer, tag: Tag, vcpu: u32, data: []const u8) errors.Error!void {
        var hdr: [record_header_bytes]u8 = @splat(0);
        std.mem.writeInt(u32, hdr[0..4], @intFromEnum(tag), .little);
        std.mem.writeInt(u32, hdr[4..8], vcpu, .little);
        std.mem.writeInt(u32, hdr[8..12], @intCast(data.len), .little);
        w.buf.appendSlice(allocator, &hdr) catch return error.OutOfMemory;
        w.buf.appendSlice(allocator, data) catch return error.OutOfMemory;
        const pad = std.mem.alignForward(usize, data.len, 8) - data.len;
        w.buf.appendNTimes(allocator, 0, pad) catch return error.OutOfMemory;
        w.count += 1;
    }
    fn value(w: *Writer, tag: Tag, vcpu: u32, v: anytype) errors.Error!void {
        try w.record(tag, vcpu, std.mem.asBytes(v));
    }
};

fn get(fd: linux.fd_t, request: u32, ptr: *anyopaque, what: []const u8) errors.Error!void {
    _ = kvm.ioctl(fd, request, @intFromPtr(ptr)) catch return errors.ioctlFailed(what);
}

/// MSRs KVM lists as saveable and this host lets a vCPU read, found once.
var msr_lock: std.c.pthread_mutex_t = .{};
var msr_list: ?[]u32 = null;

fn saveableMsrs(probe_fd: linux.fd_t) errors.Error![]const u32 {
    _ = std.c.pthread_mutex_lock(&msr_lock);
    defer _ = std.c.pthread_mutex_unlock(&msr_lock);
    if (msr_list) |l| return l;
    const h = try host.get();
    var hdr: [1 + max_msrs]u32 = undefined;
    hdr[0] = max_msrs;
    _ = kvm.ioctl(h.fd, kvm.KVM_GET_MSR_INDEX_LIST, @intFromPtr(&hdr)) catch return errors.ioctlFailed("KVM_GET_MSR_INDEX_LIST");
    const n = @min(hdr[0], max_msrs);
    var keep = allocator.alloc(u32, n) catch return error.OutOfMemory;
    var kept: usize = 0;
    for (hdr[1..][0..n]) |index| {
        var one = MsrBuf(1){ .nmsrs = 1 };
        one.entries[0] = .{ .index = index, .data = 0 };
        const got = kvm.ioctl(probe_fd, kvm.KVM_GET_MSRS, @intFromPtr(&one)) catch 0;
        if (got == 1) {
            keep[kept] = index;
            kept += 1;
        }
    }
    keep = allocator.realloc(keep, kept) catch keep;
    msr_list = keep[0..kept];
    return msr_list.?;
}

fn MsrBuf(comptime n: usize) type {
    return extern struct {
        nmsrs: u32,
        pad: u32 = 0,
        entries: [n]kvm.MsrEntry = undefined,
    };
}

const CpuidBuf = extern struct {
    nent: u32,
    padding: u32 = 0,
    entries: [host.max_cpuid_entries]kvm.CpuidEntry2 = undefined,
};

const Irqchip = extern struct {
    chip_id: u32,
    pad: u32 = 0,
    chip: [512]u8 = @splat(0),
};

/// XSAVE buffer size this host needs (KVM_CAP_XSAVE2), or 0 without XSAVE;
/// the same for every VM of this host, so asked once.
var xsave_cache = std.atomic.Value(u32).init(std.math.maxInt(u32));

pub fn xsaveBytes(vm_fd: linux.fd_t) u32 {
    const cached = xsave_cache.load(.acquire);
    if (cached != std.math.maxInt(u32)) return cached;
    const v = xsaveBytesUncached(vm_fd);
    xsave_cache.store(v, .release);
    return v;
}

fn xsaveBytesUncached(vm_fd: linux.fd_t) u32 {
    const x2 = kvm.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.CAP_XSAVE2) catch 0;
    if (x2 >= kvm.XSAVE_LEGACY_BYTES and x2 <= max_xsave_bytes) return @intCast(x2);
    const x = kvm.ioctl(vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.CAP_XSAVE) catch 0;
    return if (x != 0) kvm.XSAVE_LEGACY_BYTES else 0;
}

/// Captures everything but memory from a stopped VM. Caller frees the blob.
pub fn capture(vm: *Vm, page_map: []const u8, guest_name: []const u8) errors.Error![]u8 {
    var w = Writer{};
    errdefer w.buf.deinit(allocator);
    w.buf.appendNTimes(allocator, 0, header_bytes) catch return error.OutOfMemory;

    const xsave_bytes = xsaveBytes(vm.vm_fd);
    const have_xcrs = (kvm.ioctl(vm.vm_fd, kvm.KVM_CHECK_EXTENSION, kvm.CAP_XCRS) catch 0) != 0;
    const msrs = try saveableMsrs(vm.vcpus[0].fd);
    const scratch = allocator.alignedAlloc(u8, .@"64", @max(xsave_bytes, 64)) catch return error.OutOfMemory;
    defer allocator.free(scratch);

    for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
        const idx: u32 = @intCast(i);
        var regs: kvm.Regs = undefined;
        try get(v.fd, kvm.KVM_GET_REGS, &regs, "KVM_GET_REGS");
        try w.value(.regs, idx, &regs);
        var sregs: kvm.Sregs = undefined;
        try get(v.fd, kvm.KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
        try w.value(.sregs, idx, &sregs);
        if (xsave_bytes != 0) {
            const req: u32 = if (xsave_bytes > kvm.XSAVE_LEGACY_BYTES) kvm.KVM_GET_XSAVE2 else kvm.KVM_GET_XSAVE;
            @memset(scratch[0..xsave_bytes], 0);
            try get(v.fd, req, scratch.ptr, "KVM_GET_XSAVE");
            try w.record(.xsave, idx, scratch[0..xsave_bytes]);
        } else {
            var fpu: [kvm.FPU_BYTES]u8 align(8) = undefined;
            try get(v.fd, kvm.KVM_GET_FPU, &fpu, "KVM_GET_FPU");
            try w.record(.fpu, idx, &fpu);
        }
        if (have_xcrs) {
            var xcrs: [kvm.XCRS_BYTES]u8 align(8) = undefined;
            try get(v.fd, kvm.KVM_GET_XCRS, &xcrs, "KVM_GET_XCRS");
            try w.record(.xcrs, idx, &xcrs);
        }
        const msr_buf = allocator.create(MsrBuf(max_msrs)) catch return error.OutOfMemory;
        defer allocator.destroy(msr_buf);
        msr_buf.nmsrs = @intCast(msrs.len);
        msr_buf.pad = 0;
        for (msrs, 0..) |index, k| msr_buf.entries[k] = .{ .index = index, .data = 0 };
        const got = kvm.ioctl(v.fd, kvm.KVM_GET_MSRS, @intFromPtr(msr_buf)) catch return errors.ioctlFailed("KVM_GET_MSRS");
        if (got != msrs.len) return errors.fail(error.KvmFailed, "KVM_GET_MSRS read {d} of {d} MSRs (stopped at 0x{x})", .{ got, msrs.len, msrs[@min(got, msrs.len - 1)] });
        try w.record(.msrs, idx, std.mem.sliceAsBytes(msr_buf.entries[0..msrs.len]));
        var lapic: [kvm.LAPIC_BYTES]u8 align(8) = undefined;
        try get(v.fd, kvm.KVM_GET_LAPIC, &lapic, "KVM_GET_LAPIC");
        try w.record(.lapic, idx, &lapic);
        var mp: u32 = 0;
        try get(v.fd, kvm.KVM_GET_MP_STATE, &mp, "KVM_GET_MP_STATE");
        try w.value(.mp_state, idx, &mp);
        var events: [kvm.VCPU_EVENTS_BYTES]u8 align(8) = undefined;
        try get(v.fd, kvm.KVM_GET_VCPU_EVENTS, &events, "KVM_GET_VCPU_EVENTS");
        try w.record(.events, idx, &events);
        var dbg: [kvm.DEBUGREGS_BYTES]u8 align(8) = undefined;
        try get(v.fd, kvm.KVM_GET_DEBUGREGS, &dbg, "KVM_GET_DEBUGREGS");
        try w.record(.debugregs, idx, &dbg);
        const cpuid = allocator.create(CpuidBuf) catch return error.OutOfMemory;
        defer allocator.destroy(cpuid);
        cpuid.nent = host.max_cpuid_entries;
        try get(v.fd, kvm.KVM_GET_CPUID2, cpuid, "KVM_GET_CPUID2");
        if (cpuid.nent > host.max_cpuid_entries) return errors.fail(error.KvmFailed, "KVM_GET_CPUID2 returned {d} entries", .{cpuid.nent});
        try w.record(.cpuid, idx, std.mem.sliceAsBytes(cpuid.entries[0..cpuid.nent]));
        const khz: u32 = @intCast(kvm.ioctl(v.fd, kvm.KVM_GET_TSC_KHZ, 0) catch 0);
        try w.value(.tsc_khz, idx, &khz);
        const hv = HostVcpu{ .status = @intFromEnum(v.status), .exit_code = v.exit_code, .checkpoint_tag = v.checkpoint_tag, .reserved = 0 };
        try w.value(.host_vcpu, idx, &hv);
    }
    for ([_]Tag{ .pic_master, .pic_slave, .ioapic }, 0..) |tag, chip| {
        var ic = Irqchip{ .chip_id = @intCast(chip) };
        try get(vm.vm_fd, kvm.KVM_GET_IRQCHIP, &ic, "KVM_GET_IRQCHIP");
        try w.record(tag, vm_wide, std.mem.asBytes(&ic)[0..kvm.IRQCHIP_BYTES]);
    }
    var pit: [kvm.PIT_STATE2_BYTES]u8 align(8) = undefined;
    try get(vm.vm_fd, kvm.KVM_GET_PIT2, &pit, "KVM_GET_PIT2");
    try w.record(.pit2, vm_wide, &pit);
    var clock: [kvm.CLOCK_DATA_BYTES]u8 align(8) = @splat(0);
    if (kvm.ioctl(vm.vm_fd, kvm.KVM_GET_CLOCK, @intFromPtr(&clock))) |_| {
        try w.record(.clock, vm_wide, &clock);
    } else |_| {}
    try w.record(.page_map, vm_wide, page_map);
    try w.record(.console, vm_wide, vm.console[0..vm.console_len]);
    var br = BootRecord{ .guest_name = @splat(0) };
    const n = @min(guest_name.len, br.guest_name.len);
    @memcpy(br.guest_name[0..n], guest_name[0..n]);
    try w.value(.boot, vm_wide, &br);

    const blob = w.buf.toOwnedSlice(allocator) catch return error.OutOfMemory;
    @memcpy(blob[0..8], &magic);
    std.mem.writeInt(u16, blob[8..10], version_major, .little);
    std.mem.writeInt(u16, blob[10..12], version_minor, .little);
    std.mem.writeInt(u32, blob[12..16], vm.vcpu_count, .little);
    std.mem.writeInt(u64, blob[16..24], vm.mem.len, .little);
    std.mem.writeInt(u32, blob[24..28], w.count, .little);
    std.debug.assert(blob.len <= max_blob_bytes);
    return blob;
}

/// The CPUID a fresh vCPU of this host presents to its guest (what KVM
/// reports after SET_CPUID2 with the supported set), read once.
var effective_lock: std.c.pthread_mutex_t = .{};
var effective: ?*CpuidBuf = null;

fn effectiveCpuid(vcpu_fd: linux.fd_t) errors.Error![]const kvm.CpuidEntry2 {
    _ = std.c.pthread_mutex_lock(&effective_lock);
    defer _ = std.c.pthread_mutex_unlock(&effective_lock);
    if (effective == null) {
        const b = allocator.create(CpuidBuf) catch return error.OutOfMemory;
        b.nent = host.max_cpuid_entries;
        b.padding = 0;
        _ = kvm.ioctl(vcpu_fd, kvm.KVM_GET_CPUID2, @intFromPtr(b)) catch {
            allocator.destroy(b);
            return errors.ioctlFailed("KVM_GET_CPUID2");
        };
        effective = b;
    }
    return effective.?.entries[0..@min(effective.?.nent, host.max_cpuid_entries)];
}

/// Refuses a snapshot whose guest saw CPU features (CPUID leaves 1, 7.0 and
/// 0x80000001) or an XSAVE size that a fresh vCPU of this host does not have.
/// `vcpu_fd` is a vCPU of the shell that has not run yet.
pub fn checkHost(p: *const Parsed, vm_fd: linux.fd_t, vcpu_fd: linux.fd_t) errors.Error!void {
    if (p.memo.load(.acquire) & memo_host_ok != 0) return;
    const have_all = try effectiveCpuid(vcpu_fd);
    try checkFeatures(p, vm_fd, have_all);
    var bits: u64 = memo_host_ok;
    for (0..p.vcpus) |i| {
        if (sameAsShell(p.get(.cpuid, @intCast(i)).?, have_all, @intCast(i))) bits |= @as(u64, 1) << @intCast(i);
    }
    _ = @constCast(&p.memo).fetchOr(bits, .acq_rel);
}

const memo_host_ok: u64 = 1 << 63;
comptime {
    std.debug.assert(boot.max_vcpus < 63); // one memo bit per vCPU below the flag
}

/// vCPU `idx`'s CPUID record equals a fresh shell's (memoized by checkHost;
/// false, so KVM_SET_CPUID2 is issued, if checkHost has not run on `p`).
fn cpuidSameAsShell(p: *const Parsed, idx: u32) bool {
    return p.memo.load(.acquire) & (@as(u64, 1) << @intCast(idx)) != 0;
}

fn checkFeatures(p: *const Parsed, vm_fd: linux.fd_t, have_all: []const kvm.CpuidEntry2) errors.Error!void {
    const want = std.mem.bytesAsSlice(kvm.CpuidEntry2, p.get(.cpuid, 0).?);
    for (want) |e| {
        const checked = (e.function == 1 and e.index == 0) or (e.function == 7 and e.index == 0) or e.function == 0x8000_0001;
        if (!checked) continue;
        const have = findCpuid(have_all, e.function, e.index) orelse
            return errors.fail(error.Incompatible, "snapshot guest saw CPUID leaf 0x{x}.{d}, which this host's KVM does not offer", .{ e.function, e.index });
        // Leaf 1 EBX holds the APIC id and topology, and ECX bit 27 (OSXSAVE)
        // mirrors CR4: neither is a host feature.
        const ebx_mask: u32 = if (e.function == 1) 0 else 0xFFFF_FFFF;
        const ecx_mask: u32 = if (e.function == 1) ~@as(u32, 1 << 27) else 0xFFFF_FFFF;
        const missing_ecx = (e.ecx & ecx_mask) & ~have.ecx;
        const missing_edx = e.edx & ~have.edx;
        const missing_ebx = (e.ebx & ebx_mask) & ~have.ebx;
        if (missing_ecx | missing_edx | missing_ebx != 0)
            return errors.fail(error.Incompatible, "snapshot guest saw CPU features this host lacks: CPUID 0x{x}.{d} ebx&~host=0x{x} ecx&~host=0x{x} edx&~host=0x{x}", .{ e.function, e.index, missing_ebx, missing_ecx, missing_edx });
    }
    if (p.get(.xsave, 0)) |x| {
        const have = xsaveBytes(vm_fd);
        if (x.len > have) return errors.fail(error.Incompatible, "snapshot XSAVE state is {d} bytes; this host's KVM takes {d}", .{ x.len, have });
    }
}

/// True when `cpuid` (a snapshot's record for vCPU `idx`) equals what a fresh
/// shell's vCPU `idx` presents: the effective CPUID with that vCPU's APIC id.
fn sameAsShell(cpuid: []const u8, effective_entries: []const kvm.CpuidEntry2, idx: u32) bool {
    const want = std.mem.bytesAsSlice(kvm.CpuidEntry2, cpuid);
    if (want.len != effective_entries.len) return false;
    for (want, effective_entries) |w_unaligned, e0| {
        var w: kvm.CpuidEntry2 = w_unaligned;
        var e = e0;
        if (e.function == 1) {
            e.ebx = (e.ebx & 0x00FF_FFFF) | (idx << 24);
            // OSXSAVE mirrors CR4 and may differ between capture and a fresh vCPU.
            w.ecx &= ~@as(u32, 1 << 27);
            e.ecx &= ~@as(u32, 1 << 27);
        }
        if (e.function == 0xB or e.function == 0x1F) e.edx = idx;
        if (!std.mem.eql(u8, std.mem.asBytes(&w), std.mem.asBytes(&e))) return false;
    }
    return true;
}

fn findCpuid(entries: []const kvm.CpuidEntry2, function: u32, index: u32) ?kvm.CpuidEntry2 {
    for (entries) |e| if (e.function == function and e.index == index) return e;
    return null;
}

fn set(fd: linux.fd_t, request: u32, data: []const u8, what: []const u8) errors.Error!void {
    _ = kvm.ioctl(fd, request, @intFromPtr(data.ptr)) catch return errors.ioctlFailed(what);
}

/// Nanoseconds spent restoring vCPU and VM device state.
pub const RestoreTimes = struct { vcpu_ns: u64 = 0, devices_ns: u64 = 0 };

/// Restores a checked blob into a shell that has never run and has the same
/// memory size and vCPU count (the caller checked both). Memory is separate.
pub fn restore(vm: *Vm, p: *const Parsed, times: *RestoreTimes) errors.Error!void {
    std.debug.assert(p.vcpus == vm.vcpu_count and p.memory_bytes == vm.mem.len);
    const t0 = vm_mod.monotonicNs();
    var cpuid_buf: CpuidBuf = undefined;
    for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
        const idx: u32 = @intCast(i);
        // CPUID first: KVM checks SREGS/MSR values against the guest's CPUID.
        // A shell already has this host's CPUID; skip the ioctl (~7-12 us on
        // kvm_pvm) when the snapshot was taken with the same.
        const cpuid = p.get(.cpuid, idx).?;
        if (!cpuidSameAsShell(p, idx)) {
            cpuid_buf.nent = @intCast(cpuid.len / @sizeOf(kvm.CpuidEntry2));
            cpuid_buf.padding = 0;
            @memcpy(std.mem.sliceAsBytes(cpuid_buf.entries[0..cpuid_buf.nent]), cpuid);
            _ = kvm.ioctl(v.fd, kvm.KVM_SET_CPUID2, @intFromPtr(&cpuid_buf)) catch
                return errors.fail(error.Incompatible, "KVM_SET_CPUID2 with the snapshot's CPUID failed: E{s}", .{@tagName(kvm.last_errno)});
        }
        try set(v.fd, kvm.KVM_SET_SREGS, try aligned(p.get(.sregs, idx).?), "KVM_SET_SREGS");
        try set(v.fd, kvm.KVM_SET_REGS, try aligned(p.get(.regs, idx).?), "KVM_SET_REGS");
        if (p.get(.xsave, idx)) |x| {
            // KVM_SET_XSAVE reads this host's full XSAVE size (KVM_CAP_XSAVE2):
            // a smaller record from another host is padded with zeros.
            const host_bytes = xsaveBytes(vm.vm_fd);
            if (x.len >= host_bytes) {
                try set(v.fd, kvm.KVM_SET_XSAVE, try aligned(x), "KVM_SET_XSAVE");
            } else {
                const buf = allocator.alignedAlloc(u8, .@"64", host_bytes) catch return error.OutOfMemory;
                defer allocator.free(buf);
                @memset(buf, 0);
                @memcpy(buf[0..x.len], x);
                try set(v.fd, kvm.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE");
            }
        } else try set(v.fd, kvm.KVM_SET_FPU, try aligned(p.get(.fpu, idx).?), "KVM_SET_FPU");
        if (p.get(.xcrs, idx)) |x| try set(v.fd, kvm.KVM_SET_XCRS, try aligned(x), "KVM_SET_XCRS");
        try restoreMsrs(v.fd, p.get(.msrs, idx).?);
        try set(v.fd, kvm.KVM_SET_MP_STATE, try aligned(p.get(.mp_state, idx).?), "KVM_SET_MP_STATE");
        try set(v.fd, kvm.KVM_SET_LAPIC, try aligned(p.get(.lapic, idx).?), "KVM_SET_LAPIC");
        try set(v.fd, kvm.KVM_SET_VCPU_EVENTS, try aligned(p.get(.events, idx).?), "KVM_SET_VCPU_EVENTS");
        if (p.get(.debugregs, idx)) |d| try set(v.fd, kvm.KVM_SET_DEBUGREGS, try aligned(d), "KVM_SET_DEBUGREGS");
        const hv = std.mem.bytesToValue(HostVcpu, p.get(.host_vcpu, idx).?);
        v.status = @enumFromInt(hv.status);
        v.exit_code = hv.exit_code;
        v.checkpoint_tag = hv.checkpoint_tag;
    }
    const t1 = vm_mod.monotonicNs();
    for ([_]Tag{ .pic_master, .pic_slave, .ioapic }, 0..) |tag, chip| {
        var ic = Irqchip{ .chip_id = @intCast(chip) };
        @memcpy(std.mem.asBytes(&ic)[0..kvm.IRQCHIP_BYTES], p.get(tag, vm_wide).?);
        ic.chip_id = @intCast(chip);
        _ = kvm.ioctl(vm.vm_fd, kvm.KVM_SET_IRQCHIP, @intFromPtr(&ic)) catch return errors.ioctlFailed("KVM_SET_IRQCHIP");
    }
    try set(vm.vm_fd, kvm.KVM_SET_PIT2, try aligned(p.get(.pit2, vm_wide).?), "KVM_SET_PIT2");
    if (p.get(.clock, vm_wide)) |c| {
        var clock: [kvm.CLOCK_DATA_BYTES]u8 align(8) = undefined;
        @memcpy(&clock, c);
        // Only the clock value is restored; flags from the old host do not apply.
        std.mem.writeInt(u32, clock[8..12], 0, .little);
        _ = kvm.ioctl(vm.vm_fd, kvm.KVM_SET_CLOCK, @intFromPtr(&clock)) catch {};
    }
    const console = p.get(.console, vm_wide) orelse &.{};
    vm.console_len = 0;
    vm.console_dropped = 0;
    if (console.len > 0) vm.consoleAppend(console);
    vm.crash_len = 0;
    vm.booted = true;
    const t2 = vm_mod.monotonicNs();
    times.vcpu_ns = t1 - t0;
    times.devices_ns = t2 - t1;
}

/// Record data is 8-byte aligned inside the blob (records are padded), which
/// is all the kernel structs need; this asserts it instead of copying.
fn aligned(data: []const u8) errors.Error![]const u8 {
    if (@intFromPtr(data.ptr) % 8 != 0) return errors.fail(error.Snapshot, "vCPU state record is misaligned", .{});
    return data;
}

fn restoreMsrs(fd: linux.fd_t, data: []const u8) errors.Error!void {
    const entries = std.mem.bytesAsSlice(kvm.MsrEntry, data);
    // On the stack (16 KiB): restore is a hot path, no allocation.
    var storage: MsrBuf(max_msrs) = undefined;
    const buf = &storage;
    buf.nmsrs = @intCast(entries.len);
    buf.pad = 0;
    for (entries, 0..) |e, k| buf.entries[k] = e;
    const n = kvm.ioctl(fd, kvm.KVM_SET_MSRS, @intFromPtr(buf)) catch return errors.ioctlFailed("KVM_SET_MSRS");
    if (n != entries.len)
        return errors.fail(error.Incompatible, "KVM_SET_MSRS set {d} of {d} MSRs; this host refuses MSR 0x{x}", .{ n, entries.len, entries[n].index });
}

test "parse rejects hostile blobs fast" {
    try std.testing.expectError(error.Snapshot, parse(""));
    try std.testing.expectError(error.Snapshot, parse("KVMLSTAT"));
    var hdr: [header_bytes]u8 = @splat(0);
    @memcpy(hdr[0..8], &magic);
    std.mem.writeInt(u16, hdr[8..10], 1, .little);
    std.mem.writeInt(u32, hdr[12..16], 1, .little);
    std.mem.writeInt(u64, hdr[16..24], 64 << 20, .little);
    std.mem.writeInt(u32, hdr[24..28], 0xFFFF_FFFF, .little); // huge record count
    try std.testing.expectError(error.Snapshot, parse(&hdr));
    std.mem.writeInt(u32, hdr[24..28], 0, .little); // no records: incomplete
    try std.testing.expectError(error.Snapshot, parse(&hdr));
    std.mem.writeInt(u16, hdr[8..10], 2, .little); // newer major
    try std.testing.expectError(error.Snapshot, parse(&hdr));
}
