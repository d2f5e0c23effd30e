//! The C ABI of libkvmlab: pool handles (kvmlab_pool).
const errors = @import("../errors.zig");
const state = @import("../state.zig");
const snapshot = @import("../snapshot.zig");
const restore = @import("../restore.zig");
const pool_mod = @import("../pool.zig");
const machine = @import("../machine.zig");
const safe = @import("../safe.zig");
const common = @import("common.zig");

fn poolConfig(cfg: ?*const common.kvmlab_pool_config) errors.Error!pool_mod.Config {
    return (cfg orelse return errors.fail(.null_argument, "config is NULL", .{})).*;
}

/// Creates a pool and warms min_size shells before returning.
pub export fn kvmlab_pool_new(cfg: ?*const common.kvmlab_pool_config, out: ?*?*common.kvmlab_pool) callconv(.c) common.kvmlab_result {
    return common.call(poolNew, .{ cfg, out });
}
fn poolNew(cfg: ?*const common.kvmlab_pool_config, out: ?*?*common.kvmlab_pool) errors.Error!void {
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try pool_mod.Pool.create(try poolConfig(cfg)));
}

/// Closes the pool: idle and prepared VMs destroyed, threads stopped; NULL
/// is fine; idempotent. The handle stays valid (calls fail with pool_closed,
/// a take finds nothing) until kvmlab_pool_free, so a caller's other threads
/// may race this without a guard. VMs still out stay valid.
pub export fn kvmlab_pool_close(h: ?*common.kvmlab_pool) callconv(.c) void {
    const p = common.asPool(h) catch return;
    p.close();
}

/// Closes the pool if it is not yet, and lets go of the handle: no call may
/// use it afterwards but the releases of VMs still out (the last one frees
/// the pool). NULL is fine.
pub export fn kvmlab_pool_free(h: ?*common.kvmlab_pool) callconv(.c) void {
    const p = common.asPool(h) catch return;
    p.releaseHandle();
}

pub export fn kvmlab_pool_warm(h: ?*common.kvmlab_pool, target: u32) callconv(.c) common.kvmlab_result {
    return common.call(poolWarm, .{ h, target });
}
fn poolWarm(h: ?*common.kvmlab_pool, target: u32) errors.Error!void {
    try (try common.asPool(h)).warm(target);
}

/// Idle shells now; 0 for NULL. Never fails.
pub export fn kvmlab_pool_idle_count(h: ?*common.kvmlab_pool) callconv(.c) u32 {
    const p = common.asPool(h) catch return 0;
    return p.idleCount();
}

pub export fn kvmlab_pool_get_stats(h: ?*common.kvmlab_pool, out: ?*common.kvmlab_pool_stats) callconv(.c) common.kvmlab_result {
    return common.call(poolStats, .{ h, out });
}
fn poolStats(h: ?*common.kvmlab_pool, out: ?*common.kvmlab_pool_stats) errors.Error!void {
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = (try common.asPool(h)).stats();
}

/// Copies up to `capacity` of the newest restore records, oldest first.
pub export fn kvmlab_pool_timings(h: ?*common.kvmlab_pool, buf: ?[*]common.kvmlab_pool_timing, capacity: usize, out_count: ?*usize) callconv(.c) common.kvmlab_result {
    return common.call(poolTimings, .{ h, buf, capacity, out_count });
}
fn poolTimings(h: ?*common.kvmlab_pool, buf: ?[*]common.kvmlab_pool_timing, capacity: usize, out_count: ?*usize) errors.Error!void {
    const p = try common.asPool(h);
    const o = out_count orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = 0;
    if (capacity == 0) return;
    const b = buf orelse return errors.fail(.null_argument, "NULL buffer", .{});
    o.* = p.copyTimings(b[0..capacity]);
}

/// Hands `m` out as restore `seq`: its first run (kvmlab_vm_run or
/// kvmlab_vm_call) is recorded in that restore's timing record (first_run_ns).
/// The pool outlives the note: it is freed only after the last release.
fn handOut(p: *pool_mod.Pool, m: *machine.Machine, seq: u64) *common.kvmlab_vm {
    m.first_run = .{ .ctx = p, .seq = seq, .record = &recordFirstRun };
    return @ptrCast(m);
}

fn recordFirstRun(ctx: *anyopaque, seq: u64, run_ns: u64) void {
    const p: *pool_mod.Pool = @ptrCast(@alignCast(ctx));
    p.noteFirstRun(seq, run_ns);
}

fn poolFinish(p: *pool_mod.Pool, parsed: *const state.Parsed, src: restore.MemorySource, resettable: bool, wait_ns: u64, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) errors.Error!void {
    const o = try common.outPtr(?*common.kvmlab_vm, out);
    o.* = null;
    var rt: restore.Times = .{};
    var acquire: u64 = 0;
    var hit = false;
    var seq: u64 = 0;
    const m = try p.restore(parsed, src, resettable, wait_ns, &rt, &acquire, &hit, &seq);
    if (times) |t| t.* = common.restoreTimes(rt, acquire, p.totalNsOf(seq), m.shell.mapped(), hit, seq, src.strategy());
    o.* = handOut(p, m, seq);
}

/// Restores a Snapshot into a pooled shell (file-backed + auto/map: zero copy).
/// `wait_ns` > 0 waits that long for room when max_in_use VMs are out.
/// `flags`: kvmlab_restore_flags bits. With reset_on_release, a VM parked by
/// an earlier release for this snapshot is reused (timing strategy reuse).
/// A snapshot with a kvmlab_pool_prepare target takes a prepared VM when one
/// is ready (strategy prepared), whatever the flags.
pub export fn kvmlab_pool_restore_snapshot(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, wait_ns: u64, flags: u32, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) callconv(.c) common.kvmlab_result {
    return common.call(poolRestoreSnapshot, .{ h, snap, strategy, wait_ns, flags, out, times });
}
pub fn poolRestoreSnapshot(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, wait_ns: u64, flags: u32, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) errors.Error!void {
    const p = try common.asPool(h);
    const s = try common.asSnap(snap);
    try s.checkIntact();
    const o = try common.outPtr(?*common.kvmlab_vm, out);
    o.* = null;
    const park = flags & @intFromEnum(common.kvmlab_restore_flags.reset_on_release) != 0;
    const resettable = park or flags & @intFromEnum(common.kvmlab_restore_flags.resettable) != 0;
    // A prepared VM of `s` (or, with park, a parked one): one lookup.
    var seq: u64 = 0;
    var took: common.kvmlab_strategy = .reuse;
    if (p.reuse(s, park, &seq, &took)) |m| {
        // The take's own record (reuse timed it; timing it again here cost
        // two more clock reads: each a ~0.25 us syscall here, no vDSO).
        const dt = p.totalNsOf(seq);
        if (times) |t| t.* = common.restoreTimes(.{}, dt, dt, m.shell.mapped(), true, seq, took);
        o.* = handOut(p, m, seq);
        return;
    }
    try poolFinish(p, &s.parsed, try restore.MemorySource.forSnapshot(s, try common.strategyOf(strategy)), resettable, wait_ns, out, times);
    if (!resettable) return;
    const m = try common.asVm(o.*);
    m.enableReset(s) catch |e| {
        p.release(m);
        o.* = null;
        return e;
    };
    if (park) p.parkOnRelease(m) catch |e| {
        p.release(m);
        o.* = null;
        return e;
    };
}

/// Restores from raw parts: dense guest memory and a state blob.
pub export fn kvmlab_pool_restore_parts(h: ?*common.kvmlab_pool, memory: ?[*]const u8, memory_bytes: usize, vcpu_state: ?[*]const u8, state_bytes: usize, wait_ns: u64, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) callconv(.c) common.kvmlab_result {
    return common.call(poolRestoreParts, .{ h, memory, memory_bytes, vcpu_state, state_bytes, wait_ns, out, times });
}
fn poolRestoreParts(h: ?*common.kvmlab_pool, memory: ?[*]const u8, memory_bytes: usize, vcpu_state: ?[*]const u8, state_bytes: usize, wait_ns: u64, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) errors.Error!void {
    const p = try common.asPool(h);
    const parsed = try state.parse(try common.bytesOf(vcpu_state, state_bytes));
    if (memory_bytes != parsed.memory_bytes)
        return errors.fail(.shape, "memory buffer is {d} bytes; the vCPU state describes {d} MiB", .{ memory_bytes, parsed.memory_bytes >> 20 });
    const src: restore.MemorySource = .{ .copy = .{ .memory = try common.bytesOf(memory, memory_bytes), .page_map = parsed.pageMap(), .packed_layout = false, .source_guard = safe.Guard.unknown } }; // the caller's buffer
    try poolFinish(p, &parsed, src, false, wait_ns, out, times);
}

/// Restores from an encoded snapshot (checked first), copying its memory.
pub export fn kvmlab_pool_restore_bytes(h: ?*common.kvmlab_pool, data: ?[*]const u8, len: usize, wait_ns: u64, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) callconv(.c) common.kvmlab_result {
    return common.call(poolRestoreBytes, .{ h, data, len, wait_ns, out, times });
}
fn poolRestoreBytes(h: ?*common.kvmlab_pool, data: ?[*]const u8, len: usize, wait_ns: u64, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) errors.Error!void {
    const p = try common.asPool(h);
    const c = try snapshot.check(try common.bytesOf(data, len));
    const src: restore.MemorySource = .{ .copy = .{ .memory = c.memory, .page_map = c.parsed.pageMap(), .packed_layout = c.packed_layout, .source_guard = null } }; // check() read them all already
    try poolFinish(p, &c.parsed, src, false, wait_ns, out, times);
}

/// Gives a pooled VM back (it must come from this pool); it is destroyed off
/// the caller's path. The VM handle is invalid afterwards.
pub export fn kvmlab_pool_release(h: ?*common.kvmlab_pool, vm_handle: ?*common.kvmlab_vm) callconv(.c) void {
    const p = common.asPool(h) catch return;
    const m = common.asVm(vm_handle) catch return;
    m.first_run = null; // it may go back to the pool unrun (parked, prepared)
    p.release(m);
}

/// Keeps `n` VMs of `snap` prepared (restored into shells, resettable, kept
/// ready; the refill thread keeps the count after takes): returns once they
/// are. n = 0 gives them up. On an error nothing is left prepared for `snap`.
/// `flags`: kvmlab_prepare_flags bits.
pub export fn kvmlab_pool_prepare(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, n: u32, strategy: common.kvmlab_strategy, flags: u32) callconv(.c) common.kvmlab_result {
    return common.call(poolPrepare, .{ h, snap, n, strategy, false, flags });
}
/// Sets the target of `snap` for a caller that prepares them itself with
/// kvmlab_pool_prepare_begin/_end (e.g. to run a warmup); nothing is restored.
pub export fn kvmlab_pool_prepare_target(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, n: u32, strategy: common.kvmlab_strategy, flags: u32) callconv(.c) common.kvmlab_result {
    return common.call(poolPrepare, .{ h, snap, n, strategy, true, flags });
}
fn poolPrepare(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, n: u32, strategy: common.kvmlab_strategy, external: bool, flags: u32) errors.Error!void {
    const p = try common.asPool(h);
    const s = try common.asSnap(snap);
    try s.checkIntact();
    if (s.parsed.memory_bytes != p.cfg.memory_bytes or s.parsed.vcpus != p.cfg.vcpus)
        return errors.fail(.shape, "snapshot is {d} MiB with {d} vCPU(s); this pool's VmConfig is {d} MiB with {d} vCPU(s)", .{ s.parsed.memory_bytes >> 20, s.parsed.vcpus, p.cfg.memory_bytes >> 20, p.cfg.vcpus });
    _ = try restore.MemorySource.forSnapshot(s, strategy); // a strategy the caller may choose
    const identity = flags & @intFromEnum(common.kvmlab_prepare_flags.identity) != 0;
    if (external) return p.setTarget(s, n, strategy, true, identity);
    try p.prepare(s, n, strategy, identity);
}

/// For a kvmlab_pool_prepare_target: when `snap` is short of its target,
/// restores one VM into *out (resettable) on this thread; else *out = NULL.
/// Run it (the warmup), then always call kvmlab_pool_prepare_end.
pub export fn kvmlab_pool_prepare_begin(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, out: ?*?*common.kvmlab_vm) callconv(.c) common.kvmlab_result {
    return common.call(poolPrepareBegin, .{ h, snap, out });
}
fn poolPrepareBegin(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, out: ?*?*common.kvmlab_vm) errors.Error!void {
    const o = try common.outPtr(?*common.kvmlab_vm, out);
    o.* = null;
    o.* = @ptrCast(try (try common.asPool(h)).prepareBegin(try common.asSnap(snap)));
}

/// Ends kvmlab_pool_prepare_begin: ok != 0 resets the VM to `snap` (when
/// warmed != 0: it ran) and keeps it prepared; ok == 0 destroys it. The VM
/// handle is the pool's afterwards.
pub export fn kvmlab_pool_prepare_end(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, vm_handle: ?*common.kvmlab_vm, warmed: u32, ok: u32) callconv(.c) common.kvmlab_result {
    return common.call(poolPrepareEnd, .{ h, snap, vm_handle, warmed, ok });
}
fn poolPrepareEnd(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot, vm_handle: ?*common.kvmlab_vm, warmed: u32, ok: u32) errors.Error!void {
    try (try common.asPool(h)).prepareEnd(try common.asVm(vm_handle), try common.asSnap(snap), warmed != 0, ok != 0);
}

/// Waits up to wait_ns until a kvmlab_pool_prepare_target snapshot is short
/// of its target (*out = 1) or not (*out = 0). Fails once the pool is closed.
pub export fn kvmlab_pool_prepare_wait(h: ?*common.kvmlab_pool, wait_ns: u64, out: ?*u32) callconv(.c) common.kvmlab_result {
    return common.call(poolPrepareWait, .{ h, wait_ns, out });
}
fn poolPrepareWait(h: ?*common.kvmlab_pool, wait_ns: u64, out: ?*u32) errors.Error!void {
    const o = try common.outPtr(u32, out);
    o.* = 0;
    o.* = @intFromBool(try (try common.asPool(h)).waitPrepareNeed(wait_ns));
}

/// The id of `snap`'s prepare() target in this pool, for
/// kvmlab_pool_take_prepared; 0 for NULL or no target. Never fails.
pub export fn kvmlab_pool_target_id(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot) callconv(.c) u64 {
    const p = common.asPool(h) catch return 0;
    return p.targetId(common.asSnap(snap) catch return 0);
}

/// The hot path of a prepared restore: a ready VM of target `target_id`
/// (kvmlab_pool_target_id), or NULL when there is none to take: none ready,
/// the target given up, the pool closed or at max_in_use, the snapshot's
/// file changed. Then restore with kvmlab_pool_restore_snapshot, which waits
/// or fails as it should and says why. Never fails otherwise (no result to
/// check, no out cell: each measured on the take's path with cold caches).
/// Needs no snapshot handle: the target holds it. `times` as for a restore.
pub export fn kvmlab_pool_take_prepared(h: ?*common.kvmlab_pool, target_id: u64, times: ?*common.kvmlab_restore_times) callconv(.c) ?*common.kvmlab_vm {
    const p = common.asPool(h) catch return null;
    var seq: u64 = 0;
    const m = p.takePrepared(target_id, &seq) orelse return null;
    // The VM holds its snapshot (it resets to it). Restored ahead with the
    // full check, and checked again by the reset at each release: here the
    // mapped header only (no statx: snapshot.checkHeader says why).
    m.resettable.?.snap.checkHeader() catch {
        p.release(m);
        return null;
    };
    const dt = p.totalNsOf(seq);
    if (times) |t| t.* = common.restoreTimes(.{}, dt, dt, m.shell.mapped(), true, seq, .prepared);
    return handOut(p, m, seq);
}

/// Prepared VMs of `snap` ready now; 0 for NULL or no target. Never fails.
pub export fn kvmlab_pool_prepared_count(h: ?*common.kvmlab_pool, snap: ?*const common.kvmlab_snapshot) callconv(.c) u32 {
    const p = common.asPool(h) catch return 0;
    return p.preparedCount(common.asSnap(snap) catch return 0);
}
