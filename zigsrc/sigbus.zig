//! Last line of defence against SIGBUS from mapped snapshot files. kvmlab's
//! own reads of such mappings already go through process_vm_readv (safe.zig),
//! but Python code may read `snap.memory` (a zero-copy view) and a guest may
//! point a console write at any of its pages. If the file was truncated
//! meanwhile, that read faults. This handler, installed once, checks whether
//! the faulting address lies in a registered kvmlab mapping; if so it maps a
//! zero page over the page, marks the owner damaged (later kvmlab calls on it
//! raise SnapshotError) and lets the read continue. Any other SIGBUS goes to
//! the previous handler (or the default action).
const std = @import("std");
const linux = std.os.linux;

const errors = @import("errors.zig");
const signals = @import("signals.zig");

/// The table of registered ranges grows in chunks of `chunk_slots`, each
/// allocated once (page allocator, zeroed), published with an atomic store
/// and never freed, so the handler can walk it without a lock while another
/// thread registers. Up to `max_chunks` chunks: ~4 million mappings, far past
/// any process's map count limit (vm.max_map_count is 65,530 by default).
const chunk_slots = 4096;
const max_chunks = 1024;

const Chunk = struct {
    /// 0: free; 1: being claimed; else the range's start.
    starts: [chunk_slots]std.atomic.Value(usize),
    lens: [chunk_slots]usize,
    flags: [chunk_slots]?*std.atomic.Value(bool),
};

var chunks: [max_chunks]std.atomic.Value(?*Chunk) = @splat(.init(null));
/// Chunks published so far (only grows).
var chunk_count = std.atomic.Value(usize).init(0);
/// Serialises growing (never taken by the handler).
var grow_mutex: std.c.pthread_mutex_t = .{};
/// Where the next register() starts looking (keeps registering O(1) on average).
var hint = std.atomic.Value(usize).init(0);
var installed = std.atomic.Value(bool).init(false);
var previous: linux.Sigaction = undefined;

/// Registers [start, start+len) as a kvmlab file mapping; returns the slot
/// (for unregister), or null when no slot can be had (the table is at its
/// ~4M cap, or a new chunk cannot be allocated): callers then refuse the
/// mapping (`unprotected()`), since a lost page of it would kill the process.
pub fn register(start: usize, len: usize, damaged: *std.atomic.Value(bool)) ?usize {
    std.debug.assert(start > 1 and len > 0);
    install();
    while (true) {
        const total = chunk_count.load(.acquire) * chunk_slots;
        if (total > 0) {
            const first = hint.load(.monotonic) % total;
            for (0..total) |k| {
                const i = (first + k) % total;
                const c = chunks[i / chunk_slots].load(.acquire).?;
                const s = &c.starts[i % chunk_slots];
                if (s.load(.acquire) != 0) continue;
                // Claim with a sentinel first so the handler never sees a half-set slot.
                if (s.cmpxchgStrong(0, 1, .acq_rel, .acquire) != null) continue;
                c.lens[i % chunk_slots] = len;
                c.flags[i % chunk_slots] = damaged;
                s.store(start, .release);
                hint.store(i + 1, .monotonic);
                return i;
            }
        }
        if (!grow(total / chunk_slots)) return null;
    }
}

/// Publishes chunk number `n` unless another thread already did. False when
/// the table is at its cap or out of memory.
fn grow(n: usize) bool {
    _ = std.c.pthread_mutex_lock(&grow_mutex);
    defer _ = std.c.pthread_mutex_unlock(&grow_mutex);
    if (chunk_count.load(.acquire) != n) return true; // grown meanwhile: look again
    if (n == max_chunks) return false;
    const c = std.heap.page_allocator.create(Chunk) catch return false;
    c.* = .{ .starts = @splat(.init(0)), .lens = @splat(0), .flags = @splat(null) };
    chunks[n].store(c, .release);
    hint.store(n * chunk_slots, .monotonic);
    chunk_count.store(n + 1, .release);
    return true;
}

pub fn unregister(slot: ?usize) void {
    const i = slot orelse return;
    const c = chunks[i / chunk_slots].load(.acquire).?;
    c.starts[i % chunk_slots].store(0, .release);
}

/// The error for a mapping register() could not cover.
pub fn unprotected() errors.Error {
    return errors.fail(.sigbus_slots, "cannot register another snapshot mapping with kvmlab's SIGBUS handler (out of memory, or {d} mappings): close some snapshots or VMs", .{max_chunks * chunk_slots});
}

/// Whether kvmlab's handler is the one installed now (someone may have
/// replaced it since). When it is, a plain memcpy from a registered mapping
/// cannot kill the process: a lost page reads as zeros and sets the owner's
/// damaged flag, which the caller checks afterwards.
pub fn active() bool {
    if (!installed.load(.acquire)) return false;
    var cur: linux.Sigaction = undefined;
    if (linux.errno(linux.sigaction(.BUS, null, &cur)) != .SUCCESS) return false;
    return cur.flags & linux.SA.SIGINFO != 0 and cur.handler.sigaction == &onSigbus;
}

fn install() void {
    if (installed.swap(true, .acq_rel)) return;
    var act = linux.Sigaction{
        .handler = .{ .sigaction = onSigbus },
        .mask = std.mem.zeroes(linux.sigset_t),
        .flags = linux.SA.SIGINFO | linux.SA.ONSTACK,
    };
    _ = linux.sigaction(.BUS, &act, &previous);
}

fn onSigbus(sig: linux.SIG, info: *const linux.siginfo_t, ctx: ?*anyopaque) callconv(.c) void {
    const addr = @intFromPtr(info.fields.sigfault.addr);
    const n = chunk_count.load(.acquire);
    for (chunks[0..n]) |*cp| {
        const c = cp.load(.acquire) orelse continue;
        for (&c.starts, 0..) |*s, i| {
            const start = s.load(.acquire);
            if (start <= 1 or addr < start or addr - start >= c.lens[i]) continue;
            const page = addr & ~@as(usize, 4095);
            // Zeros instead of the lost file page; the access is retried.
            const rc = linux.mmap(@ptrFromInt(page), 4096, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .ANONYMOUS = true, .FIXED = true }, -1, 0);
            if (linux.errno(rc) == .SUCCESS) {
                if (c.flags[i]) |f| f.store(true, .release);
                return;
            }
        }
    }
    // Not ours: what would have happened without kvmlab.
    if (signals.callSaved(@intFromPtr(previous.handler.handler), previous.flags & linux.SA.SIGINFO != 0, sig, info, ctx)) return;
    var dfl = linux.Sigaction{ .handler = .{ .handler = null }, .mask = std.mem.zeroes(linux.sigset_t), .flags = 0 };
    _ = linux.sigaction(.BUS, &dfl, null);
}

test "the table grows past a chunk and the handler covers a mapping registered there" {
    var dummy = std.atomic.Value(bool).init(false);
    // Fill more than one chunk with ranges nobody touches (addresses far
    // from anything mapped), then register a real file mapping after them.
    var slots: [chunk_slots + 10]usize = undefined;
    for (&slots, 0..) |*sl, i| sl.* = register(0x6000_0000_0000 + i * 8192, 4096, &dummy).?;
    defer for (slots) |sl| unregister(sl);
    try std.testing.expect(chunk_count.load(.acquire) >= 2);

    const fd: linux.fd_t = @intCast(linux.memfd_create("kvmlab-sigbus-test", 0));
    defer _ = linux.close(fd);
    try std.testing.expectEqual(@as(usize, 0), linux.ftruncate(fd, 2 * 4096));
    const addr = linux.mmap(null, 2 * 4096, .{ .READ = true }, .{ .TYPE = .SHARED }, fd, 0);
    try std.testing.expect(linux.errno(addr) == .SUCCESS);
    defer _ = linux.munmap(@ptrFromInt(addr), 2 * 4096);
    var damaged = std.atomic.Value(bool).init(false);
    const slot = register(addr, 2 * 4096, &damaged).?;
    defer unregister(slot);
    try std.testing.expect(slot >= chunk_slots or slots[slots.len - 1] >= chunk_slots);
    // The file loses its second page: reading it would kill the process
    // without the handler; with it, the page reads as zeros.
    try std.testing.expectEqual(@as(usize, 0), linux.ftruncate(fd, 4096));
    const p: *volatile u8 = @ptrFromInt(addr + 4096 + 17);
    try std.testing.expectEqual(@as(u8, 0), p.*);
    try std.testing.expect(damaged.load(.acquire));
    try std.testing.expect(!dummy.load(.acquire));
}
