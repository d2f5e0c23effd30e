//! The C ABI of libkvmlab: every exported symbol is here, and nothing else
//! exports. Conventions (checked by gen_header.zig, which renders kvmlab.h
//! from this file):
//!   - functions are `kvmlab_<noun>_<verb>` and return `kvmlab_result`
//!     (0 = success, negative = error; detail in kvmlab_last_error_message());
//!   - handles are opaque; `*_new(opts, out)` creates, `*_free(NULL-ok)` frees;
//!   - structs are `extern struct`s named `kvmlab_*`, sized by
//!     kvmlab_struct_size() so the binding can check its view at import;
//!   - times are integer nanoseconds (`*_ns`), sizes are bytes (`*_bytes`).
const std = @import("std");
const errors = @import("errors.zig");
const kvm = @import("kvm.zig");
const host = @import("host.zig");
const vm_mod = @import("vm.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const pool_mod = @import("pool.zig");
const bench = @import("bench.zig");
const reset_mod = @import("reset.zig");
const fault = @import("fault.zig");
const safe = @import("safe.zig");

/// Bumped on any incompatible change of a signature or struct below.
pub const abi_version: u32 = 2;

pub const kvmlab_result = errors.Result;

pub const kvmlab_vm = opaque {};
pub const kvmlab_snapshot = opaque {};
pub const kvmlab_pool = opaque {};

pub const kvmlab_pool_config = extern struct {
    memory_bytes: u64,
    vcpus: u32,
    min_size: u32,
    max_size: u32,
    /// 0 = unlimited.
    max_in_use: u32,
};

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

/// Why `kvmlab_vm_run` returned (`reason`): 0 exit, 1 checkpoint, 2 halt,
/// 3 timeout (or kvmlab_vm_interrupt), 4 interrupted by a signal (e.g. SIGINT).
pub const kvmlab_run_result = extern struct {
    reason: u32,
    exit_code: u32,
    checkpoint_tag: u32,
    reserved: u32,
    elapsed_ns: u64,
    /// Console bytes waiting for kvmlab_vm_console_take.
    console_bytes: u64,
    /// Console bytes lost because the buffer was full.
    console_dropped_bytes: u64,
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

/// Memory strategy of a restore: 0 auto (map for file-backed snapshots),
/// 1 copy, 2 map (copy-on-write mapping of the snapshot file).
pub const kvmlab_strategy = enum(c_int) { auto = 0, copy = 1, map = 2 };

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
};

/// Per-phase nanoseconds of one reset, and how many pages it put back.
pub const kvmlab_reset_times = extern struct {
    dirty_pages: u64,
    log_ns: u64,
    memory_ns: u64,
    vcpu_ns: u64,
    devices_ns: u64,
    total_ns: u64,
};

/// Reset memory mode: 0 auto (copy), 1 copy pages back, 2 drop private
/// pages (MADV_DONTNEED; map-restored VMs only).
pub const kvmlab_reset_mode = enum(c_int) { auto = 0, copy = 1, drop = 2 };

pub const kvmlab_loop_result = reset_mod.LoopResult;

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
};

pub export fn kvmlab_abi_version() callconv(.c) u32 {
    return abi_version;
}

/// The version of the Zig compiler that built this library ("0.17.1"), for
/// `kvmlab --version` and bug reports.
pub export fn kvmlab_zig_version() callconv(.c) [*:0]const u8 {
    return @import("builtin").zig_version_string;
}

/// Size of a struct as the library sees it, or 0 for an unknown id.
pub export fn kvmlab_struct_size(id: c_int) callconv(.c) usize {
    const e = std.enums.fromInt(kvmlab_struct_id, id) orelse return 0;
    return switch (e) {
        .vm_config => @sizeOf(kvmlab_vm_config),
        .boot_options => @sizeOf(kvmlab_boot_options),
        .run_result => @sizeOf(kvmlab_run_result),
        .regs => @sizeOf(kvmlab_regs),
        .host_info => @sizeOf(kvmlab_host_info),
        .snapshot_info => @sizeOf(kvmlab_snapshot_info),
        .restore_times => @sizeOf(kvmlab_restore_times),
        .pool_config => @sizeOf(kvmlab_pool_config),
        .pool_stats => @sizeOf(kvmlab_pool_stats),
        .pool_timing => @sizeOf(kvmlab_pool_timing),
        .reset_times => @sizeOf(kvmlab_reset_times),
        .loop_result => @sizeOf(kvmlab_loop_result),
    };
}

/// The message of this thread's last failed call ("" if none). Valid until
/// the next call on the same thread.
pub export fn kvmlab_last_error_message() callconv(.c) [*:0]const u8 {
    return errors.message();
}

fn result(r: errors.Error!void) kvmlab_result {
    r catch |e| return errors.toResult(e);
    return .ok;
}

fn asVm(h: ?*kvmlab_vm) errors.Error!*vm_mod.Vm {
    const p = h orelse return errors.fail(error.Closed, "VM handle is NULL (closed?)", .{});
    return @ptrCast(@alignCast(p));
}

fn bytesOf(ptr: ?[*]const u8, len: usize) errors.Error![]const u8 {
    if (len == 0) return &.{};
    const p = ptr orelse return errors.fail(error.Config, "NULL buffer with length {d}", .{len});
    return p[0..len];
}

/// Opens /dev/kvm (once per process) and reports what it offers.
pub export fn kvmlab_host_info_get(out: ?*kvmlab_host_info) callconv(.c) kvmlab_result {
    return result(hostInfo(out));
}
fn hostInfo(out: ?*kvmlab_host_info) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
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
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = try host.checkExtension(cap);
}

/// Creates an empty VM shell: VM, memory, slot, irqchip, PIT, vCPUs.
pub export fn kvmlab_vm_new(opts: ?*const kvmlab_vm_config, out: ?*?*kvmlab_vm) callconv(.c) kvmlab_result {
    return result(vmNew(opts, out));
}
fn vmNew(opts: ?*const kvmlab_vm_config, out: ?*?*kvmlab_vm) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    const c = opts orelse return errors.fail(error.Config, "config is NULL", .{});
    const vm = try vm_mod.Vm.create(c.memory_bytes, c.vcpus);
    o.* = @ptrCast(vm);
}

/// Frees a VM; NULL is fine. Must not race with other calls on the same VM.
pub export fn kvmlab_vm_free(h: ?*kvmlab_vm) callconv(.c) void {
    const vm = asVm(h) catch return;
    vm.destroy();
}

pub export fn kvmlab_vm_boot(h: ?*kvmlab_vm, opts: ?*const kvmlab_boot_options) callconv(.c) kvmlab_result {
    return result(vmBoot(h, opts));
}
fn vmBoot(h: ?*kvmlab_vm, opts: ?*const kvmlab_boot_options) errors.Error!void {
    const vm = try asVm(h);
    const o = opts orelse return errors.fail(error.Config, "boot options are NULL", .{});
    const image = try bytesOf(o.image, o.image_bytes);
    const args = try bytesOf(o.args, o.args_bytes);
    try vm.bootGuest(image, args, o.cpl, try bytesOf(o.name, o.name_bytes));
}

/// Runs the guest until every vCPU stopped, or `timeout_ns` passed (0 = none).
pub export fn kvmlab_vm_run(h: ?*kvmlab_vm, timeout_ns: u64, out: ?*kvmlab_run_result) callconv(.c) kvmlab_result {
    return result(vmRun(h, timeout_ns, out));
}
fn vmRun(h: ?*kvmlab_vm, timeout_ns: u64, out: ?*kvmlab_run_result) errors.Error!void {
    const vm = try asVm(h);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    const r = try vm.run(timeout_ns);
    o.* = .{
        .reason = @intFromEnum(r.reason),
        .exit_code = r.exit_code,
        .checkpoint_tag = r.checkpoint_tag,
        .reserved = 0,
        .elapsed_ns = r.elapsed_ns,
        .console_bytes = vm.console_len,
        .console_dropped_bytes = vm.console_dropped,
    };
}

/// Stops a run() in progress on another thread at the vCPUs' next exit (it
/// returns reason 3, timeout; the next run resumes), or a whole reset loop.
/// A request made once the call began is never lost (even before its vCPUs
/// entered the guest). Thread-safe; no effect on later calls when idle.
pub export fn kvmlab_vm_interrupt(h: ?*kvmlab_vm) callconv(.c) void {
    const vm = asVm(h) catch return;
    vm.interrupt();
}

/// Begins closing a VM (call it before kvmlab_vm_free when a run or reset
/// loop may be in progress on another thread): latched, so a run in progress
/// stops at its next exit to the host and every later run or reset loop fails
/// with KVMLAB_CLOSED at once. Thread-safe; irreversible.
pub export fn kvmlab_vm_begin_close(h: ?*kvmlab_vm) callconv(.c) void {
    const vm = asVm(h) catch return;
    vm.beginClose();
}

/// Moves up to `capacity` console bytes into `buf`; *out_bytes = how many.
pub export fn kvmlab_vm_console_take(h: ?*kvmlab_vm, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) kvmlab_result {
    return result(consoleTake(h, buf, capacity, out_bytes));
}
fn consoleTake(h: ?*kvmlab_vm, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const vm = try asVm(h);
    const o = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    const b: []u8 = if (capacity == 0) &.{} else (buf orelse return errors.fail(error.Config, "NULL buffer", .{}))[0..capacity];
    o.* = vm.consoleTake(b);
}

pub export fn kvmlab_vm_read_memory(h: ?*kvmlab_vm, gpa: u64, buf: ?[*]u8, len: usize) callconv(.c) kvmlab_result {
    return result(readMemory(h, gpa, buf, len));
}
fn readMemory(h: ?*kvmlab_vm, gpa: u64, buf: ?[*]u8, len: usize) errors.Error!void {
    const vm = try asVm(h);
    const src = try vm.guestSlice(gpa, len);
    if (len == 0) return;
    const dst = buf orelse return errors.fail(error.Config, "NULL buffer", .{});
    try safe.copyMaybeMapped(dst[0..len], src, vm.mapped());
}

pub export fn kvmlab_vm_write_memory(h: ?*kvmlab_vm, gpa: u64, buf: ?[*]const u8, len: usize) callconv(.c) kvmlab_result {
    return result(writeMemory(h, gpa, buf, len));
}
fn writeMemory(h: ?*kvmlab_vm, gpa: u64, buf: ?[*]const u8, len: usize) errors.Error!void {
    const vm = try asVm(h);
    const dst = try vm.guestSlice(gpa, len);
    if (vm.mapped() and len > 0) {
        // Writing a private file page reads it first (copy-on-write): make
        // sure that read cannot fault.
        var probe: [1]u8 = undefined;
        var at: usize = 0;
        while (at < len) : (at += @intCast(boot.page_bytes - ((gpa + at) % boot.page_bytes))) try safe.copy(&probe, dst[at..][0..1]);
    }
    @memcpy(dst, try bytesOf(buf, len));
    vm.noteHostWrite(gpa, len);
}

pub export fn kvmlab_vm_get_regs(h: ?*kvmlab_vm, vcpu: u32, out: ?*kvmlab_regs) callconv(.c) kvmlab_result {
    return result(getRegs(h, vcpu, out));
}
fn getRegs(h: ?*kvmlab_vm, vcpu: u32, out: ?*kvmlab_regs) errors.Error!void {
    const vm = try asVm(h);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    var r: kvm.Regs = undefined;
    var s: kvm.Sregs = undefined;
    try vm.getRegs(vcpu, &r, &s);
    o.* = .{
        .rax = r.rax, .rbx = r.rbx, .rcx = r.rcx, .rdx = r.rdx, .rsi = r.rsi, .rdi = r.rdi, .rsp = r.rsp, .rbp = r.rbp,
        .r8 = r.r8, .r9 = r.r9, .r10 = r.r10, .r11 = r.r11, .r12 = r.r12, .r13 = r.r13, .r14 = r.r14, .r15 = r.r15,
        .rip = r.rip, .rflags = r.rflags,
        .cr0 = s.cr0, .cr2 = s.cr2, .cr3 = s.cr3, .cr4 = s.cr4, .efer = s.efer,
        .cs = s.cs.selector, .ss = s.ss.selector, .cpl = s.cs.dpl, .reserved = 0,
    };
}

fn asSnap(h: ?*const kvmlab_snapshot) errors.Error!*snapshot.Snapshot {
    const p = h orelse return errors.fail(error.Closed, "snapshot handle is NULL (closed?)", .{});
    return @ptrCast(@alignCast(@constCast(p)));
}

/// Captures a stopped VM (memory and all device state) into a new snapshot.
pub export fn kvmlab_snapshot_capture(h: ?*kvmlab_vm, out: ?*?*kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(snapCapture(h, out));
}
fn snapCapture(h: ?*kvmlab_vm, out: ?*?*kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    const vm = try asVm(h);
    o.* = @ptrCast(try snapshot.capture(vm));
}

/// Checks and copies an encoded snapshot (packed or full layout).
pub export fn kvmlab_snapshot_from_bytes(data: ?[*]const u8, len: usize, out: ?*?*kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(snapFromBytes(data, len, out));
}
fn snapFromBytes(data: ?[*]const u8, len: usize, out: ?*?*kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try snapshot.fromBytes(try bytesOf(data, len)));
}

/// Maps and checks a snapshot file; its memory is not read into the heap.
pub export fn kvmlab_snapshot_load(path: ?[*:0]const u8, out: ?*?*kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(snapLoad(path, out));
}
fn snapLoad(path: ?[*:0]const u8, out: ?*?*kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    const p = path orelse return errors.fail(error.Config, "path is NULL", .{});
    o.* = @ptrCast(try snapshot.load(p));
}

/// Writes the snapshot atomically to `path` (mode 0600, zero pages as holes).
pub export fn kvmlab_snapshot_save(h: ?*const kvmlab_snapshot, path: ?[*:0]const u8) callconv(.c) kvmlab_result {
    return result(snapSave(h, path));
}
fn snapSave(h: ?*const kvmlab_snapshot, path: ?[*:0]const u8) errors.Error!void {
    const s = try asSnap(h);
    try s.checkIntact();
    try snapshot.save(s, path orelse return errors.fail(error.Config, "path is NULL", .{}));
}

/// The packed encoding. With buf NULL, only *out_bytes (the size) is set;
/// otherwise `capacity` must be at least that size.
pub export fn kvmlab_snapshot_to_bytes(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) kvmlab_result {
    return result(snapToBytes(h, buf, capacity, out_bytes));
}
fn snapToBytes(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const s = try asSnap(h);
    const o = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    try s.checkIntact();
    const n: usize = @intCast(snapshot.encodedBytes(s));
    o.* = n;
    const b = buf orelse return;
    if (capacity < n) return errors.fail(error.Config, "buffer of {d} bytes is smaller than the {d}-byte snapshot", .{ capacity, n });
    try snapshot.toBytes(s, b[0..n]);
}

/// Copies the state blob (everything but memory) into buf; NULL buf: size only.
pub export fn kvmlab_snapshot_state(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) kvmlab_result {
    return result(snapState(h, buf, capacity, out_bytes));
}
fn snapState(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const s = try asSnap(h);
    const o = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = s.blob.len;
    const b = buf orelse return;
    if (capacity < s.blob.len) return errors.fail(error.Config, "buffer too small for the {d}-byte state", .{s.blob.len});
    @memcpy(b[0..s.blob.len], s.blob);
}

/// A dense read-only view of guest memory, valid until the snapshot is freed.
pub export fn kvmlab_snapshot_memory(h: ?*const kvmlab_snapshot, out_ptr: ?*?[*]const u8, out_bytes: ?*u64) callconv(.c) kvmlab_result {
    return result(snapMemory(h, out_ptr, out_bytes));
}
fn snapMemory(h: ?*const kvmlab_snapshot, out_ptr: ?*?[*]const u8, out_bytes: ?*u64) errors.Error!void {
    const s = try asSnap(h);
    const p = out_ptr orelse return errors.fail(error.Config, "out is NULL", .{});
    const n = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    p.* = s.memory.ptr;
    n.* = s.memory.len;
}

pub export fn kvmlab_snapshot_get_info(h: ?*const kvmlab_snapshot, out: ?*kvmlab_snapshot_info) callconv(.c) kvmlab_result {
    return result(snapInfo(h, out));
}
fn snapInfo(h: ?*const kvmlab_snapshot, out: ?*kvmlab_snapshot_info) errors.Error!void {
    const s = try asSnap(h);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    s.checkFile() catch {}; // sets `damaged` when the file changed since load
    o.* = .{
        .memory_bytes = s.parsed.memory_bytes,
        .vcpus = s.parsed.vcpus,
        .file_backed = @intFromBool(s.fileBacked()),
        .present_pages = s.present_pages,
        .stored_bytes = s.stored_bytes,
        .created_unix_ns = s.created_unix_ns,
        .state_bytes = s.blob.len,
        .version_major = snapshot.version_major,
        .version_minor = snapshot.version_minor,
        .damaged = @intFromBool(s.damaged.load(.acquire)),
        .guest_name = @splat(0),
    };
    const name = s.guestName();
    @memcpy(o.guest_name[0..name.len], name);
}

pub export fn kvmlab_snapshot_free(h: ?*kvmlab_snapshot) callconv(.c) void {
    const s = asSnap(h) catch return;
    s.release();
}

/// Builds a new VM from a snapshot (a fresh shell, then restore).
pub export fn kvmlab_vm_restore(h: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) callconv(.c) kvmlab_result {
    return result(vmRestore(h, strategy, out, times));
}
fn vmRestore(h: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    const s = try asSnap(h);
    const t0 = vm_mod.monotonicNs();
    const vm = try vm_mod.Vm.create(s.parsed.memory_bytes, s.parsed.vcpus);
    errdefer vm.destroy();
    const t1 = vm_mod.monotonicNs();
    var rt: snapshot.RestoreTimes = .{};
    try snapshot.restoreSnapshot(vm, s, @enumFromInt(@as(u32, @intCast(@intFromEnum(strategy)))), &rt);
    const t2 = vm_mod.monotonicNs();
    if (times) |t| t.* = .{
        .acquire_ns = t1 - t0,
        .memory_ns = rt.memory_ns,
        .vcpu_ns = rt.vcpu_ns,
        .devices_ns = rt.devices_ns,
        .total_ns = t2 - t0,
        .mapped = @intFromBool(vm.mapped()),
        .hit = 0,
        .seq = 0,
    };
    o.* = @ptrCast(vm);
}

fn asPool(h: ?*kvmlab_pool) errors.Error!*pool_mod.Pool {
    const p = h orelse return errors.fail(error.Closed, "pool handle is NULL (closed?)", .{});
    return @ptrCast(@alignCast(p));
}

fn poolConfig(cfg: ?*const kvmlab_pool_config) errors.Error!pool_mod.Config {
    const c = cfg orelse return errors.fail(error.Config, "config is NULL", .{});
    return .{ .memory_bytes = c.memory_bytes, .vcpus = c.vcpus, .min_size = c.min_size, .max_size = c.max_size, .max_in_use = c.max_in_use };
}

/// Creates a pool and warms min_size shells before returning.
pub export fn kvmlab_pool_new(cfg: ?*const kvmlab_pool_config, out: ?*?*kvmlab_pool) callconv(.c) kvmlab_result {
    return result(poolNew(cfg, out));
}
fn poolNew(cfg: ?*const kvmlab_pool_config, out: ?*?*kvmlab_pool) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try pool_mod.Pool.create(try poolConfig(cfg)));
}

/// Closes the pool (idle shells destroyed, worker stopped); NULL is fine.
/// VMs still out stay valid; the last kvmlab_pool_release frees the pool.
pub export fn kvmlab_pool_free(h: ?*kvmlab_pool) callconv(.c) void {
    const p = asPool(h) catch return;
    p.close();
}

pub export fn kvmlab_pool_warm(h: ?*kvmlab_pool, target: u32) callconv(.c) kvmlab_result {
    return result(poolWarm(h, target));
}
fn poolWarm(h: ?*kvmlab_pool, target: u32) errors.Error!void {
    try (try asPool(h)).warm(target);
}

/// Idle shells now; 0 for NULL. Never fails.
pub export fn kvmlab_pool_idle_count(h: ?*kvmlab_pool) callconv(.c) u32 {
    const p = asPool(h) catch return 0;
    return p.idleCount();
}

pub export fn kvmlab_pool_get_stats(h: ?*kvmlab_pool, out: ?*kvmlab_pool_stats) callconv(.c) kvmlab_result {
    return result(poolStats(h, out));
}
fn poolStats(h: ?*kvmlab_pool, out: ?*kvmlab_pool_stats) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = (try asPool(h)).stats();
}

/// Copies up to `capacity` of the newest restore records, oldest first.
pub export fn kvmlab_pool_timings(h: ?*kvmlab_pool, buf: ?[*]kvmlab_pool_timing, capacity: usize, out_count: ?*usize) callconv(.c) kvmlab_result {
    return result(poolTimings(h, buf, capacity, out_count));
}
fn poolTimings(h: ?*kvmlab_pool, buf: ?[*]kvmlab_pool_timing, capacity: usize, out_count: ?*usize) errors.Error!void {
    const p = try asPool(h);
    const o = out_count orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = 0;
    if (capacity == 0) return;
    const b = buf orelse return errors.fail(error.Config, "NULL buffer", .{});
    o.* = p.copyTimings(b[0..capacity]);
}

/// Records the duration of a pooled VM's first run() in its timing record.
pub export fn kvmlab_pool_note_first_run(h: ?*kvmlab_pool, seq: u64, first_run_ns: u64) callconv(.c) void {
    const p = asPool(h) catch return;
    p.noteFirstRun(seq, first_run_ns);
}

fn poolFinish(p: *pool_mod.Pool, src: pool_mod.Pool.Source, wait_ns: u64, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    var rt: snapshot.RestoreTimes = .{};
    var acquire: u64 = 0;
    var hit = false;
    var seq: u64 = 0;
    const t0 = vm_mod.monotonicNs();
    const vm = try p.restore(src, wait_ns, &rt, &acquire, &hit, &seq);
    if (times) |t| t.* = .{
        .acquire_ns = acquire,
        .memory_ns = rt.memory_ns,
        .vcpu_ns = rt.vcpu_ns,
        .devices_ns = rt.devices_ns,
        .total_ns = vm_mod.monotonicNs() - t0,
        .mapped = @intFromBool(src.file != null),
        .hit = @intFromBool(hit),
        .seq = seq,
    };
    o.* = @ptrCast(vm);
}

/// kvmlab_pool_restore_snapshot options (bits).
pub const kvmlab_restore_flags = enum(c_int) {
    /// The VM can be reset to the snapshot (kvmlab_vm_reset).
    resettable = 1,
    /// On release, the pool resets the VM (off the caller's path) and keeps it
    /// for the next restore of the same snapshot. Implies resettable.
    reset_on_release = 2,
};

/// Restores a Snapshot into a pooled shell (file-backed + auto/map: zero copy).
/// `wait_ns` > 0 waits that long for room when max_in_use VMs are out.
/// `flags`: kvmlab_restore_flags bits. With reset_on_release, a VM parked by
/// an earlier release for this snapshot is reused (timing strategy 3).
pub export fn kvmlab_pool_restore_snapshot(h: ?*kvmlab_pool, snap: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, wait_ns: u64, flags: u32, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) callconv(.c) kvmlab_result {
    return result(poolRestoreSnapshot(h, snap, strategy, wait_ns, flags, out, times));
}
fn poolRestoreSnapshot(h: ?*kvmlab_pool, snap: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, wait_ns: u64, flags: u32, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) errors.Error!void {
    const p = try asPool(h);
    const s = try asSnap(snap);
    try s.checkIntact();
    const park = flags & @intFromEnum(kvmlab_restore_flags.reset_on_release) != 0;
    const resettable = park or flags & @intFromEnum(kvmlab_restore_flags.resettable) != 0;
    if (park) {
        const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
        var seq: u64 = 0;
        const t0 = vm_mod.monotonicNs();
        if (p.reuse(s, &seq)) |vm| {
            if (times) |t| t.* = .{ .acquire_ns = vm_mod.monotonicNs() - t0, .memory_ns = 0, .vcpu_ns = 0, .devices_ns = 0, .total_ns = vm_mod.monotonicNs() - t0, .mapped = @intFromBool(vm.mapped()), .hit = 1, .seq = seq };
            o.* = @ptrCast(vm);
            return;
        }
    }
    const file: ?*snapshot.Snapshot = if (try s.useMap(@enumFromInt(@as(u32, @intCast(@intFromEnum(strategy)))))) s else null;
    try poolFinish(p, .{ .parsed = &s.parsed, .memory = s.memory, .packed_layout = false, .source_mapped = s.fileBacked(), .file = file }, wait_ns, out, times);
    if (resettable) {
        const vm = try asVm(out.?.*);
        reset_mod.enable(vm, s) catch |e| {
            p.release(vm);
            out.?.* = null;
            return e;
        };
        vm.park_on_release = park;
    }
}

/// Restores from raw parts: dense guest memory and a state blob.
pub export fn kvmlab_pool_restore_parts(h: ?*kvmlab_pool, memory: ?[*]const u8, memory_bytes: usize, vcpu_state: ?[*]const u8, state_bytes: usize, wait_ns: u64, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) callconv(.c) kvmlab_result {
    return result(poolRestoreParts(h, memory, memory_bytes, vcpu_state, state_bytes, wait_ns, out, times));
}
fn poolRestoreParts(h: ?*kvmlab_pool, memory: ?[*]const u8, memory_bytes: usize, vcpu_state: ?[*]const u8, state_bytes: usize, wait_ns: u64, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) errors.Error!void {
    const p = try asPool(h);
    const parsed = try state.parse(try bytesOf(vcpu_state, state_bytes));
    if (memory_bytes != parsed.memory_bytes)
        return errors.fail(error.Snapshot, "memory buffer is {d} bytes; the vCPU state describes {d} MiB", .{ memory_bytes, parsed.memory_bytes >> 20 });
    try poolFinish(p, .{ .parsed = &parsed, .memory = try bytesOf(memory, memory_bytes), .packed_layout = false, .source_mapped = true, .file = null }, wait_ns, out, times);
}

/// Restores from an encoded snapshot (checked first), copying its memory.
pub export fn kvmlab_pool_restore_bytes(h: ?*kvmlab_pool, data: ?[*]const u8, len: usize, wait_ns: u64, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) callconv(.c) kvmlab_result {
    return result(poolRestoreBytes(h, data, len, wait_ns, out, times));
}
fn poolRestoreBytes(h: ?*kvmlab_pool, data: ?[*]const u8, len: usize, wait_ns: u64, out: ?*?*kvmlab_vm, times: ?*kvmlab_restore_times) errors.Error!void {
    const p = try asPool(h);
    const c = try snapshot.check(try bytesOf(data, len));
    try poolFinish(p, .{ .parsed = &c.parsed, .memory = c.memory, .packed_layout = c.packed_layout, .source_mapped = false, .file = null }, wait_ns, out, times);
}

/// Gives a pooled VM back (it must come from this pool); it is destroyed off
/// the caller's path. The VM handle is invalid afterwards.
pub export fn kvmlab_pool_release(h: ?*kvmlab_pool, vm_handle: ?*kvmlab_vm) callconv(.c) void {
    const p = asPool(h) catch return;
    const vm = asVm(vm_handle) catch return;
    p.release(vm);
}

/// Makes a VM restored from `snap` resettable to it (the VM keeps `snap`
/// alive). Call right after the restore.
pub export fn kvmlab_vm_enable_reset(h: ?*kvmlab_vm, snap: ?*const kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(enableReset(h, snap));
}
fn enableReset(h: ?*kvmlab_vm, snap: ?*const kvmlab_snapshot) errors.Error!void {
    try reset_mod.enable(try asVm(h), try asSnap(snap));
}

/// Puts the VM back to its snapshot: dirty pages, vCPUs, devices.
pub export fn kvmlab_vm_reset(h: ?*kvmlab_vm, mode: kvmlab_reset_mode, out: ?*kvmlab_reset_times) callconv(.c) kvmlab_result {
    return result(vmReset(h, mode, out));
}
fn vmReset(h: ?*kvmlab_vm, mode: kvmlab_reset_mode, out: ?*kvmlab_reset_times) errors.Error!void {
    const vm = try asVm(h);
    var t: reset_mod.Times = .{};
    try reset_mod.reset(vm, @enumFromInt(@as(u32, @intCast(@intFromEnum(mode)))), &t);
    if (out) |o| o.* = .{ .dirty_pages = t.dirty_pages, .log_ns = t.log_ns, .memory_ns = t.memory_ns, .vcpu_ns = t.vcpu_ns, .devices_ns = t.devices_ns, .total_ns = t.total_ns };
}

/// For each of `count` inputs (`input_bytes` each, packed in `inputs`):
/// write it at `input_gpa`, run (deadline `timeout_ns`, 0 = none), record,
/// reset. Results go to `out[count]`; *out_done = how many inputs were done
/// (fewer than `count` when kvmlab_vm_interrupt or a signal such as SIGINT
/// stopped the whole loop: the last result's reason is then 3 or 4; the VM is
/// reset either way). Fails with KVMLAB_CLOSED when the VM began closing.
pub export fn kvmlab_vm_reset_loop(h: ?*kvmlab_vm, inputs: ?[*]const u8, input_bytes: usize, count: usize, input_gpa: u64, timeout_ns: u64, mode: kvmlab_reset_mode, out: ?[*]kvmlab_loop_result, out_done: ?*usize) callconv(.c) kvmlab_result {
    return result(resetLoop(h, inputs, input_bytes, count, input_gpa, timeout_ns, mode, out, out_done));
}
fn resetLoop(h: ?*kvmlab_vm, inputs: ?[*]const u8, input_bytes: usize, count: usize, input_gpa: u64, timeout_ns: u64, mode: kvmlab_reset_mode, out: ?[*]kvmlab_loop_result, out_done: ?*usize) errors.Error!void {
    const vm = try asVm(h);
    const d = out_done orelse return errors.fail(error.Config, "out_done is NULL", .{});
    d.* = 0;
    if (count == 0) return;
    if (count > 1 << 24 or input_bytes > 1 << 20) return errors.fail(error.Config, "reset_loop takes at most 2^24 inputs of at most 1 MiB", .{});
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    d.* = try reset_mod.loop(vm, try bytesOf(inputs, input_bytes * count), input_bytes, input_gpa, timeout_ns, @enumFromInt(@as(u32, @intCast(@intFromEnum(mode)))), o[0..count]);
}

/// kvmlab_vm_reset_loop for inputs of different lengths: input i is
/// inputs[offsets[i] .. offsets[i+1]] (`count` + 1 offsets, never decreasing;
/// each input at most 1 MiB). Each is written as its length (u32 LE) at
/// `input_gpa` and its bytes right after (docs/guest-protocol.md, input
/// protocol), then run, recorded and reset. With `console_stride` > 0 (at most
/// 1 MiB), the first `console_stride` bytes of run i's console output go to
/// console[i * console_stride ..]; out[i].console_bytes is how many it wrote.
/// *out_done = how many inputs were done.
pub export fn kvmlab_vm_reset_loop_var(h: ?*kvmlab_vm, inputs: ?[*]const u8, offsets: ?[*]const u64, count: usize, input_gpa: u64, timeout_ns: u64, mode: kvmlab_reset_mode, out: ?[*]kvmlab_loop_result, console: ?[*]u8, console_stride: usize, out_done: ?*usize) callconv(.c) kvmlab_result {
    return result(resetLoopVar(h, inputs, offsets, count, input_gpa, timeout_ns, mode, out, console, console_stride, out_done));
}
fn resetLoopVar(h: ?*kvmlab_vm, inputs: ?[*]const u8, offsets: ?[*]const u64, count: usize, input_gpa: u64, timeout_ns: u64, mode: kvmlab_reset_mode, out: ?[*]kvmlab_loop_result, console: ?[*]u8, console_stride: usize, out_done: ?*usize) errors.Error!void {
    const vm = try asVm(h);
    const d = out_done orelse return errors.fail(error.Config, "out_done is NULL", .{});
    d.* = 0;
    if (count == 0) return;
    if (count > 1 << 24 or console_stride > vm_mod.console_capacity_bytes)
        return errors.fail(error.Config, "reset_loop_var takes at most 2^24 inputs and a console_stride of at most 1 MiB", .{});
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    const offs = (offsets orelse return errors.fail(error.Config, "offsets is NULL", .{}))[0 .. count + 1];
    if (offs[count] > 1 << 32) return errors.fail(error.Config, "reset_loop_var takes at most 4 GiB of inputs", .{});
    const con: []u8 = if (console_stride == 0) &.{} else (console orelse return errors.fail(error.Config, "console is NULL", .{}))[0 .. count * console_stride];
    d.* = try reset_mod.loopVar(vm, try bytesOf(inputs, @intCast(offs[count])), offs, input_gpa, timeout_ns, @enumFromInt(@as(u32, @intCast(@intFromEnum(mode)))), o[0..count], con, console_stride);
}

/// Benchmark floor of a reset: the bare dirty-log read, page copies and state
/// ioctls on a resettable VM (which ends up reset). *out_dirty = pages copied.
pub export fn kvmlab_bench_reset_floor(h: ?*kvmlab_vm, out: ?*kvmlab_reset_times) callconv(.c) kvmlab_result {
    return result(benchResetFloor(h, out));
}
fn benchResetFloor(h: ?*kvmlab_vm, out: ?*kvmlab_reset_times) errors.Error!void {
    const vm = try asVm(h);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    var rt: snapshot.RestoreTimes = .{};
    var dirty: u64 = 0;
    try bench.resetFloor(vm, &rt, &dirty);
    o.* = .{ .dirty_pages = dirty, .log_ns = 0, .memory_ns = rt.memory_ns, .vcpu_ns = rt.vcpu_ns, .devices_ns = rt.devices_ns, .total_ns = rt.memory_ns + rt.vcpu_ns + rt.devices_ns };
}

/// Benchmark: `count` pooled restores of `snap` driven from native code, each
/// released right away; out_total_ns[i] = wall time of restore i as the C
/// caller sees it (the baseline for measuring the Python API's overhead).
/// Between restores it waits until the pool has an idle shell again (not
/// timed), so every restore is a hit like a warmed Python loop's.
pub export fn kvmlab_bench_pool_restores(h: ?*kvmlab_pool, snap: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, count: usize, out_total_ns: ?[*]u64) callconv(.c) kvmlab_result {
    return result(benchPoolRestores(h, snap, strategy, count, out_total_ns));
}
fn benchPoolRestores(h: ?*kvmlab_pool, snap: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, count: usize, out_total_ns: ?[*]u64) errors.Error!void {
    const p = try asPool(h);
    const o = out_total_ns orelse return errors.fail(error.Config, "out is NULL", .{});
    if (count > 1 << 20) return errors.fail(error.Config, "at most 2^20 restores", .{});
    for (0..count) |i| {
        var spins: usize = 0;
        while (p.idleCount() == 0 and spins < 20_000) : (spins += 1) std.Thread.yield() catch {};
        var vm_h: ?*kvmlab_vm = null;
        const t0 = vm_mod.monotonicNs();
        try poolRestoreSnapshot(h, snap, strategy, 0, 0, &vm_h, null);
        o[i] = vm_mod.monotonicNs() - t0;
        p.release(try asVm(vm_h));
    }
}

/// Benchmark: takes an idle shell from the pool without restoring into it,
/// for kvmlab_bench_restore_floor into a pooled shell (shells get slower to
/// restore into as they wait: a fresh shell would flatter the floor). The
/// shell counts as in use; hand it back with kvmlab_pool_release.
pub export fn kvmlab_bench_pool_take_shell(h: ?*kvmlab_pool, out: ?*?*kvmlab_vm) callconv(.c) kvmlab_result {
    return result(benchPoolTakeShell(h, out));
}
fn benchPoolTakeShell(h: ?*kvmlab_pool, out: ?*?*kvmlab_vm) errors.Error!void {
    const p = try asPool(h);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = @ptrCast(try p.takeIdle());
}

/// TEST ONLY: makes shell-creation step `site` (1 create_vm, 2 memory, 3 slot,
/// 4 irqchip, 5 pit, 6 vcpu, 7 vcpu_mmap, 8 cpuid) fail after passing `after`
/// more times; site 0 disarms.
pub export fn kvmlab_fault_inject(site: u32, after: u32) callconv(.c) kvmlab_result {
    if (site == 0) {
        fault.arm(0, 0) catch {};
        return .ok;
    }
    return result(fault.arm(site, after));
}

/// Benchmark floor: times only the bare ioctls and memory operations of a
/// restore of `snap` into `vm_handle`, a fresh shell from kvmlab_vm_new of the
/// same shape (free it afterwards; it is not runnable).
pub export fn kvmlab_bench_restore_floor(vm_handle: ?*kvmlab_vm, snap: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, out: ?*kvmlab_restore_times) callconv(.c) kvmlab_result {
    return result(benchFloor(vm_handle, snap, strategy, out));
}
fn benchFloor(vm_handle: ?*kvmlab_vm, snap: ?*const kvmlab_snapshot, strategy: kvmlab_strategy, out: ?*kvmlab_restore_times) errors.Error!void {
    const vm = try asVm(vm_handle);
    const s = try asSnap(snap);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    const use_map = try s.useMap(@enumFromInt(@as(u32, @intCast(@intFromEnum(strategy)))));
    var rt: snapshot.RestoreTimes = .{};
    try bench.restoreFloor(vm, s, use_map, &rt);
    o.* = .{ .acquire_ns = 0, .memory_ns = rt.memory_ns, .vcpu_ns = rt.vcpu_ns, .devices_ns = rt.devices_ns, .total_ns = rt.memory_ns + rt.vcpu_ns + rt.devices_ns, .mapped = @intFromBool(use_map), .hit = 0, .seq = 0 };
}

test {
    _ = @import("fuzz.zig");
    _ = safe;
    _ = reset_mod;
    _ = pool_mod;
    _ = state;
    _ = snapshot;
    _ = errors;
    _ = boot;
    _ = kvm;
}
