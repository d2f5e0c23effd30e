//! Unit tests of pool.zig: the pool's accounting over a factory without KVM
//! (PoolOf is generic over what it pools).
const std = @import("std");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const restore_mod = @import("restore.zig");
const pool = @import("pool.zig");


/// Items that cost nothing: counts creations and destructions, fails on demand.
const Fake = struct {
    pub const Item = struct { resets_to: ?*const snapshot.Snapshot = null, identity: u64 = 0 };
    pub const Source = restore_mod.MemorySource;
    var created = std.atomic.Value(u32).init(0);
    var destroyed = std.atomic.Value(u32).init(0);
    var fail_create = std.atomic.Value(bool).init(false);

    /// The dirty_log the pool asked of its latest new item.
    var last_dirty_log = std.atomic.Value(bool).init(false);
    pub fn create(_: u64, _: u32, dirty_log: bool) errors.Error!*Item {
        last_dirty_log.store(dirty_log, .release);
        if (fail_create.load(.acquire)) return errors.fail(.ioctl_failed, "fake: creation fails", .{});
        const it = std.heap.c_allocator.create(Item) catch return error.OutOfMemory;
        it.* = .{};
        _ = created.fetchAdd(1, .acq_rel);
        return it;
    }
    pub fn destroy(it: *Item) void {
        std.heap.c_allocator.destroy(it);
        _ = destroyed.fetchAdd(1, .acq_rel);
    }
    /// A copy source with a 1-byte memory stands for a restore that fails.
    pub fn restoreInto(_: *Item, _: *const state.Parsed, src: Source, times: *restore_mod.Times) errors.Error!void {
        if (src == .copy and src.copy.memory.len == 1) return errors.fail(.shape, "fake: restore fails", .{});
        times.* = .{};
    }
    /// The hints the pool passed to new items, in order (first byte, or 0xEE for none yet).
    var populated = std.atomic.Value(u32).init(0);
    var last_hint = std.atomic.Value(u8).init(0xEE);
    pub fn populate(_: *Item, map: []const u8, _: anytype) void {
        last_hint.store(map[0], .release);
        _ = populated.fetchAdd(1, .acq_rel);
    }
    pub fn resetForReuse(_: *Item) errors.Error!void {}
    pub fn reopen(_: *Item) void {}
    pub fn resetsTo(it: *const Item, snap: *const snapshot.Snapshot) bool {
        return it.resets_to == snap;
    }
    pub fn resettable(it: *const Item) bool {
        return it.resets_to != null;
    }
    var fail_prepare = std.atomic.Value(bool).init(false);
    var snap_refs = std.atomic.Value(i32).init(0);
    pub fn prepareInto(it: *Item, snap: *snapshot.Snapshot, _: restore_mod.Strategy, _: *restore_mod.Times) errors.Error!void {
        if (fail_prepare.load(.acquire)) return errors.fail(.shape, "fake: prepare fails", .{});
        it.resets_to = snap;
    }
    pub fn setIdentity(it: *Item, identity: u64) void {
        it.identity = identity;
    }
    pub fn retainSnap(snap: *snapshot.Snapshot) *snapshot.Snapshot {
        _ = snap_refs.fetchAdd(1, .acq_rel);
        return snap;
    }
    pub fn releaseSnap(_: *snapshot.Snapshot) void {
        _ = snap_refs.fetchSub(1, .acq_rel);
    }

    fn allFreed() bool {
        return created.load(.acquire) == destroyed.load(.acquire) and snap_refs.load(.acquire) == 0;
    }
};

const FakePool = pool.PoolOf(Fake);
const test_cfg = pool.Config{ .memory_bytes = boot.min_memory_bytes, .vcpus = 1, .min_size = 2, .max_size = 4, .max_in_use = 0 };
const test_parsed = state.Parsed{ .vcpus = 1, .memory_bytes = boot.min_memory_bytes, .per_vcpu = @splat(@splat(null)), .vm = @splat(null) };
const ok_source: restore_mod.MemorySource = .{ .copy = .{ .memory = &.{}, .page_map = &.{}, .packed_layout = false, .source_guard = null } };
const failing_source: restore_mod.MemorySource = .{ .copy = .{ .memory = "x", .page_map = &.{}, .packed_layout = false, .source_guard = null } };

fn testRestore(p: *FakePool, src: restore_mod.MemorySource, wait_ns: u64) errors.Error!*Fake.Item {
    return testRestoreFor(p, src, false, wait_ns);
}

fn testRestoreFor(p: *FakePool, src: restore_mod.MemorySource, resettable: bool, wait_ns: u64) errors.Error!*Fake.Item {
    var t: restore_mod.Times = .{};
    var acquire: u64 = 0;
    var hit = false;
    var seq: u64 = 0;
    return p.restore(&test_parsed, src, resettable, wait_ns, &t, &acquire, &hit, &seq);
}

/// Waits (bounded) until the background threads made `cond` true.
fn eventually(p: *FakePool, comptime cond: fn (pool.Stats) bool) !void {
    var i: usize = 0;
    while (!cond(p.stats())) : (i += 1) {
        if (i > 2000) return error.TestTimeout;
        _ = std.os.linux.nanosleep(&.{ .sec = 0, .nsec = std.time.ns_per_ms }, null);
    }
}

/// Expects each field of `want` (a struct literal of pool.Stats names) to
/// equal the pool's count of that name.
fn expectStats(p: *FakePool, want: anytype) !void {
    const s = p.stats();
    inline for (@typeInfo(@TypeOf(want)).@"struct".field_names) |name|
        try std.testing.expectEqual(@as(@TypeOf(@field(s, name)), @field(want, name)), @field(s, name));
}

/// Drops the test's handle and checks that every item and snapshot reference went.
fn closeAllFreed(p: *FakePool) !void {
    p.releaseHandle();
    try std.testing.expect(Fake.allFreed());
}

test "pool: restores and releases balance; close frees every item" {
    const p = try FakePool.create(test_cfg);
    try std.testing.expect(p.idleCount() >= 2);
    var items: [3]*Fake.Item = undefined;
    for (&items) |*it| it.* = try testRestore(p, ok_source, 0);
    const s = p.stats();
    try std.testing.expectEqual(@as(u32, 3), s.in_use);
    try std.testing.expectEqual(@as(u64, 3), s.restores);
    try std.testing.expectEqual(s.restores, s.hits + s.misses);
    try std.testing.expect(s.hits >= 2);
    for (items) |it| p.release(it);
    try eventually(p, struct {
        fn f(st: pool.Stats) bool {
            return st.in_use == 0 and st.pending_destroy == 0 and st.destroyed == st.releases;
        }
    }.f);
    try closeAllFreed(p);
}

test "pool: a failed restore is counted and rolled back" {
    const p = try FakePool.create(test_cfg);
    try std.testing.expectError(error.Snapshot, testRestore(p, failing_source, 0));
    try expectStats(p, .{ .in_use = 0, .failures = 1, .restores = 0 });
    try closeAllFreed(p);
}

test "pool: max_in_use refuses at once, or after the wait" {
    var cfg = test_cfg;
    cfg.max_in_use = 1;
    const p = try FakePool.create(cfg);
    const it = try testRestore(p, ok_source, 0);
    try std.testing.expectError(error.PoolExhausted, testRestore(p, ok_source, 0));
    try std.testing.expectError(error.PoolExhausted, testRestore(p, ok_source, std.time.ns_per_ms));
    p.release(it);
    const again = try testRestore(p, ok_source, 0);
    p.release(again);
    try closeAllFreed(p);
}

test "pool: a shell that cannot be made fails the restore, counted, nothing in use" {
    var cfg = test_cfg;
    cfg.min_size = 0;
    const p = try FakePool.create(cfg);
    Fake.fail_create.store(true, .release);
    defer Fake.fail_create.store(false, .release);
    try std.testing.expectError(error.KvmFailed, testRestore(p, ok_source, 0));
    try expectStats(p, .{ .in_use = 0, .misses = 1 });
    try std.testing.expect(p.stats().failures >= 1);
    try closeAllFreed(p);
}

test "pool: a parked item is reset off the caller's path and reused for its snapshot only" {
    const p = try FakePool.create(test_cfg);
    const snap: *const snapshot.Snapshot = @ptrFromInt(0x1000);
    const other: *const snapshot.Snapshot = @ptrFromInt(0x2000);
    const it = try testRestore(p, ok_source, 0);
    it.resets_to = snap;
    try p.parkOnRelease(it);
    p.release(it);
    try eventually(p, struct {
        fn f(st: pool.Stats) bool {
            return st.parked == 1;
        }
    }.f);
    var seq: u64 = 0;
    var took: restore_mod.Strategy = .auto;
    try std.testing.expectEqual(@as(?*Fake.Item, null), p.reuse(other, true, &seq, &took));
    try std.testing.expectEqual(@as(?*Fake.Item, it), p.reuse(snap, true, &seq, &took));
    try expectStats(p, .{ .reuses = 1, .in_use = 1 });
    var timing: [1]pool.Timing = undefined;
    try std.testing.expectEqual(@as(usize, 1), p.copyTimings(&timing));
    try std.testing.expectEqual(restore_mod.Strategy.reuse, timing[0].strategy);
    p.release(it); // parks again (reuse re-arms parking)
    try closeAllFreed(p);
}

test "pool: a closed pool answers until its handle goes; with items out, the last release frees it" {
    const p = try FakePool.create(test_cfg);
    try p.prepare(snap_a, 1, .copy, false);
    const id = p.targetId(snap_a);
    const a = try testRestore(p, ok_source, 0);
    const b = try testRestore(p, ok_source, 0);
    p.close();
    try std.testing.expectError(error.Closed, testRestore(p, ok_source, 0));
    var seq: u64 = 0;
    try std.testing.expectEqual(@as(?*Fake.Item, null), p.takePrepared(id, &seq));
    p.release(a);
    // No item out, but the handle is held: still answers (a caller's thread
    // racing close() needs no guard of its own).
    try std.testing.expectError(error.Closed, testRestore(p, ok_source, 0));
    try std.testing.expectEqual(@as(u32, 0), p.targetId(snap_a));
    p.releaseHandle();
    p.release(b); // frees the pool
    try std.testing.expect(Fake.allFreed());
}

test "pool: a take by target id finds only that target, and never a given-up one" {
    const p = try FakePool.create(test_cfg);
    defer p.releaseHandle();
    try p.prepare(snap_a, 1, .copy, false);
    try p.prepare(snap_b, 1, .copy, false);
    const id_a = p.targetId(snap_a);
    const id_b = p.targetId(snap_b);
    try std.testing.expect(id_a != 0 and id_b != 0 and id_a != id_b);
    try std.testing.expectEqual(@as(u64, 0), p.targetId(snap_c));
    var seq: u64 = 0;
    const it = p.takePrepared(id_a, &seq).?;
    try std.testing.expect(Fake.resetsTo(it, snap_a));
    var timing: [1]pool.Timing = undefined;
    _ = p.copyTimings(&timing);
    try std.testing.expectEqual(restore_mod.Strategy.prepared, timing[0].strategy);
    try std.testing.expectEqual(@as(?*Fake.Item, null), p.takePrepared(id_a, &seq)); // none ready
    p.release(it);
    try p.prepare(snap_a, 0, .copy, false);
    try std.testing.expectEqual(@as(?*Fake.Item, null), p.takePrepared(id_a, &seq));
    try p.prepare(snap_a, 1, .copy, false);
    const again = p.targetId(snap_a);
    try std.testing.expect(again != id_a and again != id_b); // ids are never reused
    try std.testing.expectEqual(@as(?*Fake.Item, null), p.takePrepared(id_a, &seq));
    p.release(p.takePrepared(again, &seq).?);
}

test "pool: configuration limits" {
    var cfg = test_cfg;
    cfg.max_size = 0;
    try std.testing.expectError(error.Config, FakePool.checkConfig(cfg));
    cfg.max_size = pool.max_pool_size + 1;
    try std.testing.expectError(error.Config, FakePool.checkConfig(cfg));
    cfg.max_size = 2;
    cfg.min_size = 3;
    try std.testing.expectError(error.Config, FakePool.checkConfig(cfg));
}

const snap_a: *snapshot.Snapshot = @ptrFromInt(0x1000);
const snap_b: *snapshot.Snapshot = @ptrFromInt(0x2000);
const snap_c: *snapshot.Snapshot = @ptrFromInt(0x3000);

fn takePrepared(p: *FakePool, snap: *const snapshot.Snapshot) ?*Fake.Item {
    var seq: u64 = 0;
    var took: restore_mod.Strategy = .auto;
    const it = p.reuse(snap, false, &seq, &took) orelse return null;
    std.debug.assert(took == .prepared);
    return it;
}

test "pool: prepare keeps n ready per snapshot; a take is prepared, a release keeps it, 0 gives them up" {
    const p = try FakePool.create(test_cfg);
    try p.prepare(snap_a, 2, .copy, false);
    try std.testing.expectEqual(@as(u32, 2), p.preparedCount(snap_a));
    try std.testing.expectEqual(@as(u32, 0), p.preparedCount(snap_b));
    try std.testing.expectEqual(@as(u64, 2), p.stats().prepared);
    try std.testing.expectEqual(@as(?*Fake.Item, null), takePrepared(p, snap_b));
    const it = takePrepared(p, snap_a).?;
    try std.testing.expectEqual(@as(u32, 1), p.stats().in_use);
    var timing: [1]pool.Timing = undefined;
    _ = p.copyTimings(&timing);
    try std.testing.expectEqual(restore_mod.Strategy.prepared, timing[0].strategy);
    // The refill thread brings the ready count back to 2; the release adds the taken one.
    try eventually(p, struct {
        fn f(st: pool.Stats) bool {
            return st.prepared == 2;
        }
    }.f);
    p.release(it);
    try eventually(p, struct {
        fn f(st: pool.Stats) bool {
            return st.prepared == 3 and st.in_use == 0;
        }
    }.f);
    try std.testing.expectEqual(@as(u64, 0), p.stats().pending_destroy + p.stats().destroyed);
    try p.setTarget(snap_a, 0, .copy, false, false);
    try std.testing.expectEqual(@as(u64, 0), p.stats().prepared);
    try std.testing.expectEqual(@as(u32, 0), p.targets_len);
    try closeAllFreed(p);
}

test "pool: a failing prepare leaves nothing prepared and is counted" {
    const p = try FakePool.create(test_cfg);
    Fake.fail_prepare.store(true, .release);
    defer Fake.fail_prepare.store(false, .release);
    try std.testing.expectError(error.Snapshot, p.prepare(snap_a, 2, .copy, false));
    try std.testing.expectEqual(@as(u32, 0), p.targets_len);
    try std.testing.expectEqual(@as(u64, 0), p.stats().prepared);
    try std.testing.expect(p.stats().failures >= 1);
    try closeAllFreed(p);
}

test "pool: the targets of all snapshots stay within max_size" {
    const p = try FakePool.create(test_cfg);
    try p.setTarget(snap_a, 3, .copy, true, false);
    try std.testing.expectError(error.PoolExhausted, p.setTarget(snap_b, 2, .copy, true, false));
    try p.setTarget(snap_b, 1, .copy, true, false);
    try p.setTarget(snap_a, 2, .copy, true, false); // lowering is fine
    try closeAllFreed(p);
}

test "pool: an external target is prepared by the caller; a failed warmup destroys its item" {
    const p = try FakePool.create(test_cfg);
    try p.setTarget(snap_a, 1, .copy, true, false);
    try std.testing.expect(try p.waitPrepareNeed(std.time.ns_per_ms));
    const bad = (try p.prepareBegin(snap_a)).?;
    try p.prepareEnd(bad, snap_a, true, false);
    try expectStats(p, .{ .failures = 1, .prepared = 0 });
    const good = (try p.prepareBegin(snap_a)).?;
    try std.testing.expectEqual(@as(?*Fake.Item, null), try p.prepareBegin(snap_a)); // one in flight meets the target
    try p.prepareEnd(good, snap_a, true, true);
    try std.testing.expectEqual(@as(u64, 1), p.stats().prepared);
    try std.testing.expect(!try p.waitPrepareNeed(std.time.ns_per_ms));
    const it = takePrepared(p, snap_a).?;
    try std.testing.expect(try p.waitPrepareNeed(std.time.ns_per_ms)); // short after the take
    p.close(); // with `it` out the pool lives on until its release
    try std.testing.expectError(error.Closed, p.waitPrepareNeed(0));
    p.releaseHandle();
    p.release(it);
    try std.testing.expect(Fake.allFreed());
}

test "pool: takes of a target with identity get distinct nonzero identities, others keep 0" {
    const p = try FakePool.create(test_cfg);
    try p.prepare(snap_a, 1, .copy, true);
    try p.prepare(snap_b, 1, .copy, false);
    var seen: [8]u64 = undefined;
    for (&seen, 0..) |*id, i| {
        const it = takePrepared(p, snap_a).?;
        id.* = it.identity;
        try std.testing.expect(id.* != 0);
        for (seen[0..i]) |other| try std.testing.expect(other != id.*);
        p.release(it);
        try eventually(p, struct {
            fn f(st: pool.Stats) bool {
                return st.in_use == 0 and st.prepared >= 2;
            }
        }.f);
    }
    const plain = takePrepared(p, snap_b).?;
    try std.testing.expectEqual(@as(u64, 0), plain.identity);
    p.release(plain);
    try closeAllFreed(p);
}

test "pool: past a backlog of max_dead_backlog queued destroys, a release destroys on the caller's thread" {
    const p = try FakePool.create(test_cfg);
    const n = pool.max_dead_backlog + 10;
    const items = try std.heap.c_allocator.alloc(*Fake.Item, n);
    defer std.heap.c_allocator.free(items);
    for (items) |*it| it.* = try testRestore(p, ok_source, 0);
    p.holdReapers(true);
    const before = p.stats();
    for (items, 0..) |it, i| {
        p.release(it);
        try std.testing.expectEqual(@as(u64, @min(i + 1, pool.max_dead_backlog)), p.stats().pending_destroy);
    }
    try std.testing.expectEqual(@as(u64, 10), p.stats().destroyed - before.destroyed);
    p.holdReapers(false);
    try eventually(p, struct {
        fn f(st: pool.Stats) bool {
            return st.pending_destroy == 0 and st.in_use == 0;
        }
    }.f);
    try closeAllFreed(p);
}

fn refilled(s: pool.Stats) bool {
    return s.idle >= test_cfg.min_size and s.creating == 0;
}

test "pool: new shells fit the latest restore: its page map populated after a copy, none after a map; its dirty log" {
    const p = try FakePool.create(test_cfg);
    try std.testing.expectEqual(@as(u32, 0), Fake.populated.load(.acquire)); // no restore yet: no hint
    try std.testing.expect(Fake.last_dirty_log.load(.acquire)); // ... and the dirty log, as before
    var map: [8]u8 = @splat(0xAB);
    const copy_src: restore_mod.MemorySource = .{ .copy = .{ .memory = &.{}, .page_map = &map, .packed_layout = false, .source_guard = null } };
    const a = try testRestore(p, copy_src, 0);
    try eventually(p, refilled);
    try std.testing.expectEqual(@as(u32, 1), Fake.populated.load(.acquire));
    try std.testing.expectEqual(@as(u8, 0xAB), Fake.last_hint.load(.acquire));
    try std.testing.expect(!Fake.last_dirty_log.load(.acquire));
    p.release(a);
    const b = try testRestoreFor(p, .{ .map = .{ .snap = undefined } }, true, 0); // Fake never reads the snapshot
    try eventually(p, refilled);
    try std.testing.expectEqual(@as(u32, 1), Fake.populated.load(.acquire));
    try std.testing.expect(Fake.last_dirty_log.load(.acquire));
    p.release(b);
    try closeAllFreed(p);
}
