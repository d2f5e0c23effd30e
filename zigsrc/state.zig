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
//! Every record kvmlab knows is one entry of `vcpu_records` or `vm_records`
//! below (tag, how KVM gets and sets it, whether a blob must have it), in the
//! one order that capture writes, restore sets and the benchmark floor times
//! them. Capture, parse, restore and the floor all walk those two tables.
const std = @import("std");
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const host = @import("host.zig");
const boot = @import("boot.zig");
const shell = @import("shell.zig");
const cpuid = @import("cpuid.zig");

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
pub const max_msrs: u32 = kvm.max_msrs;
pub const max_xsave_bytes: u32 = 64 << 10;
pub const max_console_bytes: u32 = shell.console_capacity_bytes;

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
    /// Memo of checkHost too: bit `defaultBit(tag, vcpu)` set when that
    /// record equals what a fresh shell has (`skip_if_default`).
    at_default: std.atomic.Value(u64) = .init(0),

    pub fn get(p: *const Parsed, tag: Tag, vcpu: u32) ?[]const u8 {
        const i = tagIndex(tag);
        return if (vcpu == vm_wide) p.vm[i] else p.per_vcpu[vcpu][i];
    }
    pub fn pageMap(p: *const Parsed) []const u8 {
        return p.vm[tagIndex(.page_map)].?;
    }
};


/// How a record is read from and written to KVM.
pub const Io = union(enum) {
    /// Fixed-size vCPU state, got and set verbatim.
    vcpu: kvm.VcpuState,
    /// Fixed-size VM state; `chip` is the irqchip id for `.irqchip`.
    vm: struct { state: kvm.VmState, chip: u32 = 0 },
    /// Set only when it differs from what a fresh shell has (see checkHost).
    cpuid,
    /// This host's XSAVE size (KVM_CAP_XSAVE2); padded on restore.
    xsave,
    /// The saveable MSRs (saveableMsrs); all must be set.
    msrs,
    /// Captured for information; not restored.
    tsc_khz,
    // kvmlab's own state (no ioctl)
    host_vcpu,
    page_map,
    console,
    boot,
};

/// When capture writes a record (restore sets whatever the blob has).
pub const When = enum { always, with_xsave, without_xsave, with_xcrs, if_readable, given };

pub const Record = struct {
    tag: Tag,
    io: Io,
    /// A blob without it is refused (XSAVE/FPU: one of the two, checked apart).
    required: bool,
    when: When = .always,
    /// Into a fresh shell, set only when it differs from the state KVM gives
    /// every new VM or vCPU (compared once per snapshot by checkHost): each
    /// KVM call costs ~15-20 us on kvm_pvm, and a snapshot at a checkpoint
    /// mostly has these at their defaults. A reset (the VM ran) sets them all.
    skip_if_default: bool = false,

    /// Exact size of the record, or 0 when variable (checked in parse).
    pub fn fixedBytes(r: Record) u32 {
        return switch (r.io) {
            .vcpu => |s| @intCast(s.bytes()),
            .vm => |v| @intCast(v.state.bytes()),
            .tsc_khz => 4,
            .host_vcpu => @sizeOf(HostVcpu),
            .boot => @sizeOf(BootRecord),
            .cpuid, .xsave, .msrs, .page_map, .console => 0,
        };
    }
};

/// THE ORDER of state records. Capture writes them in this order; restore
/// and the benchmark floor set them in it (Firecracker's save_state /
/// restore_state keep the same discipline). Why this order:
///   1. CPUID first: KVM checks SREGS, XSAVE and MSR values against the
///      guest's CPUID (a feature bit the guest lacks makes them fail).
///   2. SREGS before REGS: the mode (CR0/CR4/EFER) decides how KVM takes
///      the registers.
///   3. XSAVE (or FPU) and XCRS before MSRS: XCR0 gates which XSAVE-related
///      MSRs are writable.
///   4. MP_STATE before LAPIC, LAPIC before EVENTS: pending events are
///      injected through the restored local APIC of a runnable vCPU.
///   5. VM-wide: the three irqchips (PIC master, PIC slave, IOAPIC), then the
///      PIT (its IRQ 0 goes through the restored PIC), then the clock.
///   6. kvmlab's own records (HOST_VCPU, PAGE_MAP, CONSOLE, BOOT) last: no
///      KVM ordering applies to them.
pub const vcpu_records = [_]Record{
    .{ .tag = .cpuid, .io = .cpuid, .required = true },
    .{ .tag = .sregs, .io = .{ .vcpu = .sregs }, .required = true },
    .{ .tag = .regs, .io = .{ .vcpu = .regs }, .required = true },
    .{ .tag = .xsave, .io = .xsave, .required = false, .when = .with_xsave },
    .{ .tag = .fpu, .io = .{ .vcpu = .fpu }, .required = false, .when = .without_xsave },
    .{ .tag = .xcrs, .io = .{ .vcpu = .xcrs }, .required = false, .when = .with_xcrs, .skip_if_default = true },
    .{ .tag = .msrs, .io = .msrs, .required = true },
    .{ .tag = .mp_state, .io = .{ .vcpu = .mp_state }, .required = true, .skip_if_default = true },
    .{ .tag = .lapic, .io = .{ .vcpu = .lapic }, .required = true },
    .{ .tag = .events, .io = .{ .vcpu = .events }, .required = true, .skip_if_default = true },
    .{ .tag = .debugregs, .io = .{ .vcpu = .debugregs }, .required = false, .skip_if_default = true },
    .{ .tag = .tsc_khz, .io = .tsc_khz, .required = false },
    .{ .tag = .host_vcpu, .io = .host_vcpu, .required = true },
};

pub const vm_records = [_]Record{
    .{ .tag = .pic_master, .io = .{ .vm = .{ .state = .irqchip, .chip = 0 } }, .required = true, .skip_if_default = true },
    .{ .tag = .pic_slave, .io = .{ .vm = .{ .state = .irqchip, .chip = 1 } }, .required = true, .skip_if_default = true },
    .{ .tag = .ioapic, .io = .{ .vm = .{ .state = .irqchip, .chip = 2 } }, .required = true, .skip_if_default = true },
    .{ .tag = .pit2, .io = .{ .vm = .{ .state = .pit2 } }, .required = true },
    .{ .tag = .clock, .io = .{ .vm = .{ .state = .clock } }, .required = false, .when = .if_readable },
    .{ .tag = .page_map, .io = .page_map, .required = true, .when = .given },
    .{ .tag = .console, .io = .console, .required = false },
    .{ .tag = .boot, .io = .boot, .required = true },
};

/// The table entry of a tag, and whether it is VM-wide.
const Lookup = struct { record: Record, vm_wide: bool };
fn lookup(tag: Tag) Lookup {
    inline for (vcpu_records) |r| if (r.tag == tag) return .{ .record = r, .vm_wide = false };
    inline for (vm_records) |r| if (r.tag == tag) return .{ .record = r, .vm_wide = true };
    unreachable; // every Tag is in a table (asserted below)
}

comptime {
    // Every tag is in exactly one table, once.
    @setEvalBranchQuota(10_000);
    for (std.meta.tags(Tag)) |t| {
        var n = 0;
        for (vcpu_records) |r| n += @intFromBool(r.tag == t);
        for (vm_records) |r| n += @intFromBool(r.tag == t);
        if (n != 1) @compileError("state tag " ++ @tagName(t) ++ " must be in exactly one records table");
    }
    // Record data is 8-byte aligned in a blob: enough for every kernel struct.
    std.debug.assert(record_header_bytes % 8 == 0 and header_bytes % 8 == 0);
}

/// Records are indexed by tag value (all tags are below this).
const tag_slots = 40;
fn tagIndex(tag: Tag) usize {
    return @intFromEnum(tag);
}

pub fn pageCount(memory_bytes: u64) u64 {
    return memory_bytes / boot.page_bytes;
}
pub fn pageMapBytes(memory_bytes: u64) u64 {
    return (pageCount(memory_bytes) + 7) / 8;
}

fn bad(check: errors.Check, comptime fmt: []const u8, args: anytype) errors.Error {
    return errors.fail(check, "vCPU state: " ++ fmt, args);
}

/// Checks a blob completely without allocating, in this order (each step
/// fails with its own check id): size, magic, version, shape (vCPUs, memory),
/// record count, each record (bounds, tag, scope, size), trailing bytes,
/// missing records. Every length is bounded before it is used.
pub fn parse(blob: []const u8) errors.Error!Parsed {
    if (blob.len > max_blob_bytes) return bad(.state_size, "{d} bytes is over the {d}-byte limit", .{ blob.len, max_blob_bytes });
    if (blob.len < header_bytes) return bad(.state_size, "truncated: {d} bytes, the header alone is {d}", .{ blob.len, header_bytes });
    if (!std.mem.eql(u8, blob[0..8], &magic)) return bad(.state_magic, "bad magic (not a kvmlab state blob)", .{});
    const major = std.mem.readInt(u16, blob[8..10], .little);
    const minor = std.mem.readInt(u16, blob[10..12], .little);
    if (major != version_major or minor > version_minor)
        return bad(.state_version, "unsupported version {d}.{d} (this kvmlab reads {d}.0 .. {d}.{d})", .{ major, minor, version_major, version_major, version_minor });
    const vcpus = std.mem.readInt(u32, blob[12..16], .little);
    const memory_bytes = std.mem.readInt(u64, blob[16..24], .little);
    const count = std.mem.readInt(u32, blob[24..28], .little);
    if (vcpus < 1 or vcpus > boot.max_vcpus) return bad(.state_shape, "vCPU count {d} is out of range 1..{d}", .{ vcpus, boot.max_vcpus });
    if (memory_bytes < boot.min_memory_bytes or memory_bytes > boot.max_memory_bytes or memory_bytes % boot.huge_page_bytes != 0)
        return bad(.state_shape, "memory size {d} bytes is out of range or not a multiple of 2 MiB", .{memory_bytes});
    if (count > max_records) return bad(.state_record_count, "{d} records is over the limit of {d}", .{ count, max_records });

    var p = Parsed{ .vcpus = vcpus, .memory_bytes = memory_bytes, .per_vcpu = @splat(@splat(null)), .vm = @splat(null) };
    var off: usize = header_bytes;
    var i: u32 = 0;
    while (i < count) : (i += 1) off = try parseRecord(&p, blob, off, i);
    if (off != blob.len) return bad(.state_trailing, "{d} trailing bytes after the last record", .{blob.len - off});
    try checkComplete(&p);
    return p;
}

/// Checks record `i` at `off` and files it into `p`; returns the next offset.
fn parseRecord(p: *Parsed, blob: []const u8, at: usize, i: u32) errors.Error!usize {
    var off = at;
    if (blob.len - off < record_header_bytes) return bad(.state_record, "truncated in record {d}", .{i});
    const raw_tag = std.mem.readInt(u32, blob[off..][0..4], .little);
    const vcpu = std.mem.readInt(u32, blob[off + 4 ..][0..4], .little);
    const len = std.mem.readInt(u32, blob[off + 8 ..][0..4], .little);
    off += record_header_bytes;
    const padded = std.mem.alignForward(u64, len, 8);
    if (blob.len - off < padded) return bad(.state_record, "record {d} ({d} bytes) runs past the end", .{ i, len });
    const data = blob[off..][0..len];
    off += @intCast(padded);
    const tag = std.enums.fromInt(Tag, raw_tag) orelse return bad(.state_record, "record {d} has unknown tag {d}", .{ i, raw_tag });
    const l = lookup(tag);
    if (l.vm_wide != (vcpu == vm_wide)) return bad(.state_record, "record {d} ({s}) has vCPU {d}", .{ i, @tagName(tag), vcpu });
    if (vcpu != vm_wide and vcpu >= p.vcpus) return bad(.state_record, "record {d} ({s}) names vCPU {d} of {d}", .{ i, @tagName(tag), vcpu, p.vcpus });
    const fixed = l.record.fixedBytes();
    if (fixed != 0 and len != fixed) return bad(.state_record, "record {s} is {d} bytes, expected {d}", .{ @tagName(tag), len, fixed });
    switch (l.record.io) {
        .xsave => if (len < kvm.XSAVE_LEGACY_BYTES or len > max_xsave_bytes or len % 64 != 0) return bad(.state_record, "XSAVE record of {d} bytes", .{len}),
        .msrs => if (len % @sizeOf(kvm.MsrEntry) != 0 or len / @sizeOf(kvm.MsrEntry) > max_msrs) return bad(.state_record, "MSR record of {d} bytes", .{len}),
        .cpuid => if (len == 0 or len % @sizeOf(kvm.CpuidEntry2) != 0 or len / @sizeOf(kvm.CpuidEntry2) > host.max_cpuid_entries) return bad(.state_record, "CPUID record of {d} bytes", .{len}),
        .page_map => if (len != pageMapBytes(p.memory_bytes)) return bad(.state_record, "page map is {d} bytes; {d} MiB of memory needs {d}", .{ len, p.memory_bytes >> 20, pageMapBytes(p.memory_bytes) }),
        .console => if (len > max_console_bytes) return bad(.state_record, "console record of {d} bytes", .{len}),
        else => {},
    }
    const slot = if (vcpu == vm_wide) &p.vm[tagIndex(tag)] else &p.per_vcpu[vcpu][tagIndex(tag)];
    if (slot.* != null) return bad(.state_record, "duplicate {s} record for vCPU {d}", .{ @tagName(tag), vcpu });
    slot.* = data;
    return off;
}

/// Semantic completeness: every record restore needs is there.
fn checkComplete(p: *const Parsed) errors.Error!void {
    inline for (vm_records) |r| if (r.required and p.vm[tagIndex(r.tag)] == null) return bad(.state_missing, "missing {s} record", .{@tagName(r.tag)});
    var v: u32 = 0;
    while (v < p.vcpus) : (v += 1) {
        inline for (vcpu_records) |r| if (r.required and p.per_vcpu[v][tagIndex(r.tag)] == null) return bad(.state_missing, "missing {s} record for vCPU {d}", .{ @tagName(r.tag), v });
        if (p.per_vcpu[v][tagIndex(.xsave)] == null and p.per_vcpu[v][tagIndex(.fpu)] == null)
            return bad(.state_missing, "missing XSAVE/FPU record for vCPU {d}", .{v});
        const hv = std.mem.bytesToValue(HostVcpu, p.per_vcpu[v][tagIndex(.host_vcpu)].?);
        if (hv.status > @intFromEnum(shell.VcpuStatus.interrupted)) return bad(.state_missing, "vCPU {d} has run status {d}", .{ v, hv.status });
    }
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
};

/// MSRs KVM lists as saveable and this host lets a vCPU read, found once.
var msr_lock: std.c.pthread_mutex_t = .{};
var msr_list: ?[]u32 = null;

fn saveableMsrs(probe: kvm.VcpuFd) errors.Error![]const u32 {
    _ = std.c.pthread_mutex_lock(&msr_lock);
    defer _ = std.c.pthread_mutex_unlock(&msr_lock);
    if (msr_list) |l| return l;
    const h = try host.get();
    var list: kvm.MsrList = .{ .nmsrs = max_msrs };
    h.system.getMsrIndexList(&list) catch return errors.ioctlFailed("KVM_GET_MSR_INDEX_LIST");
    const n = @min(list.nmsrs, max_msrs);
    var keep = allocator.alloc(u32, n) catch return error.OutOfMemory;
    var kept: usize = 0;
    for (list.indices[0..n]) |index| {
        var one = kvm.MsrBuf(1){ .nmsrs = 1 };
        one.entries[0] = .{ .index = index, .data = 0 };
        if ((probe.getMsrs(&one) catch 0) == 1) {
            keep[kept] = index;
            kept += 1;
        }
    }
    keep = allocator.realloc(keep, kept) catch keep;
    msr_list = keep[0..kept];
    return msr_list.?;
}

/// XSAVE buffer size this host needs (KVM_CAP_XSAVE2), or 0 without XSAVE;
/// the same for every VM of this host, so asked once.
var xsave_cache = std.atomic.Value(u32).init(std.math.maxInt(u32));

pub fn xsaveBytes(vm_fd: kvm.VmFd) u32 {
    const cached = xsave_cache.load(.acquire);
    if (cached != std.math.maxInt(u32)) return cached;
    const v = xsaveBytesUncached(vm_fd);
    xsave_cache.store(v, .release);
    return v;
}

fn xsaveBytesUncached(vm_fd: kvm.VmFd) u32 {
    const x2 = vm_fd.checkExtension(kvm.CAP_XSAVE2);
    if (x2 >= kvm.XSAVE_LEGACY_BYTES and x2 <= max_xsave_bytes) return @intCast(x2);
    return if (vm_fd.checkExtension(kvm.CAP_XSAVE) != 0) kvm.XSAVE_LEGACY_BYTES else 0;
}

/// What capture needs to know once per VM.
const CaptureContext = struct {
    xsave_bytes: u32,
    have_xcrs: bool,
    msrs: []const u32,
    scratch: []align(64) u8,
    page_map: []const u8,
    guest_name: []const u8,

    fn wants(c: *const CaptureContext, when: When) bool {
        return switch (when) {
            .always, .if_readable, .given => true,
            .with_xsave => c.xsave_bytes != 0,
            .without_xsave => c.xsave_bytes == 0,
            .with_xcrs => c.have_xcrs,
        };
    }
};

/// Largest fixed-size record (a stack buffer for any of them).
const max_fixed_bytes = blk: {
    var m = 0;
    for (vcpu_records ++ vm_records) |r| m = @max(m, r.fixedBytes());
    break :blk m;
};

/// Captures everything but memory from a stopped VM. Caller frees the blob.
pub fn capture(vm: *shell.Vm, page_map: []const u8, guest_name: []const u8) errors.Error![]u8 {
    var w = Writer{};
    errdefer w.buf.deinit(allocator);
    w.buf.appendNTimes(allocator, 0, header_bytes) catch return error.OutOfMemory;

    const xsave_bytes = xsaveBytes(vm.vm_fd);
    const scratch = allocator.alignedAlloc(u8, .@"64", @max(xsave_bytes, 64)) catch return error.OutOfMemory;
    defer allocator.free(scratch);
    const ctx = CaptureContext{
        .xsave_bytes = xsave_bytes,
        .have_xcrs = vm.vm_fd.checkExtension(kvm.CAP_XCRS) != 0,
        .msrs = try saveableMsrs(vm.vcpus[0].fd),
        .scratch = scratch,
        .page_map = page_map,
        .guest_name = guest_name,
    };
    for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
        inline for (vcpu_records) |r| if (ctx.wants(r.when)) try captureVcpu(&w, r, v, @intCast(i), &ctx);
    }
    inline for (vm_records) |r| if (ctx.wants(r.when)) try captureVm(&w, r, vm, &ctx);

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

fn getFailed(tag: Tag) errors.Error {
    return errors.fail(.state_read, "reading the {s} state failed: E{s}", .{ @tagName(tag), @tagName(kvm.last_errno) });
}

fn captureVcpu(w: *Writer, comptime r: Record, v: *shell.Vcpu, idx: u32, ctx: *const CaptureContext) errors.Error!void {
    switch (r.io) {
        .vcpu => |which| {
            var buf: [max_fixed_bytes]u8 align(8) = undefined;
            const b = buf[0..which.bytes()];
            v.fd.getState(which, b) catch return getFailed(r.tag);
            try w.record(r.tag, idx, b);
        },
        .xsave => {
            const b = ctx.scratch[0..ctx.xsave_bytes];
            @memset(b, 0);
            v.fd.getXsave(b) catch return getFailed(r.tag);
            try w.record(r.tag, idx, b);
        },
        .msrs => {
            const buf = allocator.create(kvm.MsrBuf(max_msrs)) catch return error.OutOfMemory;
            defer allocator.destroy(buf);
            buf.* = .{ .nmsrs = @intCast(ctx.msrs.len) };
            for (ctx.msrs, 0..) |index, k| buf.entries[k] = .{ .index = index, .data = 0 };
            const got = v.fd.getMsrs(buf) catch return getFailed(r.tag);
            if (got != ctx.msrs.len) return errors.fail(.msr_read, "KVM_GET_MSRS read {d} of {d} MSRs (stopped at 0x{x})", .{ got, ctx.msrs.len, ctx.msrs[@min(got, ctx.msrs.len - 1)] });
            try w.record(r.tag, idx, std.mem.sliceAsBytes(buf.entries[0..ctx.msrs.len]));
        },
        .cpuid => {
            const buf = allocator.create(kvm.CpuidBuf) catch return error.OutOfMemory;
            defer allocator.destroy(buf);
            buf.* = .{ .nent = host.max_cpuid_entries };
            v.fd.getCpuid2(buf) catch return getFailed(r.tag);
            if (buf.nent > host.max_cpuid_entries) return errors.fail(.cpuid_entries, "KVM_GET_CPUID2 returned {d} entries", .{buf.nent});
            try w.record(r.tag, idx, std.mem.sliceAsBytes(buf.entries[0..buf.nent]));
        },
        .tsc_khz => try w.record(r.tag, idx, std.mem.asBytes(&v.fd.getTscKhz())),
        .host_vcpu => {
            const hv = HostVcpu{ .status = @intFromEnum(v.status), .exit_code = v.exit_code, .checkpoint_tag = v.checkpoint_tag, .reserved = 0 };
            try w.record(r.tag, idx, std.mem.asBytes(&hv));
        },
        .vm, .page_map, .console, .boot => comptime unreachable,
    }
}

fn captureVm(w: *Writer, comptime r: Record, vm: *shell.Vm, ctx: *const CaptureContext) errors.Error!void {
    switch (r.io) {
        .vm => |x| {
            // No PIT: the state of one never programmed, as a PIT would report.
            if (x.state == .pit2 and !vm.has_pit) return w.record(r.tag, vm_wide, &(try pristinePit()));
            var buf: kvm.Irqchip align(8) = .{ .chip_id = x.chip };
            const b = std.mem.asBytes(&buf)[0..x.state.bytes()];
            vm.vm_fd.getState(x.state, b) catch |e| {
                if (r.when == .if_readable) return;
                return switch (e) {
                    error.Ioctl => getFailed(r.tag),
                };
            };
            try w.record(r.tag, vm_wide, b);
        },
        .page_map => try w.record(r.tag, vm_wide, ctx.page_map),
        .console => try w.record(r.tag, vm_wide, vm.console[0..vm.console_len]),
        .boot => {
            var br = BootRecord{ .guest_name = @splat(0) };
            const n = @min(ctx.guest_name.len, br.guest_name.len);
            @memcpy(br.guest_name[0..n], ctx.guest_name[0..n]);
            try w.record(r.tag, vm_wide, std.mem.asBytes(&br));
        },
        .vcpu, .xsave, .msrs, .cpuid, .tsc_khz, .host_vcpu => comptime unreachable,
    }
}
/// Refuses a snapshot whose guest saw CPU features (CPUID leaves 1, 7.0 and
/// 0x80000001) or an XSAVE size that a fresh vCPU of this host does not have.
/// `vcpu` is a vCPU of the shell that has not run yet.
/// `vm`: a shell that has not run yet, of the blob's shape.
pub fn checkHost(p: *const Parsed, vm: *const shell.Vm) errors.Error!void {
    if (p.memo.load(.acquire) & memo_host_ok != 0) return;
    std.debug.assert(vm.vcpu_count == p.vcpus and !vm.booted);
    const have_all = try cpuid.effective(vm.vcpus[0].fd);
    try checkFeatures(p, vm.vm_fd, have_all);
    var bits: u64 = memo_host_ok;
    for (0..p.vcpus) |i| {
        if (cpuid.sameAsShell(p.get(.cpuid, @intCast(i)).?, have_all, @intCast(i))) bits |= @as(u64, 1) << @intCast(i);
    }
    _ = @constCast(&p.at_default).fetchOr(atDefault(p, vm), .acq_rel);
    _ = @constCast(&p.memo).fetchOr(bits, .acq_rel); // after at_default: readers of the flag see both
}

/// The `at_default` bits of `p` against the fresh shell `vm`: each
/// `skip_if_default` record the blob has, read from the shell and compared
/// byte for byte (a record that cannot be read is not at its default).
fn atDefault(p: *const Parsed, vm: *const shell.Vm) u64 {
    var bits: u64 = 0;
    var buf: kvm.Irqchip align(8) = undefined; // the largest of these records
    inline for (vcpu_records) |r| if (r.skip_if_default) {
        const which = r.io.vcpu;
        const b = std.mem.asBytes(&buf)[0..which.bytes()];
        for (vm.vcpus[0..vm.vcpu_count], 0..) |v, i| {
            const want = p.get(r.tag, @intCast(i)) orelse continue;
            v.fd.getState(which, b) catch continue;
            if (std.mem.eql(u8, want, b)) bits |= defaultBit(r.tag, @intCast(i));
        }
    };
    inline for (vm_records) |r| if (r.skip_if_default) {
        const x = r.io.vm;
        const b = std.mem.asBytes(&buf)[0..x.state.bytes()];
        if (p.get(r.tag, vm_wide)) |want| {
            @memset(b, 0);
            buf.chip_id = x.chip;
            if (vm.vm_fd.getState(x.state, b)) |_| {
                if (std.mem.eql(u8, want, b)) bits |= defaultBit(r.tag, vm_wide);
            } else |_| {}
        }
    };
    return bits;
}

/// The `at_default` bit of record `tag` of vCPU `vcpu` (or vm_wide).
pub fn defaultBit(comptime tag: Tag, vcpu: u32) u64 {
    const slot = comptime defaultSlot(tag);
    if (vcpu == vm_wide) return @as(u64, 1) << (default_vcpu_slots * boot.max_vcpus + slot);
    std.debug.assert(vcpu < boot.max_vcpus);
    return @as(u64, 1) << @intCast(slot * boot.max_vcpus + vcpu);
}

/// Index of `tag` among the skip_if_default records of its table.
fn defaultSlot(comptime tag: Tag) u32 {
    var n: u32 = 0;
    for (if (lookup(tag).vm_wide) vm_records else vcpu_records) |r| {
        if (r.tag == tag) return n;
        if (r.skip_if_default) n += 1;
    }
    unreachable;
}

pub const default_vcpu_slots = blk: {
    var n: u32 = 0;
    for (vcpu_records) |r| n += @intFromBool(r.skip_if_default);
    break :blk n;
};
comptime {
    var vm_slots: u32 = 0;
    for (vm_records) |r| {
        vm_slots += @intFromBool(r.skip_if_default);
        // What atDefault reads them into: fixed-size KVM state, at most an Irqchip.
        if (r.skip_if_default) std.debug.assert(r.io == .vm and r.io.vm.state.bytes() <= @sizeOf(kvm.Irqchip));
    }
    for (vcpu_records) |r| if (r.skip_if_default) std.debug.assert(r.io == .vcpu and r.io.vcpu.bytes() <= @sizeOf(kvm.Irqchip));
    std.debug.assert(default_vcpu_slots * boot.max_vcpus + vm_slots <= 64); // one u64 of bits
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

fn checkFeatures(p: *const Parsed, vm_fd: kvm.VmFd, have_all: []const kvm.CpuidEntry2) errors.Error!void {
    const want = std.mem.bytesAsSlice(kvm.CpuidEntry2, p.get(.cpuid, 0).?);
    for (want) |e| {
        const checked = (e.function == 1 and e.index == 0) or (e.function == 7 and e.index == 0) or e.function == 0x8000_0001;
        if (!checked) continue;
        const have = cpuid.find(have_all, e.function, e.index) orelse
            return errors.fail(.cpuid_leaf, "snapshot guest saw CPUID leaf 0x{x}.{d}, which this host's KVM does not offer", .{ e.function, e.index });
        // Leaf 1 EBX holds the APIC id and topology, and ECX bit 27 (OSXSAVE)
        // mirrors CR4: neither is a host feature.
        const ebx_mask: u32 = if (e.function == 1) 0 else 0xFFFF_FFFF;
        const ecx_mask: u32 = if (e.function == 1) ~@as(u32, 1 << 27) else 0xFFFF_FFFF;
        const missing_ecx = (e.ecx & ecx_mask) & ~have.ecx;
        const missing_edx = e.edx & ~have.edx;
        const missing_ebx = (e.ebx & ebx_mask) & ~have.ebx;
        if (missing_ecx | missing_edx | missing_ebx != 0)
            return errors.fail(.cpuid_features, "snapshot guest saw CPU features this host lacks: CPUID 0x{x}.{d} ebx&~host=0x{x} ecx&~host=0x{x} edx&~host=0x{x}", .{ e.function, e.index, missing_ebx, missing_ecx, missing_edx });
    }
    if (p.get(.xsave, 0)) |x| {
        const have = xsaveBytes(vm_fd);
        if (x.len > have) return errors.fail(.xsave_size, "snapshot XSAVE state is {d} bytes; this host's KVM takes {d}", .{ x.len, have });
    }
}

/// Nanoseconds spent restoring vCPU and VM device state.
pub const RestoreTimes = struct { vcpu_ns: u64 = 0, devices_ns: u64 = 0 };

/// Restores a checked blob into a shell that has never run and has the same
/// memory size and vCPU count: checks the blob against this host (memoized),
/// then `apply`. Memory is separate.
pub fn restore(vm: *shell.Vm, p: *const Parsed, times: *RestoreTimes) errors.Error!void {
    std.debug.assert(p.vcpus == vm.vcpu_count and p.memory_bytes == vm.mem.len);
    try checkHost(p, vm);
    try apply(vm, p, times);
}


/// The bare state operations of a restore: walks the two tables in their
/// order and sets every record the blob has. The benchmark floor times
/// exactly this (the checks are in `restore`).
pub fn apply(vm: *shell.Vm, p: *const Parsed, times: *RestoreTimes) errors.Error!void {
    const t0 = shell.monotonicNs();
    // A fresh shell (never run) has KVM's defaults: a skip_if_default record
    // found equal to them is left alone. A VM that ran (a reset) gets all.
    const at_default: u64 = if (vm.booted) 0 else p.at_default.load(.acquire);
    for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
        inline for (vcpu_records) |r| if (p.get(r.tag, @intCast(i))) |d| {
            if (!(r.skip_if_default and at_default & defaultBit(r.tag, @intCast(i)) != 0))
                try applyVcpu(r, vm, v, p, @intCast(i), d);
        };
    }
    const t1 = shell.monotonicNs();
    inline for (vm_records) |r| if (p.get(r.tag, vm_wide)) |d| {
        if (!(r.skip_if_default and at_default & defaultBit(r.tag, vm_wide) != 0)) try applyVm(r, vm, d);
    };
    vm.crash_len = 0;
    vm.booted = true;
    const t2 = shell.monotonicNs();
    times.* = .{ .vcpu_ns = t1 - t0, .devices_ns = t2 - t1 };
}

fn setFailed(tag: Tag) errors.Error {
    return errors.fail(.state_write, "restoring the {s} state failed: E{s}", .{ @tagName(tag), @tagName(kvm.last_errno) });
}

fn applyVcpu(comptime r: Record, vm: *shell.Vm, v: *shell.Vcpu, p: *const Parsed, idx: u32, data: []const u8) errors.Error!void {
    switch (r.io) {
        .vcpu => |which| v.fd.setState(which, try aligned(data)) catch return setFailed(r.tag),
        .cpuid => {
            // A shell already has this host's CPUID; skip the ioctl (~7-12 us
            // on kvm_pvm) when the snapshot was taken with the same.
            if (cpuidSameAsShell(p, idx)) return;
            var buf: kvm.CpuidBuf = .{ .nent = @intCast(data.len / @sizeOf(kvm.CpuidEntry2)) };
            @memcpy(std.mem.sliceAsBytes(buf.entries[0..buf.nent]), data);
            v.fd.setCpuid2(&buf) catch
                return errors.fail(.cpuid_set, "KVM_SET_CPUID2 with the snapshot's CPUID failed: E{s}", .{@tagName(kvm.last_errno)});
        },
        .xsave => {
            // KVM_SET_XSAVE reads this host's full XSAVE size (KVM_CAP_XSAVE2):
            // a smaller record from another host is padded with zeros.
            const host_bytes = xsaveBytes(vm.vm_fd);
            if (data.len >= host_bytes) {
                v.fd.setXsave(try aligned(data)) catch return setFailed(r.tag);
                return;
            }
            const buf = allocator.alignedAlloc(u8, .@"64", host_bytes) catch return error.OutOfMemory;
            defer allocator.free(buf);
            @memset(buf, 0);
            @memcpy(buf[0..data.len], data);
            v.fd.setXsave(buf) catch return setFailed(r.tag);
        },
        .msrs => try restoreMsrs(v.fd, data),
        .tsc_khz => {},
        .host_vcpu => {
            const hv = std.mem.bytesToValue(HostVcpu, data);
            v.status = @enumFromInt(hv.status);
            v.exit_code = hv.exit_code;
            v.checkpoint_tag = hv.checkpoint_tag;
        },
        .vm, .page_map, .console, .boot => comptime unreachable,
    }
}

fn applyVm(comptime r: Record, vm: *shell.Vm, data: []const u8) errors.Error!void {
    switch (r.io) {
        .vm => |x| {
            if (x.state == .pit2 and !vm.has_pit) {
                // A shell without PIT (shell.Options): nothing to set for a
                // PIT the guest never programmed; otherwise it gets one.
                if (pitIsPristine(try pristinePit(), data)) return;
                try vm.createPit();
            }
            var buf: kvm.Irqchip align(8) = undefined;
            const b = std.mem.asBytes(&buf)[0..x.state.bytes()];
            @memcpy(b, data);
            switch (x.state) {
                .irqchip => buf.chip_id = x.chip,
                // Only the clock value is restored; flags from the old host do not apply.
                .clock => std.mem.writeInt(u32, b[8..12], 0, .little),
                .pit2 => {},
            }
            vm.vm_fd.setState(x.state, b) catch {
                if (r.when == .if_readable) return; // best effort, like its capture
                return setFailed(r.tag);
            };
        },
        .console => {
            vm.console_len = 0;
            vm.console_dropped = 0;
            if (data.len > 0) vm.consoleAppend(data);
        },
        .boot => vm.guest_name = std.mem.bytesToValue(BootRecord, data).guest_name,
        .page_map => {},
        .vcpu, .xsave, .msrs, .cpuid, .tsc_khz, .host_vcpu => comptime unreachable,
    }
}

/// The KVM_GET_PIT2 state of a PIT nobody programmed, read once per process
/// from a throwaway VM (~12 ms, mostly its destruction; Machine.createWith
/// reads it before any restore needs it).
pub fn pristinePit() errors.Error![kvm.PIT_STATE2_BYTES]u8 {
    _ = std.c.pthread_mutex_lock(&pit_lock);
    defer _ = std.c.pthread_mutex_unlock(&pit_lock);
    if (pit_pristine) |p| return p;
    const vm_fd = (try host.get()).system.createVm() catch return errors.ioctlFailed("KVM_CREATE_VM");
    defer _ = std.os.linux.close(vm_fd.fd);
    vm_fd.createIrqchip() catch return errors.ioctlFailed("KVM_CREATE_IRQCHIP");
    vm_fd.createPit2(&.{}) catch return errors.ioctlFailed("KVM_CREATE_PIT2");
    var buf: [kvm.PIT_STATE2_BYTES]u8 align(8) = undefined;
    vm_fd.getState(.pit2, &buf) catch return getFailed(.pit2);
    pit_pristine = buf;
    return buf;
}
var pit_lock: std.c.pthread_mutex_t = .{};
var pit_pristine: ?[kvm.PIT_STATE2_BYTES]u8 = null;

/// Whether `data` (a pit2 record) is the state of a PIT never programmed:
/// equal to `pristine` but for each channel's count_load_time (when its
/// count was loaded; KVM_SET_PIT2 reloads the counts anyway).
fn pitIsPristine(pristine: [kvm.PIT_STATE2_BYTES]u8, data: []const u8) bool {
    if (data.len != pristine.len) return false;
    const channel_bytes = 24; // kvm_pit_channel_state; count_load_time at 16..24
    for (data, pristine, 0..) |a, b, i| {
        const in_load_time = i < 3 * channel_bytes and i % channel_bytes >= 16;
        if (a != b and !in_load_time) return false;
    }
    return true;
}

/// Record data is 8-byte aligned inside the blob (records are padded), which
/// is all the kernel structs need; this asserts it instead of copying.
fn aligned(data: []const u8) errors.Error![]const u8 {
    if (@intFromPtr(data.ptr) % 8 != 0) return errors.fail(.state_alignment, "vCPU state record is misaligned", .{});
    return data;
}

fn restoreMsrs(fd: kvm.VcpuFd, data: []const u8) errors.Error!void {
    const entries = std.mem.bytesAsSlice(kvm.MsrEntry, data);
    // On the stack (16 KiB): restore is a hot path, no allocation.
    var buf: kvm.MsrBuf(max_msrs) = .{ .nmsrs = @intCast(entries.len) };
    for (entries, 0..) |e, k| buf.entries[k] = e;
    const n = fd.setMsrs(&buf) catch return setFailed(.msrs);
    if (n != entries.len)
        return errors.fail(.msr_refused, "KVM_SET_MSRS set {d} of {d} MSRs; this host refuses MSR 0x{x}", .{ n, entries.len, entries[n].index });
}
