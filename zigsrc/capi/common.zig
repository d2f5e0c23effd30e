//! The C ABI of libkvmlab, shared part: the ABI version, the result and
//! check codes, every product struct and enum, the struct-size check, host
//! queries and the handle helpers of capi/vm.zig, capi/snapshot.zig and
//! capi/pool.zig. Conventions (checked by gen_header.zig, which renders
//! kvmlab.h from these files):
//!   - functions are `kvmlab_<noun>_<verb>` and return `kvmlab_result`
//!     (0 = success, negative = error; detail in kvmlab_last_error_message());
//!   - handles are opaque; `*_new(opts, out)` creates, `*_free(NULL-ok)` frees;
//!   - structs are `extern struct`s named `kvmlab_*`, sized by
//!     kvmlab_struct_size() so the binding can check its view at import;
//!   - enums are `enum(c_int)` named `kvmlab_*`: the binding takes every
//!     name and value from the header (no tables of its own);
//!   - times are integer nanoseconds (`*_ns`), sizes are bytes (`*_bytes`).
const std = @import("std");
const errors = @import("../errors.zig");
const kvm = @import("../kvm.zig");
const host = @import("../host.zig");
const shell = @import("../shell.zig");
const snapshot = @import("../snapshot.zig");
const restore = @import("../restore.zig");
const reset = @import("../reset.zig");
const pool_mod = @import("../pool.zig");
const machine = @import("../machine.zig");
const service = @import("../service.zig");

/// Bumped on any incompatible change of a signature or struct below.
/// 2: reset_loop's out_done, kvmlab_vm_begin_close. 3: product/testing
/// export groups, enums for every code (typed struct fields), snapshot
/// header structs, check ids (kvmlab_last_error_check); prepared VMs
/// (kvmlab_pool_prepare_*), restore flags and strategy in restore times.
/// 4: every failure has a check id (kvmlab_check: value / 100 is the
/// negated result code; the snapshot ids moved to 8xx). 5: kvmlab_vm_call
/// takes the interrupt count its call began at (`since`).
pub const abi_version: u32 = 5;

pub const kvmlab_result = errors.Result;
/// Which check refused the last failed call (kvmlab_last_error_check).
pub const kvmlab_check = errors.Check;

pub const kvmlab_vm = opaque {};
pub const kvmlab_snapshot = opaque {};
pub const kvmlab_pool = opaque {};

pub const kvmlab_pool_config = pool_mod.Config;

pub const kvmlab_pool_stats = pool_mod.Stats;
pub const kvmlab_pool_timing = pool_mod.Timing;

pub const kvmlab_vm_config = extern struct {
    memory_bytes: u64,
    vcpus: u32,
    reserved: u32,
};

pub const kvmlab_boot_options = extern struct {
    image: ?[*]const u8,
    image_bytes: usize,
    /// `key=value key=value` text, see docs/guest-protocol.md.
    args: ?[*]const u8,
    args_bytes: usize,
    /// 3 (default in Python) or 0.
    cpl: u32,
    reserved: u32,
    /// Guest name kept for snapshots (at most 32 bytes are kept).
    name: ?[*]const u8,
    name_bytes: usize,
};

/// Why `kvmlab_vm_run` returned. `timeout` also after kvmlab_vm_interrupt;
/// `interrupted`: a signal (e.g. SIGINT) interrupted the run.
pub const kvmlab_run_reason = shell.Reason;

pub const kvmlab_run_result = extern struct {
    reason: kvmlab_run_reason,
    exit_code: u32,
    checkpoint_tag: u32,
    reserved: u32,
    elapsed_ns: u64,
    /// Console bytes waiting for kvmlab_vm_console_take.
    console_bytes: u64,
    /// Console bytes lost because the buffer was full.
    console_dropped_bytes: u64,
};

/// The service protocol's operations (docs/guest-protocol.md, "Service area").
pub const kvmlab_service_op = service.protocol.Op;
/// The status the service guest answers with.
pub const kvmlab_service_status = service.protocol.Status;
/// The service protocol's numbers (guests/service_protocol.zig), for callers
/// that speak it themselves (kvmlab_vm_call does it all).
pub const kvmlab_service_const = enum(c_int) {
    /// Guest-physical addresses of the header, the request and the response.
    header_gpa = service.protocol.header_gpa,
    request_gpa = service.protocol.request_gpa,
    response_gpa = service.protocol.response_gpa,
    /// Payload bytes at most, each way.
    max_bytes = service.protocol.max_bytes,
    /// The checkpoint tag the guest waits for a request at.
    wait_tag = service.protocol.wait_tag,
};

/// How a kvmlab_vm_call ended, besides its run result.
pub const kvmlab_call_outcome = enum(c_int) {
    /// The run stopped elsewhere (timeout, exit, another checkpoint, a signal).
    no_answer = 0,
    /// The answer to this request is in the buffer.
    answered = 1,
    /// The run stopped at the service checkpoint, but the header does not
    /// answer this request (sequence or length wrong).
    out_of_protocol = 2,
};

/// kvmlab_vm_call's answer.
pub const kvmlab_service_answer = extern struct {
    /// The request's sequence number: set by a call that sends, read by a resume.
    seq: u32,
    /// Answer bytes copied into the buffer.
    bytes: u32,
    /// The guest's kvmlab_service_status (answered only).
    status: u32,
    outcome: kvmlab_call_outcome,
};

pub const kvmlab_regs = extern struct {
    rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
    r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
    rip: u64, rflags: u64,
    cr0: u64, cr2: u64, cr3: u64, cr4: u64, efer: u64,
    cs: u16, ss: u16, cpl: u16, reserved: u16,
};

pub const kvmlab_host_info = extern struct {
    api_version: u32,
    max_vcpus: u32,
    nr_memslots: u32,
    cpuid_entries: u32,
    vcpu_mmap_bytes: u64,
};

pub const kvmlab_snapshot_info = extern struct {
    memory_bytes: u64,
    vcpus: u32,
    file_backed: u32,
    present_pages: u64,
    /// Bytes the snapshot takes where it is stored (disk blocks for a file,
    /// the packed encoding for one in memory).
    stored_bytes: u64,
    created_unix_ns: u64,
    state_bytes: u64,
    version_major: u16,
    version_minor: u16,
    /// 1 when the file behind a loaded snapshot was truncated or replaced
    /// while mapped (reads past its new end gave zeros): reload it.
    damaged: u32,
    guest_name: [32]u8,
};

/// The snapshot file format (see zigsrc/snapshot.zig): its first 384 bytes.
pub const kvmlab_snapshot_header = snapshot.Header;
/// One entry of kvmlab_snapshot_header.sections.
pub const kvmlab_snapshot_section = snapshot.Section;
/// kvmlab_snapshot_section.kind values.
pub const kvmlab_section_kind = snapshot.SectionKind;
/// kvmlab_snapshot_header.arch values.
pub const kvmlab_arch = snapshot.Arch;
/// kvmlab_snapshot_header.flags bits.
pub const kvmlab_snapshot_flag = snapshot.Flag;

/// How a restore gets guest memory: auto (map for file-backed snapshots,
/// else copy), copy, map (copy-on-write mapping of the snapshot file); pool
/// takes only: reuse (a parked VM reset to the snapshot after a release) and
/// prepared (a VM kvmlab_pool_prepare keeps ready).
pub const kvmlab_strategy = restore.Strategy;

/// Per-phase nanoseconds of one restore.
pub const kvmlab_restore_times = extern struct {
    acquire_ns: u64,
    memory_ns: u64,
    vcpu_ns: u64,
    devices_ns: u64,
    total_ns: u64,
    /// 1 when the memory was mapped from the snapshot file, 0 when copied.
    mapped: u32,
    /// 1 when a pooled restore took an idle shell, 0 when it made one.
    hit: u32,
    /// Pool restores: the sequence number of the timing record.
    seq: u64,
    /// How the memory arrived (copy, map; reuse or prepared: a pool's take).
    strategy: kvmlab_strategy,
    reserved: u32 = 0,
};

/// Per-phase nanoseconds of one reset, and how many pages it put back.
pub const kvmlab_reset_times = reset.Times;

/// Reset memory mode: auto (copy), copy pages back, drop private pages
/// (MADV_DONTNEED; map-restored VMs only).
pub const kvmlab_reset_mode = reset.Mode;

pub const kvmlab_loop_result = reset.LoopResult;

/// kvmlab_pool_restore_snapshot options (bits).
pub const kvmlab_restore_flags = enum(c_int) {
    /// The VM can be reset to the snapshot (kvmlab_vm_reset).
    resettable = 1,
    /// On release, the pool resets the VM (off the caller's path) and keeps it
    /// for the next restore of the same snapshot. Implies resettable.
    reset_on_release = 2,
};

/// kvmlab_pool_prepare options (bits).
pub const kvmlab_prepare_flags = enum(c_int) {
    /// Every take of a prepared VM gives it a fresh identity (ports 0x503 and
    /// 0x504 of the guest protocol); without it the guest reads 0.
    identity = 1,
};

/// Struct ids for kvmlab_struct_size.
pub const kvmlab_struct_id = enum(c_int) {
    vm_config = 1,
    boot_options = 2,
    run_result = 3,
    regs = 4,
    host_info = 5,
    snapshot_info = 6,
    restore_times = 7,
    pool_config = 8,
    pool_stats = 9,
    pool_timing = 10,
    reset_times = 11,
    loop_result = 12,
    snapshot_header = 13,
    snapshot_section = 14,
};

pub export fn kvmlab_abi_version() callconv(.c) u32 {
    return abi_version;
}

/// The version of the Zig compiler that built this library ("0.17.1"), for
/// `kvmlab --version` and bug reports.
pub export fn kvmlab_zig_version() callconv(.c) [*:0]const u8 {
    return @import("builtin").zig_version_string;
}

/// Size of a struct as the library sees it, or 0 for an unknown id. Every
/// id is kvmlab_struct_id's tag name prefixed `kvmlab_`.
pub export fn kvmlab_struct_size(id: c_int) callconv(.c) usize {
    const e = std.enums.fromInt(kvmlab_struct_id, id) orelse return 0;
    return switch (e) {
        inline else => |tag| @sizeOf(@field(@This(), "kvmlab_" ++ @tagName(tag))),
    };
}

/// The message of this thread's last failed call ("" if none). Valid until
/// the next call on the same thread.
pub export fn kvmlab_last_error_message() callconv(.c) [*:0]const u8 {
    return errors.message();
}

/// The id of the check that refused this thread's last failed call
/// (KVMLAB_CHECK_NONE if no call failed); see docs/errors.md.
pub export fn kvmlab_last_error_check() callconv(.c) kvmlab_check {
    return errors.lastCheck();
}

pub fn result(r: errors.Error!void) kvmlab_result {
    r catch |e| return errors.finish(e);
    return .ok;
}

/// One C ABI call: `f(args...)` as a result code. The thread's last check id
/// is forgotten first, so a failure that names no check (an allocator's
/// OutOfMemory passed up with `try`) never reports an older call's id.
pub fn call(comptime f: anytype, args: anytype) kvmlab_result {
    errors.clear();
    return result(@call(.auto, f, args));
}

test "capi: a call's failure never carries an older call's check id" {
    const Calls = struct {
        fn named() errors.Error!void {
            return errors.fail(.vm_running, "the VM is already running in another thread", .{});
        }
        fn bare() errors.Error!void {
            return errors.errorOf(.vm_running); // the same class, no check named
        }
    };
    try std.testing.expect(call(Calls.named, .{}) != .ok);
    try std.testing.expectEqual(errors.Check.vm_running, errors.lastCheck());
    try std.testing.expect(call(Calls.bare, .{}) != .ok);
    try std.testing.expectEqual(errors.Check.none, errors.lastCheck());
}

pub fn asVm(h: ?*kvmlab_vm) errors.Error!*machine.Machine {
    const p = h orelse return errors.fail(.null_handle, "VM handle is NULL (closed?)", .{});
    return @ptrCast(@alignCast(p));
}

pub fn asSnap(h: ?*const kvmlab_snapshot) errors.Error!*snapshot.Snapshot {
    const p = h orelse return errors.fail(.null_handle, "snapshot handle is NULL (closed?)", .{});
    return @ptrCast(@alignCast(@constCast(p)));
}

pub fn asPool(h: ?*kvmlab_pool) errors.Error!*pool_mod.Pool {
    const p = h orelse return errors.fail(.null_handle, "pool handle is NULL (closed?)", .{});
    return @ptrCast(@alignCast(p));
}

pub fn bytesOf(ptr: ?[*]const u8, len: usize) errors.Error![]const u8 {
    if (len == 0) return &.{};
    const p = ptr orelse return errors.fail(.null_argument, "NULL buffer with length {d}", .{len});
    return p[0..len];
}

pub fn outPtr(comptime T: type, out: ?*T) errors.Error!*T {
    return out orelse errors.fail(.null_argument, "out is NULL", .{});
}

pub fn restoreTimes(r: restore.Times, acquire_ns: u64, total_ns: u64, mapped: bool, hit: bool, seq: u64, strategy: kvmlab_strategy) kvmlab_restore_times {
    return .{ .acquire_ns = acquire_ns, .memory_ns = r.memory_ns, .vcpu_ns = r.vcpu_ns, .devices_ns = r.devices_ns, .total_ns = total_ns, .mapped = @intFromBool(mapped), .hit = @intFromBool(hit), .seq = seq, .strategy = strategy };
}

/// A strategy from C, which may hold any int.
pub fn strategyOf(strategy: kvmlab_strategy) errors.Error!restore.Strategy {
    return std.enums.fromInt(restore.Strategy, @intFromEnum(strategy)) orelse errors.fail(.unknown_strategy, "unknown strategy {d}", .{@intFromEnum(strategy)});
}


/// Opens /dev/kvm (once per process) and reports what it offers.
pub export fn kvmlab_host_info_get(out: ?*kvmlab_host_info) callconv(.c) kvmlab_result {
    return result(hostInfo(out));
}
fn hostInfo(out: ?*kvmlab_host_info) errors.Error!void {
    const o = try outPtr(kvmlab_host_info, out);
    const h = try host.get();
    o.* = .{
        .api_version = h.api_version,
        .max_vcpus = @intCast(try host.checkExtension(kvm.CAP_MAX_VCPUS)),
        .nr_memslots = @intCast(try host.checkExtension(kvm.CAP_NR_MEMSLOTS)),
        .cpuid_entries = h.cpuid_count,
        .vcpu_mmap_bytes = h.vcpu_mmap_bytes,
    };
}

/// KVM_CHECK_EXTENSION(cap) on /dev/kvm; *out = 0 when absent.
pub export fn kvmlab_host_check_extension(cap: u32, out: ?*u64) callconv(.c) kvmlab_result {
    return result(checkExt(cap, out));
}
fn checkExt(cap: u32, out: ?*u64) errors.Error!void {
    (try outPtr(u64, out)).* = try host.checkExtension(cap);
}

test "capi: every struct id names a struct" {
    inline for (std.meta.tags(kvmlab_struct_id)) |t| try std.testing.expect(kvmlab_struct_size(@intFromEnum(t)) > 0);
    try std.testing.expectEqual(@as(usize, 0), kvmlab_struct_size(0));
}
