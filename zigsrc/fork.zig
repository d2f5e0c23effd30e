//! Fork density (fork_many, issue 14 item 6): `n` machines restored from one
//! file-backed snapshot with the map strategy, on a few native threads, in
//! one call.
//!
//! Why VM fds first: KVM_CREATE_VM registers an MMU notifier, which takes the
//! lock of every mapping of the process (mm_take_all_locks, under the mmap
//! write lock), so its cost grows with the process's mappings (measured on
//! kvm_pvm: ~0.13 ms in a Python process, ~3 ms with 8,000 mappings more),
//! and every VM made adds two (guest memory, kvm_run). Made one after the
//! other, VM k pays for the k before it. So phase 1 creates all n VM fds
//! while the process is small; phase 2 gives each its memory, slot,
//! irqchip, vCPUs and state. Guest memory is the snapshot's file mapped
//! privately from the start (shell.Options.file): replacing an anonymous
//! mapping afterwards would call the MMU notifier of every VM in the process
//! (again a cost that grows with n). A shell gets no PIT unless the snapshot
//! used one, and no dirty log unless the VMs are to be resettable.
//!
//! Stopping: the caller sets `stop` (another thread: Ctrl-C, close); every
//! step checks it, and then, as on any failure, everything made is destroyed
//! (in parallel: each destroy waits ~11 ms in the kernel on kvm_pvm) and
//! nothing is returned.
const std = @import("std");
const errors = @import("errors.zig");
const fault = @import("fault.zig");
const host = @import("host.zig");
const kvm = @import("kvm.zig");
const shell = @import("shell.zig");
const snapshot = @import("snapshot.zig");
const restore = @import("restore.zig");
const machine = @import("machine.zig");

const allocator = std.heap.c_allocator;
pub const Machine = machine.Machine;

pub const max_vms: u32 = 100_000;
pub const max_threads: u32 = 64;
/// Destroying is a wait in the kernel, not CPU: more threads overlap more.
const destroy_threads: u32 = 32;
/// Workers only make KVM objects: the pool's threads' small stacks.
const thread_stack_bytes = @import("pool.zig").thread_stack_bytes;

pub const Options = struct {
    /// Worker threads (1 .. max_threads); the caller's thread is one of them.
    threads: u32,
    /// Every machine gets a dirty log and is resettable to the snapshot.
    resettable: bool = false,
    /// Nonzero (set by another thread) stops the call: nothing is kept.
    stop: *const u32,
    /// Machines ready so far (progress), written by the workers.
    done: *u64,
};

/// Where a call's time went (wall time of each phase, nanoseconds).
pub const Times = struct { vm_fds_ns: u64 = 0, machines_ns: u64 = 0 };

/// What the workers share: the snapshot, the outputs, the next index of the
/// phase running, and the first failure (its id and message: the workers'
/// are thread-local).
const Job = struct {
    snap: *snapshot.Snapshot,
    opts: Options,
    src: restore.MemorySource,
    fds: []kvm.VmFd,
    out: []?*Machine,
    next: std.atomic.Value(usize) = .init(0),
    failed: std.atomic.Value(bool) = .init(false),
    lock: std.c.pthread_mutex_t = .{},
    fail_error: errors.Error = error.OutOfMemory,
    fail_check: errors.Check = .none,
    fail_message: [errors.message_capacity]u8 = undefined,
    fail_len: usize = 0,

    fn stopped(j: *Job) bool {
        return j.failed.load(.acquire) or @atomicLoad(u32, j.opts.stop, .acquire) != 0;
    }

    /// Keeps the first failure's id and message (this thread's).
    fn noteFailure(j: *Job, e: errors.Error) void {
        _ = std.c.pthread_mutex_lock(&j.lock);
        defer _ = std.c.pthread_mutex_unlock(&j.lock);
        if (j.failed.load(.acquire)) return;
        j.fail_error = e;
        j.fail_check = errors.lastCheck();
        const m = std.mem.span(errors.message());
        j.fail_len = @min(m.len, j.fail_message.len);
        @memcpy(j.fail_message[0..j.fail_len], m[0..j.fail_len]);
        j.failed.store(true, .release);
    }

    /// The next index of this phase, or null when done or stopped.
    fn claim(j: *Job) ?usize {
        if (j.stopped()) return null;
        const i = j.next.fetchAdd(1, .acq_rel);
        return if (i < j.out.len) i else null;
    }
};

/// Phase 1: one VM fd per machine (KVM_CREATE_VM, its TSS address).
fn makeFds(j: *Job) void {
    const h = host.get() catch |e| return j.noteFailure(e);
    while (j.claim()) |i| {
        j.fds[i] = shell.Vm.createVmFd(h) catch |e| return j.noteFailure(e);
    }
}

/// Phase 2: each machine's memory (the file), slot, irqchip, vCPUs, state.
fn makeMachines(j: *Job) void {
    while (j.claim()) |i| {
        j.out[i] = makeOne(j, i) catch |e| return j.noteFailure(e);
        _ = @atomicRmw(u64, j.opts.done, .Add, 1, .release);
    }
}

fn makeOne(j: *Job, i: usize) errors.Error!*Machine {
    const fd = j.fds[i];
    j.fds[i] = .{ .fd = -1 }; // the shell owns it now (and closes it on failure)
    const m = try Machine.createWith(j.snap.parsed.memory_bytes, j.snap.parsed.vcpus, .{
        .dirty_log = j.opts.resettable,
        .pit = false,
        .vm_fd = fd,
        .file = .{ .fd = j.snap.fd, .offset = j.snap.memory_offset },
    });
    errdefer m.destroy();
    var times: restore.Times = .{};
    try m.restoreFrom(&j.snap.parsed, j.src, &times);
    if (j.opts.resettable) try m.enableReset(j.snap);
    return m;
}

/// After a failure or a stop: every machine and fd made goes.
fn destroyMade(j: *Job) void {
    while (true) {
        const i = j.next.fetchAdd(1, .acq_rel);
        if (i >= j.out.len) return;
        if (j.out[i]) |m| m.destroy();
        j.out[i] = null;
        if (j.fds[i].fd >= 0) _ = std.os.linux.close(j.fds[i].fd);
        j.fds[i] = .{ .fd = -1 };
    }
}

fn worker(j: *Job, phase: *const fn (*Job) void) void {
    _ = shell.ForeignSignals.block(); // a Ctrl-C is the caller's (it sets stop)
    phase(j);
}

/// Runs `phase` on `threads` threads (this one included) until it is done.
fn runPhase(j: *Job, threads: u32, phase: *const fn (*Job) void) void {
    j.next.store(0, .release);
    var pool: [destroy_threads]?std.Thread = @splat(null);
    const extra = @min(threads, destroy_threads, @as(u32, @intCast(j.out.len))) - 1;
    for (pool[0..extra]) |*t| t.* = std.Thread.spawn(.{ .stack_size = thread_stack_bytes, .allocator = allocator }, worker, .{ j, phase }) catch null;
    phase(j); // at least this thread, even when no thread could start
    for (pool[0..extra]) |t| if (t) |th| th.join();
}

/// Restores `out.len` machines of `snap` (file-backed; the map strategy).
/// All or nothing: on a failure or a stop every machine made is destroyed,
/// `out` is all null, and the failure is returned (a stop returns false).
pub fn forkMany(snap: *snapshot.Snapshot, opts: Options, out: []?*Machine, times: *Times) errors.Error!bool {
    std.debug.assert(out.len >= 1 and out.len <= max_vms);
    std.debug.assert(opts.threads >= 1 and opts.threads <= max_threads);
    @memset(out, null);
    const signals = shell.ForeignSignals.block(); // a Ctrl-C is the caller's (it sets stop)
    defer signals.unblock();
    if (!snap.fileBacked()) return errors.fail(.strategy_needs_file, "fork_many needs a file-backed snapshot: snap.save(path) then Snapshot.load(path)", .{});
    const fds = allocator.alloc(kvm.VmFd, out.len) catch return error.OutOfMemory;
    defer allocator.free(fds);
    @memset(fds, .{ .fd = -1 });
    var j: Job = .{ .snap = snap, .opts = opts, .src = try restore.MemorySource.forSnapshot(snap, .map), .fds = fds, .out = out };
    const t0 = shell.monotonicNs();
    runPhase(&j, opts.threads, makeFds);
    const t1 = shell.monotonicNs();
    if (!j.stopped()) runPhase(&j, opts.threads, makeMachines);
    times.* = .{ .vm_fds_ns = t1 - t0, .machines_ns = shell.monotonicNs() - t1 };
    if (!j.stopped()) return true;
    runPhase(&j, destroy_threads, destroyMade);
    @atomicStore(u64, opts.done, 0, .release);
    if (!j.failed.load(.acquire)) return false;
    // The first failure, with its worker's id and message (they are per thread).
    if (j.fail_check == .none or errors.errorOf(j.fail_check) != j.fail_error) return j.fail_error;
    return errors.fail(j.fail_check, "{s}", .{j.fail_message[0..j.fail_len]});
}

test "fork: claim hands each index out once over threads, and none after a stop or a failure" {
    var stop: u32 = 0;
    var done: u64 = 0;
    var out: [1000]?*Machine = @splat(null);
    var fds: [1000]kvm.VmFd = @splat(.{ .fd = -1 });
    var j: Job = .{ .snap = undefined, .opts = .{ .threads = 4, .stop = &stop, .done = &done }, .src = .{ .reuse = .{} }, .fds = &fds, .out = &out };
    const Count = struct {
        fn phase(job: *Job) void {
            while (job.claim()) |i| job.fds[i].fd += 1; // -1 -> 0: claimed exactly once
        }
    };
    runPhase(&j, 4, Count.phase);
    for (fds) |fd| try std.testing.expectEqual(@as(i32, 0), fd.fd);
    j.next.store(0, .release);
    @atomicStore(u32, &stop, 1, .release);
    try std.testing.expectEqual(@as(?usize, null), j.claim());
    @atomicStore(u32, &stop, 0, .release);
    j.noteFailure(errors.fail(.fork_count, "first", .{}));
    j.noteFailure(errors.fail(.fork_threads, "second", .{}));
    try std.testing.expectEqual(errors.Check.fork_count, j.fail_check);
    try std.testing.expectEqualStrings("first", j.fail_message[0..j.fail_len]);
    try std.testing.expectEqual(@as(?usize, null), j.claim());
}
