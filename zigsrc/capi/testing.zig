//! The testing export group of libkvmlab (kvmlab_testing.h): benchmark
//! floors and fault injection. Not part of the product ABI: built into the
//! library only with `-Dtesting=true` (the default, because `kvmlab bench`
//! ships in the wheel). Every floor here calls the same bare operations as
//! the real path (restore.floor, reset.floor): no copied sequences.
const std = @import("std");
const errors = @import("../errors.zig");
const shell = @import("../shell.zig");
const restore = @import("../restore.zig");
const reset = @import("../reset.zig");
const fault = @import("../fault.zig");
const fit = @import("../fit.zig");
const common = @import("common.zig");
const pool_api = @import("pool.zig");

/// Shell-creation steps kvmlab_fault_inject can make fail.
pub const kvmlab_fault_site = fault.Site;

/// Benchmark floor of a reset: the bare dirty-log read, page copies and state
/// ioctls on a resettable VM (which ends up reset).
pub export fn kvmlab_bench_reset_floor(h: ?*common.kvmlab_vm, out: ?*common.kvmlab_reset_times) callconv(.c) common.kvmlab_result {
    return common.call(benchResetFloor, .{ h, out });
}
fn benchResetFloor(h: ?*common.kvmlab_vm, out: ?*common.kvmlab_reset_times) errors.Error!void {
    const m = try common.asVm(h);
    const o = try common.outPtr(common.kvmlab_reset_times, out);
    var t: reset.Times = .{};
    try m.resetFloor(&t);
    o.* = t;
}

/// Benchmark: `count` pooled restores of `snap` driven from native code, each
/// released right away; out_total_ns[i] = wall time of restore i as the C
/// caller sees it (the baseline for measuring the Python API's overhead).
/// Between restores it waits until the pool has an idle shell again (not
/// timed), so every restore is a hit like a warmed Python loop's.
pub export fn kvmlab_bench_pool_restores(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, count: usize, out_total_ns: ?[*]u64) callconv(.c) common.kvmlab_result {
    return common.call(benchPoolRestores, .{ h, snap, strategy, count, out_total_ns });
}
fn benchPoolRestores(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, count: usize, out_total_ns: ?[*]u64) errors.Error!void {
    const p = try common.asPool(h);
    const o = out_total_ns orelse return errors.fail(.null_argument, "out is NULL", .{});
    if (count > 1 << 20) return errors.fail(.loop_limit, "at most 2^20 restores", .{});
    for (0..count) |i| {
        var spins: usize = 0;
        while (p.idleCount() == 0 and spins < 20_000) : (spins += 1) std.Thread.yield() catch {};
        var vm_h: ?*common.kvmlab_vm = null;
        const t0 = shell.monotonicNs();
        try pool_api.poolRestoreSnapshot(h, snap, strategy, 0, 0, &vm_h, null);
        o[i] = shell.monotonicNs() - t0;
        p.release(try common.asVm(vm_h));
    }
}

/// Benchmark: takes an idle shell from the pool without restoring into it,
/// for kvmlab_bench_restore_floor into a pooled shell (shells get slower to
/// restore into as they wait: a fresh shell would flatter the floor). The
/// shell counts as in use; hand it back with kvmlab_pool_release.
pub export fn kvmlab_bench_pool_take_shell(h: ?*common.kvmlab_pool, out: ?*?*common.kvmlab_vm) callconv(.c) common.kvmlab_result {
    return common.call(benchPoolTakeShell, .{ h, out });
}
fn benchPoolTakeShell(h: ?*common.kvmlab_pool, out: ?*?*common.kvmlab_vm) errors.Error!void {
    const p = try common.asPool(h);
    const o = try common.outPtr(?*common.kvmlab_vm, out);
    o.* = @ptrCast(try p.takeIdle());
}

/// Tests and benchmarks: how many pages of a VM's guest memory are resident
/// (of a shell from kvmlab_bench_pool_take_shell: what the pool populated,
/// see zigsrc/fit.zig).
pub export fn kvmlab_bench_resident_pages(vm_handle: ?*common.kvmlab_vm, out: ?*u64) callconv(.c) common.kvmlab_result {
    return common.call(benchResidentPages, .{ vm_handle, out });
}
fn benchResidentPages(vm_handle: ?*common.kvmlab_vm, out: ?*u64) errors.Error!void {
    const m = try common.asVm(vm_handle);
    const o = try common.outPtr(u64, out);
    o.* = fit.residentPages(m.shell.mem);
}

/// Benchmark floor: times only the bare memory operation and state ioctls of
/// a restore of `snap` into `vm_handle` (restore.floor: what a restore does
/// after its checks), a fresh shell from kvmlab_vm_new of the same shape
/// (free it afterwards; it is not runnable).
pub export fn kvmlab_bench_restore_floor(vm_handle: ?*common.kvmlab_vm, snap: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, out: ?*common.kvmlab_restore_times) callconv(.c) common.kvmlab_result {
    return common.call(benchFloor, .{ vm_handle, snap, strategy, out });
}
fn benchFloor(vm_handle: ?*common.kvmlab_vm, snap: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, out: ?*common.kvmlab_restore_times) errors.Error!void {
    const m = try common.asVm(vm_handle);
    const s = try common.asSnap(snap);
    const o = try common.outPtr(common.kvmlab_restore_times, out);
    const src = try restore.MemorySource.forSnapshot(s, try common.strategyOf(strategy));
    var rt: restore.Times = .{};
    try restore.floor(m.shell, &m.mapping, &s.parsed, src, &rt);
    o.* = common.restoreTimes(rt, 0, rt.memory_ns + rt.vcpu_ns + rt.devices_ns, src == .map, false, 0, src.strategy());
}

/// TEST ONLY: holds the pool's reapers off its destroy queue (`hold` true)
/// or lets them go, so tests build a destroy backlog of an exact size whatever
/// this host's destroy speed. close() ignores the hold.
pub export fn kvmlab_testing_pool_hold_reapers(h: ?*common.kvmlab_pool, hold: bool) callconv(.c) common.kvmlab_result {
    const p = common.asPool(h) catch |e| return common.result(e);
    p.holdReapers(hold);
    return .ok;
}

/// TEST ONLY: makes shell-creation step `site` fail after passing `after`
/// more times; KVMLAB_FAULT_SITE_NONE disarms.
pub export fn kvmlab_fault_inject(site: kvmlab_fault_site, after: u32) callconv(.c) common.kvmlab_result {
    if (site == .none) {
        fault.arm(0, 0) catch {};
        return .ok;
    }
    return common.call(fault.arm, .{ @intFromEnum(site), after });
}
