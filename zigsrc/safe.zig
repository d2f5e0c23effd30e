//! Copies that cannot raise SIGBUS. A snapshot file mapped into the process
//! (Snapshot.load, `map` restores) may be truncated or replaced by someone
//! else; touching a page past its new end raises SIGBUS, which would kill the
//! Python process. process_vm_readv on our own pid performs the same copy in
//! the kernel and reports such a page as EFAULT instead, so the caller gets a
//! SnapshotError naming the problem.
const std = @import("std");
const linux = std.os.linux;
const errors = @import("errors.zig");

/// Copies `src` into `dst` (same length); fails instead of faulting.
pub fn copy(dst: []u8, src: []const u8) errors.Error!void {
    std.debug.assert(dst.len == src.len);
    var done: usize = 0;
    while (done < src.len) {
        const local = [_]std.posix.iovec{.{ .base = dst[done..].ptr, .len = dst.len - done }};
        const remote = [_]std.posix.iovec_const{.{ .base = src[done..].ptr, .len = src.len - done }};
        const rc = linux.process_vm_readv(linux.getpid(), &local, &remote, 0);
        switch (linux.errno(rc)) {
            .SUCCESS => {
                if (rc == 0) return unreadable(src.ptr + done);
                done += rc;
            },
            .INTR => {},
            else => return unreadable(src.ptr + done),
        }
    }
}

/// The error for memory whose snapshot file lost pages under a mapping.
pub fn truncated() errors.Error {
    return errors.fail(.damaged, "the snapshot file behind this memory was truncated or replaced while mapped (pages past its new end read as zeros); reload the snapshot", .{});
}

fn unreadable(at: [*]const u8) errors.Error {
    return errors.fail(.damaged, "memory at host address 0x{x} cannot be read: the snapshot file behind it was truncated or replaced while mapped; reload the snapshot", .{@intFromPtr(at)});
}

/// Copies many page-sized (or any same-sized) pieces in as few syscalls as
/// possible: `pairs` are (dst, src) slices of equal length.
pub const Batch = struct {
    local: [max]std.posix.iovec = undefined,
    remote: [max]std.posix.iovec_const = undefined,
    len: usize = 0,
    bytes: usize = 0,

    const max = 512; // below IOV_MAX (1024)

    pub fn add(b: *Batch, dst: []u8, src: []const u8) errors.Error!void {
        std.debug.assert(dst.len == src.len);
        if (b.len == max) try b.flush();
        b.local[b.len] = .{ .base = dst.ptr, .len = dst.len };
        b.remote[b.len] = .{ .base = src.ptr, .len = src.len };
        b.len += 1;
        b.bytes += dst.len;
    }

    pub fn flush(b: *Batch) errors.Error!void {
        if (b.len == 0) return;
        defer {
            b.len = 0;
            b.bytes = 0;
        }
        const rc = linux.process_vm_readv(linux.getpid(), b.local[0..b.len], b.remote[0..b.len], 0);
        if (linux.errno(rc) == .SUCCESS and rc == b.bytes) return;
        // Short or failed: redo piece by piece to name the unreadable one.
        for (b.local[0..b.len], b.remote[0..b.len]) |l, r| try copy(l.base[0..l.len], r.base[0..r.len]);
    }
};

/// For bulk copies out of a snapshot file mapping: `fast` when the mapping
/// is registered with kvmlab's SIGBUS handler and that handler is installed,
/// so plain memcpy is safe (a lost page reads as zeros and raises `damaged`,
/// checked by finish()); otherwise callers use copy()/Batch, which go through
/// the kernel (process_vm_readv). An unregistered mapping (the handler's
/// table was full) must never be read with memcpy: its SIGBUS is not caught.
pub const Guard = struct {
    fast: bool,
    damaged: *const std.atomic.Value(bool),

    pub fn init(damaged: *const std.atomic.Value(bool), registered: bool) Guard {
        return .{ .fast = registered and @import("sigbus.zig").active(), .damaged = damaged };
    }

    pub fn finish(g: *const Guard) errors.Error!void {
        if (g.damaged.load(.acquire)) return truncated();
    }

    /// Memory kvmlab knows nothing of (a caller's buffer, maybe a mapped
    /// file): always copied through the kernel.
    pub const unknown: Guard = .{ .fast = false, .damaged = &never_damaged };
};

var never_damaged = std.atomic.Value(bool).init(false);

/// Copies out of (or into) memory that may be a mapped file: `guard` null
/// for anonymous memory (memcpy); else memcpy when the guard is fast, or
/// through the kernel. After a run of copies, `finish(guard)` reports a page
/// the fast path found lost.
pub fn copyGuarded(dst: []u8, src: []const u8, guard: ?Guard) errors.Error!void {
    if (guard) |g| if (!g.fast) return copy(dst, src);
    @memcpy(dst, src);
}

/// Guard.finish for an optional guard (null: anonymous memory, nothing to check).
pub fn finish(guard: ?Guard) errors.Error!void {
    if (guard) |g| try g.finish();
}

test "safe copy copies and reports unreadable memory" {
    var a: [64]u8 = undefined;
    var b: [64]u8 = undefined;
    for (&a, 0..) |*x, i| x.* = @intCast(i);
    try copy(&b, &a);
    try std.testing.expectEqualSlices(u8, &a, &b);
    const bogus: [*]const u8 = @ptrFromInt(0x10);
    try std.testing.expectError(error.Snapshot, copy(b[0..8], bogus[0..8]));
}

test "Guard uses memcpy only for mappings the SIGBUS handler knows" {
    var damaged = std.atomic.Value(bool).init(false);
    const sigbus = @import("sigbus.zig");
    const slot = sigbus.register(0x7000_0000_0000, 4096, &damaged); // installs the handler
    defer sigbus.unregister(slot);
    try std.testing.expect(Guard.init(&damaged, slot != null).fast);
    try std.testing.expect(!Guard.init(&damaged, false).fast);
    damaged.store(true, .release);
    try std.testing.expectError(error.Snapshot, Guard.init(&damaged, true).finish());
}

test "copyGuarded goes through the kernel unless the memory is anonymous or covered" {
    var a: [64]u8 = undefined;
    var b: [64]u8 = undefined;
    for (&a, 0..) |*x, i| x.* = @intCast(i);
    try copyGuarded(&b, &a, null); // anonymous: memcpy
    try std.testing.expectEqualSlices(u8, &a, &b);
    @memset(&b, 0);
    try copyGuarded(&b, &a, Guard.unknown);
    try std.testing.expectEqualSlices(u8, &a, &b);
    const bogus: [*]const u8 = @ptrFromInt(0x10);
    // A memcpy from here would fault: only the kernel's copy reports it.
    try std.testing.expectError(error.Snapshot, copyGuarded(b[0..8], bogus[0..8], Guard.unknown));
    try finish(null);
    try finish(Guard.unknown);
    var damaged = std.atomic.Value(bool).init(true);
    try std.testing.expectError(error.Snapshot, finish(Guard{ .fast = true, .damaged = &damaged }));
}
