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
//! Why the heap is grown first: glibc grows the malloc arena of a thread
//! (all but the main one) with an mprotect per page its allocations need,
//! and an mprotect calls the MMU notifier of every VM of the process; at
//! 1,000 VMs a machine's allocations (its shell and machine records) cost
//! 130-170 us that way, and mmaps waited on the lock it held. So the same
//! workers run both phases, and each first grows its arena by what the
//! machines it may make will take and frees it (glibc keeps the range
//! read-write: phase 2 then allocates without a system call).
//!
//! Stopping: the caller sets `stop` (another thread: Ctrl-C, close); every
//! step checks it, and then, as on any failure, everything made is destroyed
//! (in parallel: each destroy waits ~11 ms in the kernel on kvm_pvm) and
//! nothing is returned.
const std = @import("std");
const errors = @import("errors.zig");
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
    /// Between the phases (guarded by `lock`): the workers of the call (0
    /// until all are started), how many are done with phase 1, and when the
    /// last one was (phase 2 begins then).
    workers: u32 = 0,
    arrived: u32 = 0,
    phase2: std.c.pthread_cond_t = .{},
    phase2_ns: u64 = 0,
    /// What each worker grows its heap by before phase 1 (warmHeap).
    warm_bytes: usize = 0,
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

/// Heap bytes a machine takes (its shell and machine records, malloc's
/// headers; a resettable one also reset.Resettable.init's two dirty bitmaps).
fn machineHeapBytes(memory_bytes: u64, resettable: bool) usize {
    const records = @sizeOf(shell.Vm) + @sizeOf(Machine) + 64;
    return records + if (resettable) 2 * shell.Vm.dirtyWordsFor(memory_bytes) * @sizeOf(u64) else 0;
}
/// warmHeap allocates blocks below glibc's mmap threshold (128 KiB), so that
/// they come from the thread's arena, and at most max_warm_bytes in all (a
/// thread's arena is 64 MiB; a worker past its warmed share just pays the
/// mprotects again).
const warm_block_bytes = 32 << 10;
const max_warm_bytes = 32 << 20;

/// Grows this thread's malloc arena by `bytes` and frees them again (see
/// the top comment). Before any VM exists its mprotects cost microseconds.
fn warmHeap(bytes: usize) void {
    const Block = struct { previous: ?*anyopaque };
    var last: ?*anyopaque = null;
    var made: usize = 0;
    while (made < @min(bytes, max_warm_bytes)) : (made += warm_block_bytes) {
        const b: *Block = @ptrCast(@alignCast(std.c.malloc(warm_block_bytes) orelse break));
        b.previous = last;
        last = b;
    }
    while (last) |p| {
        last = @as(*Block, @ptrCast(@alignCast(p))).previous;
        std.c.free(p);
    }
}

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

/// Waits until every worker is done with phase 1; the last one to be resets
/// the index and notes the time, and phase 2 begins.
fn betweenPhases(j: *Job) void {
    _ = std.c.pthread_mutex_lock(&j.lock);
    defer _ = std.c.pthread_mutex_unlock(&j.lock);
    j.arrived += 1;
    std.debug.assert(j.workers == 0 or j.arrived <= j.workers);
    if (j.arrived == j.workers) {
        j.next.store(0, .release);
        j.phase2_ns = shell.monotonicNs();
        _ = std.c.pthread_cond_broadcast(&j.phase2);
        return;
    }
    while (j.workers == 0 or j.arrived < j.workers) _ = std.c.pthread_cond_wait(&j.phase2, &j.lock);
}

/// What each worker of a fork does: its heap, phase 1, wait, phase 2.
fn Phases(comptime first: fn (*Job) void, comptime second: fn (*Job) void) type {
    return struct {
        fn run(j: *Job) void {
            warmHeap(j.warm_bytes);
            first(j);
            betweenPhases(j);
            second(j);
        }
    };
}

/// Runs `run` on `threads` threads (this one included; fewer when fewer
/// start) and returns when all are done; `j.workers` says how many ran it.
fn runOn(j: *Job, threads: u32, run: *const fn (*Job) void) void {
    var pool: [max_threads]?std.Thread = @splat(null);
    const extra = @min(threads, max_threads, @as(u32, @intCast(j.out.len))) - 1;
    var started: u32 = 1;
    for (pool[0..extra]) |*t| {
        t.* = std.Thread.spawn(.{ .stack_size = thread_stack_bytes, .allocator = allocator }, worker, .{ j, run }) catch null;
        started += @intFromBool(t.* != null);
    }
    _ = std.c.pthread_mutex_lock(&j.lock);
    j.workers = started; // before this thread's own arrival: phase 2 cannot begin without it
    _ = std.c.pthread_mutex_unlock(&j.lock);
    run(j); // at least this thread, even when no thread could start
    for (pool[0..extra]) |t| if (t) |th| th.join();
}

/// Runs one `phase` (every index from 0) on `threads` threads.
fn runPhase(j: *Job, threads: u32, phase: *const fn (*Job) void) void {
    j.next.store(0, .release);
    runOn(j, threads, phase);
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
    // Any worker may make every machine; more than twice its share is unlikely.
    const share = @min(out.len, 2 * ((out.len + opts.threads - 1) / opts.threads));
    j.warm_bytes = share * machineHeapBytes(snap.parsed.memory_bytes, opts.resettable);
    const t0 = shell.monotonicNs();
    runOn(&j, opts.threads, &Phases(makeFds, makeMachines).run);
    times.* = .{ .vm_fds_ns = j.phase2_ns - t0, .machines_ns = shell.monotonicNs() - j.phase2_ns };
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

test "fork: every worker ends phase 1 before any begins phase 2; each index is claimed once in each" {
    var stop: u32 = 0;
    var done: u64 = 0;
    var out: [500]?*Machine = @splat(null);
    var fds: [500]kvm.VmFd = @splat(.{ .fd = -1 });
    var j: Job = .{ .snap = undefined, .opts = .{ .threads = 4, .stop = &stop, .done = &done }, .src = .{ .reuse = .{} }, .fds = &fds, .out = &out, .warm_bytes = 100 << 10 };
    const Check = struct {
        var first_done = std.atomic.Value(usize).init(0);
        var early = std.atomic.Value(bool).init(false);
        fn first(job: *Job) void {
            while (job.claim()) |i| {
                std.Thread.yield() catch {};
                job.fds[i].fd += 1; // -1 -> 0
                _ = first_done.fetchAdd(1, .acq_rel);
            }
        }
        fn second(job: *Job) void {
            while (job.claim()) |i| {
                if (first_done.load(.acquire) != job.out.len) early.store(true, .release);
                job.fds[i].fd += 1; // 0 -> 1
            }
        }
    };
    runOn(&j, 4, &Phases(Check.first, Check.second).run);
    for (fds) |fd| try std.testing.expectEqual(@as(i32, 1), fd.fd);
    try std.testing.expect(!Check.early.load(.acquire));
    try std.testing.expectEqual(j.workers, j.arrived);
    try std.testing.expect(j.phase2_ns > 0);
}
