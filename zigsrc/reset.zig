//! Reset: put a restored VM back to exactly the snapshot it came from by
//! restoring only what changed. Guest writes come from KVM's dirty log
//! (every shell has KVM_MEM_LOG_DIRTY_PAGES on its slot), host writes from
//! the VM's own bitmap; vCPU and device state are restored whole.
//!
//! Memory modes: `copy` writes each dirty page back from the snapshot (the
//! page stays mapped: the next guest write costs one write-protect fault);
//! `drop` (map-restored VMs only) discards the private copies with
//! MADV_DONTNEED so the file's pages show through again (the next guest
//! access costs a fault that maps the page). `auto` picks copy.
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const vm_mod = @import("vm.zig");
const safe = @import("safe.zig");
const Vm = vm_mod.Vm;

const allocator = std.heap.c_allocator;

pub const Mode = enum(u32) { auto = 0, copy = 1, drop = 2 };

pub const Times = struct {
    dirty_pages: u64 = 0,
    log_ns: u64 = 0,
    memory_ns: u64 = 0,
    vcpu_ns: u64 = 0,
    devices_ns: u64 = 0,
    total_ns: u64 = 0,
};

const DirtyLog = extern struct {
    slot: u32,
    padding: u32 = 0,
    bitmap: u64,
};

fn words(vm: *const Vm) usize {
    return @intCast((vm.mem.len / boot.page_bytes + 63) / 64);
}

/// Makes a restored VM resettable to `s` (which it retains). The dirty log is
/// read once here so that only writes after this point count.
pub fn enable(vm: *Vm, s: *snapshot.Snapshot) errors.Error!void {
    if (vm.reset_snap != null) return;
    if (s.parsed.memory_bytes != vm.mem.len or s.parsed.vcpus != vm.vcpu_count)
        return errors.fail(error.Snapshot, "the snapshot does not match this VM's shape", .{});
    vm.host_dirty = allocator.alloc(u64, words(vm)) catch return error.OutOfMemory;
    @memset(vm.host_dirty, 0);
    vm.reset_snap = s.retain();
}

/// Reads and clears KVM's dirty log into `bitmap`.
fn readLog(vm: *Vm, bitmap: []u64) errors.Error!void {
    @memset(bitmap, 0);
    var log = DirtyLog{ .slot = 0, .bitmap = @intFromPtr(bitmap.ptr) };
    _ = kvm.ioctl(vm.vm_fd, kvm.KVM_GET_DIRTY_LOG, @intFromPtr(&log)) catch return errors.ioctlFailed("KVM_GET_DIRTY_LOG");
}

pub fn reset(vm: *Vm, mode: Mode, times: *Times) errors.Error!void {
    const s = vm.reset_snap orelse return errors.fail(error.Busy, "this VM was not restored with reset enabled (restore it with resettable=True)", .{});
    try s.checkIntact(); // its file may have been rewritten since the last reset
    if (vm.running.swap(true, .acq_rel)) return errors.fail(error.Busy, "cannot reset a running VM", .{});
    defer vm.running.store(false, .release);
    const use_drop = switch (mode) {
        // Dropping private pages shows the mapped file's: only right when that
        // file is the snapshot this VM resets to.
        .drop => if (vm.source_snap == s) true else return errors.fail(error.Config, "reset mode 'drop' needs a VM restored with strategy 'map' from the snapshot it resets to", .{}),
        .copy, .auto => false,
    };
    const t0 = vm_mod.monotonicNs();
    var stack_buf: [2048]u64 = undefined; // 512 MiB of guest memory
    const n = words(vm);
    const bitmap = if (n <= stack_buf.len) stack_buf[0..n] else (allocator.alloc(u64, n) catch return error.OutOfMemory);
    defer if (n > stack_buf.len) allocator.free(bitmap);
    try readLog(vm, bitmap);
    const t1 = vm_mod.monotonicNs();
    const golden_map = s.parsed.pageMap();
    var dirty: u64 = 0;
    // drop mode: contiguous dirty pages go to one madvise call.
    var run_start: usize = 0;
    var run_len: usize = 0;
    // copy mode from a file-backed snapshot: SIGBUS-safe reads (memcpy under
    // kvmlab's SIGBUS handler, else batched process_vm_readv).
    var batch: safe.Batch = .{};
    const guard = safe.Guard.init(&s.damaged, s.sigbus_slot != null);
    const from_file = s.fileBacked() and !guard.fast;
    for (bitmap, vm.host_dirty, 0..) |*w, *h, wi| {
        var bits = w.* | h.*;
        h.* = 0;
        while (bits != 0) {
            const b: u6 = @intCast(@ctz(bits));
            bits &= bits - 1;
            const page = wi * 64 + b;
            const off = page * boot.page_bytes;
            const dst = vm.mem[off..][0..boot.page_bytes];
            if (use_drop) {
                if (run_len > 0 and run_start + run_len == page) {
                    run_len += 1;
                } else {
                    dropRun(vm, run_start, run_len);
                    run_start = page;
                    run_len = 1;
                }
            } else if (snapshot.isPresent(golden_map, page)) {
                if (from_file) try batch.add(dst, s.memory[off..][0..boot.page_bytes]) else @memcpy(dst, s.memory[off..][0..boot.page_bytes]);
            } else {
                @memset(dst, 0);
            }
            dirty += 1;
        }
    }
    dropRun(vm, run_start, run_len);
    try batch.flush();
    try guard.finish();
    const t2 = vm_mod.monotonicNs();
    var st: state.RestoreTimes = .{};
    try state.restore(vm, &s.parsed, &st);
    const t3 = vm_mod.monotonicNs();
    times.* = .{ .dirty_pages = dirty, .log_ns = t1 - t0, .memory_ns = t2 - t1, .vcpu_ns = st.vcpu_ns, .devices_ns = st.devices_ns, .total_ns = t3 - t0 };
}

fn dropRun(vm: *Vm, first: usize, pages: usize) void {
    if (pages == 0) return;
    _ = linux.madvise(vm.mem[first * boot.page_bytes ..].ptr, pages * boot.page_bytes, linux.MADV.DONTNEED);
}

pub const LoopResult = extern struct {
    reason: u32,
    exit_code: u32,
    checkpoint_tag: u32,
    /// 1 when the run crashed (the crash message is dropped; reset recovers).
    crashed: u32,
    run_ns: u64,
    reset_ns: u64,
    dirty_pages: u64,
    console_bytes: u64,
};

/// For each input: write it at `input_gpa`, run until the guest stops (or
/// `timeout_ns`), record the outcome, reset. Python is not on this path.
/// Returns how many inputs were done: fewer than `out.len` when the loop was
/// stopped as a whole, by interrupt() or a foreign signal (Ctrl-C: the last
/// result says `interrupted`) or because the VM is closing (error.Closed).
/// The VM is reset after the last input either way.
pub fn loop(vm: *Vm, inputs: []const u8, input_bytes: usize, input_gpa: u64, timeout_ns: u64, mode: Mode, out: []LoopResult) errors.Error!usize {
    if (vm.reset_snap == null) return errors.fail(error.Busy, "this VM was not restored with reset enabled", .{});
    if (input_bytes == 0 or inputs.len % input_bytes != 0 or inputs.len / input_bytes != out.len)
        return errors.fail(error.Config, "inputs ({d} bytes) must be {d} inputs of {d} bytes", .{ inputs.len, out.len, input_bytes });
    _ = try vm.guestSlice(input_gpa, input_bytes);
    // One operation: an interrupt() or close() during any run or reset of
    // the loop ends the whole loop, not just the current input's run.
    vm.beginOperation();
    const signals = vm_mod.ForeignSignals.block(); // for the whole loop, runs and resets
    defer signals.unblock();
    for (out, 0..) |*r, i| {
        if (stoppedBySignal(r)) return i + 1;
        const dst = try vm.guestSlice(input_gpa, input_bytes);
        @memcpy(dst, inputs[i * input_bytes ..][0..input_bytes]);
        vm.noteHostWrite(input_gpa, input_bytes);
        if (try runOne(vm, r, timeout_ns, mode, &.{}, i)) return i + 1;
    }
    return out.len;
}

/// Longest input of `loopVar` (its u32 length prefix not counted).
pub const max_var_input_bytes: u64 = 1 << 20;

/// `loop` for inputs of different lengths (the input protocol of
/// docs/guest-protocol.md): input i is inputs[offsets[i]..offsets[i+1]]
/// (`offsets` has out.len + 1 entries, never decreasing, the last one
/// inputs.len). Each is written as its length (u32 LE) at `input_gpa` and its
/// bytes right after. With `console_stride` > 0, the first `console_stride`
/// bytes of run i's console output go to console[i * console_stride ..].
/// Returns how many inputs were done (stopping as `loop` does).
pub fn loopVar(vm: *Vm, inputs: []const u8, offsets: []const u64, input_gpa: u64, timeout_ns: u64, mode: Mode, out: []LoopResult, console: []u8, console_stride: usize) errors.Error!usize {
    if (vm.reset_snap == null) return errors.fail(error.Busy, "this VM was not restored with reset enabled", .{});
    if (offsets.len != out.len + 1 or offsets[out.len] != inputs.len)
        return errors.fail(error.Config, "offsets must be {d} entries up to the inputs' {d} bytes", .{ out.len + 1, inputs.len });
    if (console.len != out.len * console_stride) return errors.fail(error.Config, "console must be count * console_stride bytes", .{});
    var longest: u64 = 0;
    for (offsets[0..out.len], offsets[1..]) |a, b| {
        if (b < a) return errors.fail(error.Config, "offsets must not decrease", .{});
        longest = @max(longest, b - a);
    }
    if (longest > max_var_input_bytes) return errors.fail(error.Config, "an input is {d} bytes; at most {d}", .{ longest, max_var_input_bytes });
    _ = try vm.guestSlice(input_gpa, 4 + longest);
    vm.beginOperation();
    const signals = vm_mod.ForeignSignals.block(); // for the whole loop, runs and resets
    defer signals.unblock();
    for (out, 0..) |*r, i| {
        if (stoppedBySignal(r)) return i + 1;
        const input = inputs[@intCast(offsets[i])..@intCast(offsets[i + 1])];
        const dst = try vm.guestSlice(input_gpa, 4 + input.len);
        std.mem.writeInt(u32, dst[0..4], @intCast(input.len), .little);
        @memcpy(dst[4..], input);
        vm.noteHostWrite(input_gpa, 4 + input.len);
        if (try runOne(vm, r, timeout_ns, mode, console[i * console_stride ..][0..console_stride], i)) return i + 1;
    }
    return out.len;
}

/// A signal (Ctrl-C) came while the loop was outside KVM_RUN, e.g. during
/// a reset (it waits blocked, see vm.ForeignSignals): input i is not run and
/// its result says `interrupted`, as when the signal stops a run.
fn stoppedBySignal(r: *LoopResult) bool {
    if (!vm_mod.ForeignSignals.pending()) return false;
    r.* = std.mem.zeroes(LoopResult);
    r.reason = @intFromEnum(vm_mod.Reason.interrupted);
    return true;
}

/// Iteration `i` of either loop, the input already written: run, record,
/// keep the first console.len bytes of output, reset. True when the whole
/// loop must stop (interrupt() or a signal); error.Closed when the VM is closing.
fn runOne(vm: *Vm, r: *LoopResult, timeout_ns: u64, mode: Mode, console: []u8, i: usize) errors.Error!bool {
    r.* = std.mem.zeroes(LoopResult);
    if (vm.runStep(timeout_ns)) |o| {
        r.reason = @intFromEnum(o.reason);
        r.exit_code = o.exit_code;
        r.checkpoint_tag = o.checkpoint_tag;
        r.run_ns = o.elapsed_ns;
    } else |e| switch (e) {
        error.GuestCrash => r.crashed = 1,
        else => return e,
    }
    r.console_bytes = vm.console_len + vm.console_dropped;
    if (console.len > 0) _ = vm.consoleTake(console);
    var t: Times = .{};
    try reset(vm, mode, &t);
    r.reset_ns = t.total_ns;
    r.dirty_pages = t.dirty_pages;
    if (vm.closing.load(.seq_cst)) return errors.fail(error.Closed, "the VM was closed during reset_loop (after {d} inputs)", .{i + 1});
    return r.reason == @intFromEnum(vm_mod.Reason.interrupted) or vm.stopRequested();
}
