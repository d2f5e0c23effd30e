//! The reset layer: puts a restored VM back to exactly the snapshot it came
//! from by restoring only what changed. Guest writes come from KVM's dirty
//! log (a resettable VM's slot has KVM_MEM_LOG_DIRTY_PAGES), host writes
//! from this layer's own bitmap (`Resettable.host_dirty`); vCPU and device
//! state are restored whole (state.apply).
//!
//! Memory modes: `copy` writes each dirty page back from the snapshot (the
//! page stays mapped; a hot page (makeHot) stays writable too, any other
//! costs the next guest write to it one write-protect fault);
//! `drop` (map-restored VMs only) discards the private copies with
//! MADV_DONTNEED so the file's pages show through again (the next guest
//! access costs a fault that maps the page). `auto` picks copy.
const std = @import("std");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const shell = @import("shell.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const safe = @import("safe.zig");


pub const Mode = enum(c_int) { auto = 0, copy = 1, drop = 2 };

/// The phases of one reset; also the C ABI's kvmlab_reset_times (one record).
pub const Times = extern struct {
    dirty_pages: u64 = 0,
    log_ns: u64 = 0,
    memory_ns: u64 = 0,
    vcpu_ns: u64 = 0,
    devices_ns: u64 = 0,
    total_ns: u64 = 0,
};

/// What reset owns on a machine: the snapshot it resets to (retained) and
/// the pages the host wrote through write_memory (KVM's dirty log sees only
/// guest writes).
pub const Resettable = struct {
    snap: *snapshot.Snapshot,
    host_dirty: []u64,
    /// Hot pages (keepHot): left writable, put back at every reset.
    pinned: []u64,
    pinned_count: u32 = 0,
    /// 0: nothing is pinned (every dirty page is re-protected, as without
    /// manual protect).
    pin_limit: u32 = 0,

    /// The dirty log is read once here so that only writes after this count.
    pub fn init(vm: *shell.Vm, s: *snapshot.Snapshot) errors.Error!Resettable {
        if (s.parsed.memory_bytes != vm.mem.len or s.parsed.vcpus != vm.vcpu_count)
            return errors.fail(.shape, "the snapshot does not match this VM's shape", .{});
        try vm.enableDirtyLog(); // a shell made without it (fork_many's)
        const host_dirty = std.heap.c_allocator.alloc(u64, 2 * vm.dirtyWords()) catch return error.OutOfMemory;
        @memset(host_dirty, 0);
        return .{ .snap = s.retain(), .host_dirty = host_dirty[0..vm.dirtyWords()], .pinned = host_dirty[vm.dirtyWords()..] };
    }

    pub fn deinit(r: *Resettable) void {
        std.heap.c_allocator.free(r.host_dirty.ptr[0 .. 2 * r.host_dirty.len]);
        r.snap.release();
    }

    /// Records a host write of `len` bytes at `gpa`.
    pub fn noteHostWrite(r: *Resettable, gpa: u64, len: u64) void {
        if (len == 0) return;
        var page = gpa / boot.page_bytes;
        const last = (gpa + len - 1) / boot.page_bytes;
        while (page <= last) : (page += 1) r.host_dirty[@intCast(page / 64)] |= @as(u64, 1) << @intCast(page % 64);
    }
};

/// Walks the pages set in `log` or `host`, in page order, clearing `host`
/// as it goes (the dirty log is cleared by reading it).
pub const DirtyPages = struct {
    log: []const u64,
    host: []u64,
    word: usize = 0,
    bits: u64 = 0,
    started: bool = false,

    pub fn next(d: *DirtyPages) ?u64 {
        if (!d.started) {
            d.started = true;
            if (d.log.len > 0) d.load();
        }
        while (d.bits == 0) {
            d.word += 1;
            if (d.word >= d.log.len) return null;
            d.load();
        }
        const b: u6 = @intCast(@ctz(d.bits));
        d.bits &= d.bits - 1;
        return d.word * 64 + b;
    }

    fn load(d: *DirtyPages) void {
        d.bits = d.log[d.word] | d.host[d.word];
        d.host[d.word] = 0;
    }
};

/// Contiguous dirty pages go to one dropPages call.
const DropRuns = struct {
    vm: *shell.Vm,
    start: u64 = 0,
    len: u64 = 0,

    fn add(r: *DropRuns, page: u64) void {
        if (r.len > 0 and r.start + r.len == page) {
            r.len += 1;
            return;
        }
        r.flush();
        r.start = page;
        r.len = 1;
    }
    fn flush(r: *DropRuns) void {
        r.vm.dropPages(r.start, r.len);
        r.len = 0;
    }
};

/// Puts every dirty page back (copy from the snapshot, or drop). Returns how
/// many. The bare memory operation of a reset (the floor calls it too).
fn putBack(vm: *shell.Vm, r: *Resettable, log: []const u64, use_drop: bool) errors.Error!u64 {
    const s = r.snap;
    const golden_map = s.parsed.pageMap();
    var drops = DropRuns{ .vm = vm };
    // copy from a file-backed snapshot: SIGBUS-safe reads (memcpy under
    // kvmlab's SIGBUS handler, else batched process_vm_readv).
    var batch: safe.Batch = .{};
    const guard = s.memoryGuard();
    const from_file = if (guard) |g| !g.fast else false;
    var dirty: u64 = 0;
    var pages = DirtyPages{ .log = log, .host = r.host_dirty };
    while (pages.next()) |page| : (dirty += 1) {
        const off: usize = @intCast(page * boot.page_bytes);
        const dst = vm.mem[off..][0..boot.page_bytes];
        if (use_drop) {
            drops.add(page);
        } else if (snapshot.isPresent(golden_map, page)) {
            if (from_file) try batch.add(dst, s.memory[off..][0..boot.page_bytes]) else @memcpy(dst, s.memory[off..][0..boot.page_bytes]);
        } else {
            @memset(dst, 0);
        }
    }
    drops.flush();
    try batch.flush();
    try safe.finish(guard);
    return dirty;
}

/// `mapped_from`: the snapshot whose file the VM's memory maps (a `map`
/// restore), if any.
pub fn reset(vm: *shell.Vm, r: *Resettable, mapped_from: ?*const snapshot.Snapshot, mode: Mode, times: *Times) errors.Error!void {
    try r.snap.checkIntact(); // its file may have been rewritten since the last reset
    if (vm.running.swap(true, .acq_rel)) return errors.fail(.vm_running, "cannot reset a running VM", .{});
    defer vm.running.store(false, .release);
    const use_drop = switch (mode) {
        // Dropping private pages shows the mapped file's: only right when that
        // file is the snapshot this VM resets to.
        .drop => if (mapped_from == r.snap) true else return errors.fail(.drop_needs_map, "reset mode 'drop' needs a VM restored with strategy 'map' from the snapshot it resets to", .{}),
        .copy, .auto => false,
    };
    try floor(vm, r, use_drop, times);
}

/// The bare operations of a reset (read and clear the dirty log, put the
/// dirty pages back, state.apply), timed per phase; `reset` is this after
/// its checks, and the benchmark floor is this alone.
pub fn floor(vm: *shell.Vm, r: *Resettable, use_drop: bool, times: *Times) errors.Error!void {
    const t0 = shell.monotonicNs();
    var stack_buf: [2048]u64 = undefined; // 512 MiB of guest memory
    const n = vm.dirtyWords();
    const bitmap = if (n <= stack_buf.len) stack_buf[0..n] else (std.heap.c_allocator.alloc(u64, n) catch return error.OutOfMemory);
    defer if (n > stack_buf.len) std.heap.c_allocator.free(bitmap);
    try vm.readDirtyLog(bitmap);
    const t1 = shell.monotonicNs();
    const dirty = try putBack(vm, r, bitmap, use_drop);
    if (vm.manual_protect) try reprotect(vm, r, bitmap);
    const t2 = shell.monotonicNs();
    var st: state.RestoreTimes = .{};
    try state.apply(vm, &r.snap.parsed, &st); // the VM ran (booted): every record is set
    const t3 = shell.monotonicNs();
    times.* = .{ .dirty_pages = dirty, .log_ns = t1 - t0, .memory_ns = t2 - t1, .vcpu_ns = st.vcpu_ns, .devices_ns = st.devices_ns, .total_ns = t3 - t0 };
}

/// Pages a hot reset keeps writable at most (256 KiB copied per reset).
pub const max_pinned_pages: u32 = 64;

/// Makes later resets of `vm` hot (every resettable machine's: enableReset):
/// the pages the guest dirtied are left writable, up to max_pinned_pages,
/// and put back at every reset, so the next run does not pay a write-protect
/// fault per page it writes again. On kvm_pvm each such fault measured
/// ~11 us: the first answer after a reset cost ~25 us more than a warm one,
/// and the run after a reset of 16 dirty pages 290 us instead of 95 (kvmlab
/// bench reset, "next run"). Needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
/// without it resets stay as they are.
pub fn makeHot(vm: *shell.Vm, r: *Resettable) void {
    vm.enableManualProtect() catch return;
    r.pin_limit = max_pinned_pages;
}

/// With manual protect, after the put-back: pages dirty now join the pinned
/// set (up to pin_limit); every other dirty page is re-protected. A pinned
/// page is never cleared in KVM's log, so every reset sees it dirty and
/// puts it back: the reset stays exact.
fn reprotect(vm: *shell.Vm, r: *Resettable, log: []u64) errors.Error!void {
    pinHot(r, log);
    try vm.clearDirtyLog(log);
}

/// Adds the dirty pages of `log` to the pinned set while it has room, then
/// takes every pinned page out of `log` (what is left gets re-protected).
fn pinHot(r: *Resettable, log: []u64) void {
    for (log, r.pinned) |*word, *pin| {
        var fresh = word.* & ~pin.*;
        while (fresh != 0 and r.pinned_count < r.pin_limit) : (fresh &= fresh - 1) {
            pin.* |= fresh & (~fresh +% 1);
            r.pinned_count += 1;
        }
        word.* &= ~pin.*;
    }
}

pub const LoopResult = extern struct {
    reason: shell.Reason,
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
pub fn loop(vm: *shell.Vm, r: *Resettable, mapped_from: ?*const snapshot.Snapshot, inputs: []const u8, input_bytes: usize, input_gpa: u64, timeout_ns: u64, mode: Mode, out: []LoopResult) errors.Error!usize {
    if (input_bytes == 0 or inputs.len % input_bytes != 0 or inputs.len / input_bytes != out.len)
        return errors.fail(.loop_inputs, "inputs ({d} bytes) must be {d} inputs of {d} bytes", .{ inputs.len, out.len, input_bytes });
    _ = try vm.guestSlice(input_gpa, input_bytes);
    const step = Step{ .vm = vm, .r = r, .mapped_from = mapped_from, .timeout_ns = timeout_ns, .mode = mode, .input_gpa = input_gpa };
    const Fixed = struct {
        data: []const u8,
        bytes: usize,
        fn inputAt(f: @This(), i: usize) []const u8 {
            return f.data[i * f.bytes ..][0..f.bytes];
        }
        fn consoleAt(_: @This(), _: usize) []u8 {
            return &.{};
        }
    };
    return step.drive(out, Fixed{ .data = inputs, .bytes = input_bytes }, false);
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
pub fn loopVar(vm: *shell.Vm, r: *Resettable, mapped_from: ?*const snapshot.Snapshot, inputs: []const u8, offsets: []const u64, input_gpa: u64, timeout_ns: u64, mode: Mode, out: []LoopResult, console: []u8, console_stride: usize) errors.Error!usize {
    if (offsets.len != out.len + 1 or offsets[out.len] != inputs.len)
        return errors.fail(.loop_offsets, "offsets must be {d} entries up to the inputs' {d} bytes", .{ out.len + 1, inputs.len });
    if (console.len != out.len * console_stride) return errors.fail(.loop_console, "console must be count * console_stride bytes", .{});
    var longest: u64 = 0;
    for (offsets[0..out.len], offsets[1..]) |a, b| {
        if (b < a) return errors.fail(.loop_offsets, "offsets must not decrease", .{});
        longest = @max(longest, b - a);
    }
    if (longest > max_var_input_bytes) return errors.fail(.input_size, "an input is {d} bytes; at most {d}", .{ longest, max_var_input_bytes });
    _ = try vm.guestSlice(input_gpa, 4 + longest);
    const step = Step{ .vm = vm, .r = r, .mapped_from = mapped_from, .timeout_ns = timeout_ns, .mode = mode, .input_gpa = input_gpa };
    const Var = struct {
        data: []const u8,
        offsets: []const u64,
        out_console: []u8,
        stride: usize,
        fn inputAt(v: @This(), i: usize) []const u8 {
            return v.data[@intCast(v.offsets[i])..@intCast(v.offsets[i + 1])];
        }
        fn consoleAt(v: @This(), i: usize) []u8 {
            return v.out_console[i * v.stride ..][0..v.stride];
        }
    };
    return step.drive(out, Var{ .data = inputs, .offsets = offsets, .out_console = console, .stride = console_stride }, true);
}

/// A signal (Ctrl-C) came while the loop was outside KVM_RUN, e.g. during
/// a reset (it waits blocked, see shell.ForeignSignals): input i is not run
/// and its result says `interrupted`, as when the signal stops a run.
fn stoppedBySignal(res: *LoopResult) bool {
    if (!shell.ForeignSignals.pending()) return false;
    res.* = std.mem.zeroes(LoopResult);
    res.reason = .interrupted;
    return true;
}

/// What every iteration of either loop needs.
const Step = struct {
    vm: *shell.Vm,
    r: *Resettable,
    mapped_from: ?*const snapshot.Snapshot,
    timeout_ns: u64,
    mode: Mode,
    input_gpa: u64,

    /// Both loops: `inputs.input(i)` written at input_gpa (after its u32 LE
    /// length when `length_prefix`), run, recorded, reset. One operation: an
    /// interrupt() or close() during any run or reset ends the whole loop,
    /// not just the current input's run; foreign signals wait blocked outside
    /// KVM_RUN for the whole loop. Returns how many inputs were done.
    fn drive(s: Step, out: []LoopResult, inputs: anytype, comptime length_prefix: bool) errors.Error!usize {
        s.vm.beginOperation();
        const signals = shell.ForeignSignals.block();
        defer signals.unblock();
        const prefix: usize = if (length_prefix) 4 else 0;
        for (out, 0..) |*res, i| {
            if (stoppedBySignal(res)) return i + 1;
            const input = inputs.inputAt(i);
            const dst = try s.vm.guestSlice(s.input_gpa, prefix + input.len);
            if (length_prefix) std.mem.writeInt(u32, dst[0..4], @intCast(input.len), .little);
            @memcpy(dst[prefix..], input);
            s.r.noteHostWrite(s.input_gpa, prefix + input.len);
            if (try s.runOne(res, inputs.consoleAt(i), i)) return i + 1;
        }
        return out.len;
    }

    /// Iteration `i`, the input already written: run, record, keep the first
    /// console.len bytes of output, reset. True when the whole loop must stop
    /// (interrupt() or a signal); error.Closed when the VM is closing.
    fn runOne(s: Step, res: *LoopResult, console: []u8, i: usize) errors.Error!bool {
        const vm = s.vm;
        res.* = std.mem.zeroes(LoopResult);
        if (vm.runStep(s.timeout_ns)) |o| {
            res.reason = o.reason;
            res.exit_code = o.exit_code;
            res.checkpoint_tag = o.checkpoint_tag;
            res.run_ns = o.elapsed_ns;
        } else |e| switch (e) {
            error.GuestCrash => res.crashed = 1,
            else => return e,
        }
        res.console_bytes = vm.console_len + vm.console_dropped;
        if (console.len > 0) _ = vm.consoleTake(console);
        var t: Times = .{};
        try reset(vm, s.r, s.mapped_from, s.mode, &t);
        res.reset_ns = t.total_ns;
        res.dirty_pages = t.dirty_pages;
        if (vm.closing.load(.seq_cst)) return errors.fail(.vm_closed, "the VM was closed during reset_loop (after {d} inputs)", .{i + 1});
        return res.reason == .interrupted or vm.stopRequested();
    }
};

test "reset: the dirty walk visits log and host pages in order and clears host bits" {
    const log = [_]u64{ 0b1001, 0, 1 << 63 };
    var host = [_]u64{ 0b0110, 1 << 5, 0 };
    var d = DirtyPages{ .log = &log, .host = &host };
    const want = [_]u64{ 0, 1, 2, 3, 64 + 5, 128 + 63 };
    for (want) |w| try std.testing.expectEqual(@as(?u64, w), d.next());
    try std.testing.expectEqual(@as(?u64, null), d.next());
    try std.testing.expectEqualSlices(u64, &.{ 0, 0, 0 }, &host);
}

test "reset: an empty or clean bitmap yields no pages" {
    var none: [0]u64 = .{};
    var d0 = DirtyPages{ .log = &none, .host = &none };
    try std.testing.expectEqual(@as(?u64, null), d0.next());
    const log = [_]u64{ 0, 0 };
    var host = [_]u64{ 0, 0 };
    var d1 = DirtyPages{ .log = &log, .host = &host };
    try std.testing.expectEqual(@as(?u64, null), d1.next());
}

test "reset: host writes mark every page they touch" {
    var words = [_]u64{ 0, 0 };
    var r = Resettable{ .snap = undefined, .host_dirty = &words, .pinned = &.{} };
    r.noteHostWrite(4095, 2); // pages 0 and 1
    r.noteHostWrite(64 * 4096, 1); // page 64
    r.noteHostWrite(100, 0); // nothing
    try std.testing.expectEqual(@as(u64, 0b11), words[0]);
    try std.testing.expectEqual(@as(u64, 1), words[1]);
}

test "reset: hot pages are pinned up to the limit and never re-protected" {
    var pinned = [_]u64{ 0, 0 };
    var r = Resettable{ .snap = undefined, .host_dirty = &.{}, .pinned = &pinned, .pin_limit = 3 };
    var log = [_]u64{ 0b1011, 1 << 63 };
    pinHot(&r, &log);
    // Pages 0, 1, 3 fill the limit; page 127 is re-protected.
    try std.testing.expectEqual([_]u64{ 0b1011, 0 }, pinned);
    try std.testing.expectEqual([_]u64{ 0, 1 << 63 }, log);
    log = .{ 0b1111, 0 };
    pinHot(&r, &log); // still dirty pinned pages stay out of the clear; page 2 has no room
    try std.testing.expectEqual([_]u64{ 0b0100, 0 }, log);
    try std.testing.expectEqual(@as(u32, 3), r.pinned_count);
}
