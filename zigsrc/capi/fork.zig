//! The C ABI of libkvmlab: fork_many (kvmlab_fork_many), n VMs of one
//! file-backed snapshot restored in one call on a few native threads
//! (zigsrc/fork.zig says how and why).
const errors = @import("../errors.zig");
const fork = @import("../fork.zig");
const common = @import("common.zig");
const kvmlab_result = common.kvmlab_result;
const kvmlab_vm = common.kvmlab_vm;
const kvmlab_snapshot = common.kvmlab_snapshot;

/// Restores `n` VMs (1 .. 100000) of the file-backed snapshot `snap` with the
/// map strategy on `threads` threads (1 .. 64, the caller's included) into
/// out[0..n]. `flags`: kvmlab_restore_flags bits (resettable). `*stop`, set
/// nonzero by another thread, stops the call; `*done` counts the VMs ready so
/// far (progress; both may be read and written while the call runs). All or
/// nothing: after a failure (returned) or a stop (*out_count = 0) every VM
/// made is freed and out[] is all NULL; otherwise *out_count = n and each
/// out[i] is freed with kvmlab_vm_free. `phase_ns` (NULL-ok) gets the wall
/// time of its two phases: [0] every VM's KVM object, [1] the rest.
pub export fn kvmlab_fork_many(snap: ?*const kvmlab_snapshot, n: u32, threads: u32, flags: u32, stop: ?*const u32, done: ?*u64, out: ?[*]?*kvmlab_vm, out_count: ?*u32, phase_ns: ?[*]u64) callconv(.c) kvmlab_result {
    return common.call(forkMany, .{ snap, n, threads, flags, stop, done, out, out_count, phase_ns });
}
fn forkMany(snap: ?*const kvmlab_snapshot, n: u32, threads: u32, flags: u32, stop: ?*const u32, done: ?*u64, out: ?[*]?*kvmlab_vm, out_count: ?*u32, phase_ns: ?[*]u64) errors.Error!void {
    const count = try common.outPtr(u32, out_count);
    count.* = 0;
    const s = try common.asSnap(snap);
    try s.checkIntact();
    if (n < 1 or n > fork.max_vms) return errors.fail(.fork_count, "fork_many of {d} VMs: give 1 .. {d}", .{ n, fork.max_vms });
    if (threads < 1 or threads > fork.max_threads) return errors.fail(.fork_threads, "fork_many on {d} threads: give 1 .. {d}", .{ threads, fork.max_threads });
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    const st = stop orelse return errors.fail(.null_argument, "stop is NULL", .{});
    const dn = done orelse return errors.fail(.null_argument, "done is NULL", .{});
    const resettable = flags & (@intFromEnum(common.kvmlab_restore_flags.resettable) | @intFromEnum(common.kvmlab_restore_flags.reset_on_release)) != 0;
    const machines: []?*fork.Machine = @ptrCast(o[0..n]);
    var times: fork.Times = .{};
    const made = try fork.forkMany(s, .{ .threads = threads, .resettable = resettable, .stop = st, .done = dn }, machines, &times);
    if (phase_ns) |ph| ph[0..2].* = .{ times.vm_fds_ns, times.machines_ns };
    if (made) count.* = n;
}
