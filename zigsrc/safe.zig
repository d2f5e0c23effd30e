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

fn unreadable(at: [*]const u8) errors.Error {
    return errors.fail(error.Snapshot, "memory at host address 0x{x} cannot be read: the snapshot file behind it was truncated or replaced while mapped; reload the snapshot", .{@intFromPtr(at)});
}

/// Copies with memcpy when both sides are anonymous memory, else safely.
pub fn copyMaybeMapped(dst: []u8, src: []const u8, mapped: bool) errors.Error!void {
    if (!mapped) {
        @memcpy(dst, src);
        return;
    }
    try copy(dst, src);
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
