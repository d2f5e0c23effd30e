//! Prepared VMs (RestorePool.prepare): per snapshot, a target of VMs kept
//! restored (and, with a warmup, run and reset to the snapshot) and parked in
//! the pool, so a restore is a take. The bookkeeping of pool.PoolOf, as
//! functions over the pool (`p`, under its lock where said); the pool's
//! refill thread and capi call them. Ready prepared VMs are the pool's parked
//! VMs whose snapshot has a target: one list, one take (`reuse`).
const std = @import("std");
const errors = @import("errors.zig");
const shell = @import("shell.zig");
const snapshot = @import("snapshot.zig");
const restore_mod = @import("restore.zig");

const c = std.c;

fn FactoryOf(comptime P: type) type {
    return @typeInfo(P).pointer.child.Factory;
}
fn ItemOf(comptime P: type) type {
    return FactoryOf(P).Item;
}

/// Snapshots a pool keeps prepared VMs of (prepare()), at most.
pub const max_targets = 16;

/// One prepare() target: keep `n` VMs of `snap` restored (and, when
/// `external`, warmed by the caller and reset) and parked.
pub const Target = struct {
    snap: *snapshot.Snapshot,
    n: u32,
    strategy: restore_mod.Strategy,
    /// Warmed by the caller (Python's warmup): the refill thread leaves it to
    /// prepareBegin/prepareEnd on the caller's thread.
    external: bool,
    /// Being restored (and warmed) now, between prepareBegin and prepareEnd.
    preparing: u32 = 0,
    /// Every take gives the VM a fresh identity (nextIdentity).
    identity: bool = false,
    /// Names this target for takePrepared; unique within the pool (ids are
    /// never reused, so a stale one finds nothing).
    id: u64,
};

pub fn findTarget(p: anytype, snap: *const snapshot.Snapshot) ?*Target {
    for (p.targets[0..p.targets_len]) |*t| if (t.snap == snap) return t;
    return null;
}

pub fn findTargetId(p: anytype, id: u64) ?*Target {
    for (p.targets[0..p.targets_len]) |*t| if (t.id == id) return t;
    return null;
}

/// The id of `snap`'s target (0: it has none).
pub fn targetId(p: anytype, snap: *const snapshot.Snapshot) u64 {
    p.lockIt();
    defer p.unlockIt();
    return if (p.findTarget(snap)) |t| t.id else 0;
}

pub fn findParked(p: anytype, snap: *const snapshot.Snapshot) ?u32 {
    var i: u32 = 0;
    while (i < p.parked_len) : (i += 1) if (FactoryOf(@TypeOf(p)).resetsTo(p.parked[i], snap)) return i;
    return null;
}

/// With the lock held: parked VMs of `snap` (ready to be taken).
pub fn readyFor(p: anytype, snap: *const snapshot.Snapshot) u32 {
    var n: u32 = 0;
    for (p.parked[0..p.parked_len]) |vm| n += @intFromBool(FactoryOf(@TypeOf(p)).resetsTo(vm, snap));
    return n;
}

/// With the lock held: VMs of target `t` ready or becoming ready
/// (parked, queued for or in a reset after a release, being prepared).
pub fn heldFor(p: anytype, t: *const Target) u32 {
    var n: u32 = p.readyFor(t.snap) + t.preparing;
    for (p.to_reset.items) |vm| n += @intFromBool(FactoryOf(@TypeOf(p)).resetsTo(vm, t.snap));
    for (p.resetting[0..p.resetting_len]) |vm| n += @intFromBool(FactoryOf(@TypeOf(p)).resetsTo(vm, t.snap));
    return n;
}

/// With the lock held: the target `vm` was prepared for, if any.
pub fn targetOf(p: anytype, vm: *const ItemOf(@TypeOf(p))) ?*Target {
    for (p.targets[0..p.targets_len]) |*t| if (FactoryOf(@TypeOf(p)).resetsTo(vm, t.snap)) return t;
    return null;
}

/// With the lock held: wakes whoever prepares for `t` if it is short.
pub fn wakePreparer(p: anytype, t: *const Target) void {
    if (p.preparerToWake(t)) |cv| _ = c.pthread_cond_signal(cv);
}

/// With the lock held: the condition to signal when `t` is short (null: it
/// is not). For a signal after unlocking: a waiter woken under our lock
/// would only block on it again (two futex calls and a cross-CPU bounce in
/// the take's hot path).
pub fn preparerToWake(p: anytype, t: *const Target) ?*c.pthread_cond_t {
    if (p.heldFor(t) >= t.n) return null;
    return if (t.external) &p.need_cv else &p.refill_cv;
}

/// Ready prepared VMs of `snap` (0 when it has no target).
pub fn preparedCount(p: anytype, snap: *const snapshot.Snapshot) u32 {
    p.lockIt();
    defer p.unlockIt();
    return if (p.findTarget(snap) != null) p.readyFor(snap) else 0;
}

/// Sets how many VMs of `snap` the pool keeps prepared (0: none; its
/// ready ones are destroyed, its VMs out are destroyed at release).
/// The targets of all snapshots together stay within max_size.
/// `external`: the caller prepares (prepareBegin/End, with its warmup);
/// otherwise the refill thread does.
pub fn setTarget(p: anytype, snap: *snapshot.Snapshot, n: u32, strategy: restore_mod.Strategy, external: bool, identity: bool) errors.Error!void {
    p.lockIt();
    defer p.unlockIt();
    if (p.closed) return errors.fail(.pool_closed, "the pool is closed", .{});
    const found = p.findTarget(snap);
    var total: u64 = n;
    for (p.targets[0..p.targets_len]) |*t| total += if (t == found) 0 else t.n;
    if (total > p.cfg.max_size)
        return errors.fail(.prepare_max_size, "{d} prepared VMs over all snapshots would exceed max_size={d}: raise PoolConfig max_size or prepare fewer", .{ total, p.cfg.max_size });
    if (found == null and n > 0 and p.targets_len == max_targets)
        return errors.fail(.prepare_targets, "{d} snapshots are prepared already (the limit): prepare(snap, 0) one of them first", .{max_targets});
    const t = found orelse blk: {
        if (n == 0) return;
        p.targets[p.targets_len] = .{ .snap = FactoryOf(@TypeOf(p)).retainSnap(snap), .n = 0, .strategy = strategy, .external = external, .id = p.next_target_id };
        p.next_target_id += 1;
        p.targets_len += 1;
        break :blk &p.targets[p.targets_len - 1];
    };
    t.* = .{ .snap = t.snap, .n = n, .strategy = strategy, .external = external, .preparing = t.preparing, .identity = identity, .id = t.id };
    // Give up ready VMs beyond the new target.
    var ready = p.readyFor(snap);
    while (ready > n) : (ready -= 1) {
        const i = p.findParked(snap).?;
        const vm = p.parked[i];
        p.parked_len -= 1;
        p.parked[i] = p.parked[p.parked_len];
        p.queueDead(vm);
    }
    if (n == 0) {
        FactoryOf(@TypeOf(p)).releaseSnap(t.snap);
        t.* = p.targets[p.targets_len - 1];
        p.targets_len -= 1;
        return;
    }
    p.wakePreparer(t);
}

/// Reserves one VM of target `snap` if it is short and restores it
/// (resettable) on this thread. Null when nothing is needed. The caller
/// may run it (a warmup), then must call prepareEnd.
pub fn prepareBegin(p: anytype, snap: *snapshot.Snapshot) errors.Error!?*ItemOf(@TypeOf(p)) {
    p.lockIt();
    const t = p.findTarget(snap) orelse {
        p.unlockIt();
        return null;
    };
    if (p.closed or p.heldFor(t) >= t.n) {
        p.unlockIt();
        return null;
    }
    t.preparing += 1;
    const strategy = t.strategy;
    _ = FactoryOf(@TypeOf(p)).retainSnap(snap); // prepare(snap, 0) meanwhile must not free it
    var taken: ?*ItemOf(@TypeOf(p)) = null;
    if (p.idle_len > 0) {
        p.idle_len -= 1;
        taken = p.idle[p.idle_len];
        p.wakeRefillIfLow();
    }
    p.unlockIt();
    const vm = taken orelse (FactoryOf(@TypeOf(p)).create(p.cfg.memory_bytes, p.cfg.vcpus, true) catch |e| {
        p.prepareDone(snap, null, false, false);
        return e;
    });
    if (taken == null) {
        p.lockIt();
        p.created += 1;
        p.unlockIt();
    }
    var times: restore_mod.Times = .{};
    FactoryOf(@TypeOf(p)).prepareInto(vm, snap, strategy, &times) catch |e| {
        p.prepareDone(snap, vm, false, false);
        return e;
    };
    return vm;
}

/// Ends prepareBegin: `ok` (the warmup passed) parks `vm` as prepared
/// (reset first when it ran: `warmed`); otherwise it is destroyed.
pub fn prepareEnd(p: anytype, vm: *ItemOf(@TypeOf(p)), snap: *snapshot.Snapshot, warmed: bool, ok: bool) errors.Error!void {
    var failed: ?errors.Error = null;
    if (ok and warmed) FactoryOf(@TypeOf(p)).resetForReuse(vm) catch |e| {
        failed = e;
    };
    p.prepareDone(snap, vm, ok and failed == null, ok and warmed);
    if (failed) |e| return e;
}

/// One prepareBegin over, in one critical section (so the target never
/// looks short in between): the reservation and the snapshot go back;
/// `vm` is parked when `good`, else destroyed and counted.
pub fn prepareDone(p: anytype, snap: *snapshot.Snapshot, vm: ?*ItemOf(@TypeOf(p)), good: bool, was_reset: bool) void {
    p.lockIt();
    defer p.unlockIt();
    if (was_reset) p.resets += 1;
    const t = p.findTarget(snap);
    // A target given up and set again meanwhile starts at 0.
    if (t) |tt| tt.preparing -|= 1;
    if (vm) |v| {
        if (good and !p.closed and t != null and p.parked_len < p.cfg.max_size) {
            p.parked[p.parked_len] = v;
            p.parked_len += 1;
        } else p.queueDead(v); // failed, or given up (prepare(snap, 0)) meanwhile
    }
    if (!good) {
        p.failures += 1;
        if (t) |tt| p.wakePreparer(tt);
    }
    FactoryOf(@TypeOf(p)).releaseSnap(snap);
}

/// prepare() on this thread, without a warmup: sets the target and
/// restores until `n` VMs of `snap` are ready. On an error the target
/// is given up (nothing half-prepared) and the error returned.
pub fn prepare(p: anytype, snap: *snapshot.Snapshot, n: u32, strategy: restore_mod.Strategy, identity: bool) errors.Error!void {
    try p.setTarget(snap, n, strategy, false, identity);
    errdefer p.setTarget(snap, 0, strategy, false, false) catch {};
    // Bounded: each round prepares one VM or waits 1 ms for one in flight
    // (the refill thread's, or a released one being reset).
    var round: u32 = 0;
    while (round < prepare_wait_rounds) : (round += 1) {
        if (try p.prepareBegin(snap)) |vm| {
            p.prepareDone(snap, vm, true, false);
            continue;
        }
        if (!p.preparing(snap)) {
            // preparing() is false once closed too: a close() meanwhile is a failure, not done.
            p.lockIt();
            const closed = p.closed;
            p.unlockIt();
            if (closed) return errors.fail(.pool_closed, "the pool was closed while preparing", .{});
            return;
        }
        _ = std.os.linux.nanosleep(&.{ .sec = 0, .nsec = std.time.ns_per_ms }, null);
    }
    return errors.fail(.prepare_timeout, "the pool did not prepare {d} VMs within {d} s", .{ n, prepare_wait_rounds / 1000 });
}

/// prepare() waits this many 1 ms rounds at most for VMs in flight.
const prepare_wait_rounds: u32 = 60_000;

/// Whether VMs of `snap` are still on their way to ready: its target is not
/// met but some are being prepared or reset (so prepareBegin had nothing to do).
pub fn preparing(p: anytype, snap: *const snapshot.Snapshot) bool {
    p.lockIt();
    defer p.unlockIt();
    const t = p.findTarget(snap) orelse return false;
    return !p.closed and p.readyFor(snap) < t.n and p.heldFor(t) > p.readyFor(snap);
}

/// Blocks up to `wait_ns` until an external target is short (true) or
/// not (false); the caller's warmer then calls prepareBegin per target.
pub fn waitPrepareNeed(p: anytype, wait_ns: u64) errors.Error!bool {
    p.lockIt();
    defer p.unlockIt();
    const deadline = shell.monotonicNs() + wait_ns;
    while (!p.closed) {
        for (p.targets[0..p.targets_len]) |*t| if (t.external and p.heldFor(t) < t.n) return true;
        const now = shell.monotonicNs();
        if (now >= deadline) return false;
        var ts = @typeInfo(@TypeOf(p)).pointer.child.deadlineIn(deadline - now);
        _ = c.pthread_cond_timedwait(&p.need_cv, &p.lock, &ts);
    }
    return errors.fail(.pool_closed, "the pool is closed", .{});
}

/// With the lock held: the identity of the next take of a target that asks
/// for one. splitmix64 over a random per-pool seed: its finalizer is a
/// bijection, so takes get distinct values; never 0 ("no identity").
pub fn nextIdentity(p: anytype) u64 {
    p.identity_state +%= 0x9E3779B97F4A7C15;
    var z = p.identity_state;
    z = (z ^ (z >> 30)) *% 0xBF58476D1CE4E5B9;
    z = (z ^ (z >> 27)) *% 0x94D049BB133111EB;
    z ^= z >> 31;
    return if (z == 0) 1 else z;
}

/// With the lock held: a target the refill thread prepares that is short.
pub fn shortTarget(p: anytype) ?*snapshot.Snapshot {
    for (p.targets[0..p.targets_len]) |*t| if (!t.external and p.heldFor(t) < t.n) return t.snap;
    return null;
}

