//! Fitting a pool's new shells to the restores it served: the pool learns
//! from its latest restore (`Hint`) and makes the next shells the way that
//! restore would have wanted them, off the caller's path. Two things, each
//! measured here (2026-12-02, kvm_pvm):
//!
//! Resident pages. A copy restore writes every present page of its snapshot
//! into the shell's fresh anonymous memory, and the first write to each page
//! is a page fault (allocate, zero, map): 16 MiB copied into 64 MiB took
//! 8.5 ms with the faults, 0.6 ms into memory already resident. So the refill
//! makes the latest copy restore's present pages resident in each new shell
//! (`populate`: MADV_POPULATE_WRITE). The pages stay zero, which is what a
//! fresh shell's memory must be, so a shell is right for any snapshot; one
//! that needs other pages faults those. A map restore replaces the shell's
//! memory (freeing resident pages on the caller's path), so after one the
//! pool populates nothing. The cost: an idle shell holds the hinted pages
//! (what the next copy restore would make resident anyway).
//!
//! Dirty logging. A resettable VM needs KVM's dirty log on its memory slot,
//! and turning it on later costs the restore up to ~6 ms. But a logged slot
//! makes the guest's first write to each page fault once more: a dense
//! guest's first run took 16.1 ms logged and 5.9 ms not. So a new shell logs
//! when the latest restore was resettable (and before any restore, as every
//! shell did before); a VM that wants the other kind still works (a
//! resettable restore turns logging on; a plain one runs logged).
const std = @import("std");
const linux = std.os.linux;
const boot = @import("boot.zig");
const snapshot = @import("snapshot.zig");
const restore = @import("restore.zig");
const signals = @import("signals.zig");

const allocator = std.heap.c_allocator;

/// MADV_POPULATE_WRITE (Linux 5.14, uapi asm-generic/mman-common.h); Zig's
/// std does not name it. An older kernel answers EINVAL: nothing is populated.
const madv_populate_write: u32 = 23;

/// Pages made resident per madvise call: between two, `populate` asks whether
/// to stop (a pool that is closing waits for at most one chunk).
pub const chunk_pages: u64 = 1024;

/// What the pool learned from its latest restore. Under the pool's lock.
pub const Hint = struct {
    /// pageMapBytes(memory_bytes) once a copy restore set it (at most
    /// 128 KiB: boot.max_memory_bytes / page / 8).
    map: []u8 = &.{},
    valid: bool = false,
    /// The page map `map` was copied from: the same snapshot restored again
    /// skips the copy. A new snapshot at a freed one's address skips it too;
    /// then the hint is stale, which costs speed only (see the top comment).
    from: ?[*]const u8 = null,
    /// Whether new shells get KVM's dirty log (the latest restore was resettable).
    dirty_log: bool = true,

    /// After a restore into a fresh shell from `src`: a copy restore's page
    /// map is the hint, any other restore clears it; `resettable` decides
    /// the dirty log.
    pub fn learn(h: *Hint, src: restore.MemorySource, resettable: bool) void {
        h.dirty_log = resettable;
        const page_map: []const u8 = switch (src) {
            .copy => |c| c.page_map,
            else => &.{},
        };
        if (page_map.len == 0) {
            h.valid = false;
            h.from = null;
            return;
        }
        if (h.valid and h.from == page_map.ptr) return;
        if (h.map.len != page_map.len) {
            allocator.free(h.map);
            h.map = allocator.alloc(u8, page_map.len) catch &.{};
        }
        h.valid = h.map.len == page_map.len;
        if (!h.valid) return; // out of memory: no hint, shells fault as before
        @memcpy(h.map, page_map);
        h.from = page_map.ptr;
    }

    /// A copy of the page map for `populate` (which runs without the lock),
    /// or null: none learned, or no memory for the copy. Free it with `allocator`.
    pub fn pageMapCopy(h: *const Hint) ?[]u8 {
        if (!h.valid) return null;
        return allocator.dupe(u8, h.map) catch null;
    }

    pub fn deinit(h: *Hint) void {
        allocator.free(h.map);
        h.* = .{};
    }
};

/// When a pool's warm() or a shell's populate stops early: the pool closing,
/// or a stop signal (Ctrl-C) caught since it began. Python raises the
/// KeyboardInterrupt as the call returns; a shell left half populated faults
/// the rest in its restore, as any shell would.
pub fn Stop(comptime Pool: type) type {
    return struct {
        pool: Pool,
        seen: u64,

        pub fn signalled(s: @This()) bool {
            return signals.caughtSince(s.seen);
        }
        pub fn stopping(s: @This()) bool {
            return s.signalled() or s.pool.isClosed();
        }
    };
}

pub fn stopFor(pool: anytype) Stop(@TypeOf(pool)) {
    return .{ .pool = pool, .seen = signals.caughtCount() };
}

/// Makes the present pages of `map` resident in `mem` (zero-filled), chunk by
/// chunk, until `stop.stopping()` says to stop. Returns the pages populated.
/// Best effort: a refusal (old kernel, no memory) ends it; the restore then
/// faults the pages in as it would have.
pub fn populate(mem: []u8, map: []const u8, stop: anytype) u64 {
    const pages = mem.len / boot.page_bytes;
    if (map.len * 8 < pages) return 0; // another shape's map: a hint never is (one pool, one shape)
    var done: u64 = 0;
    var i: u64 = 0;
    while (i < pages) {
        if (!snapshot.isPresent(map, i)) {
            i += 1;
            continue;
        }
        var j = i;
        while (j < pages and j - i < chunk_pages and snapshot.isPresent(map, j)) j += 1;
        if (stop.stopping()) return done;
        const rc = linux.madvise(mem[@intCast(i * boot.page_bytes)..].ptr, @intCast((j - i) * boot.page_bytes), madv_populate_write);
        if (linux.errno(rc) != .SUCCESS) return done;
        done += j - i;
        i = j;
    }
    return done;
}

/// Pages of `mem` resident in this process (mincore), for tests and
/// benchmarks: what a shell holds before any restore. 0 if the kernel refuses.
pub fn residentPages(mem: []const u8) u64 {
    const window_pages = 4096; // one mincore vector on the stack
    var vec: [window_pages]u8 = undefined;
    const pages = mem.len / boot.page_bytes;
    var n: u64 = 0;
    var i: u64 = 0;
    while (i < pages) : (i += window_pages) {
        const k = @min(window_pages, pages - i);
        const at: [*]u8 = @constCast(mem[@intCast(i * boot.page_bytes)..].ptr);
        if (linux.errno(linux.mincore(at, @intCast(k * boot.page_bytes), &vec)) != .SUCCESS) return 0;
        for (vec[0..k]) |v| n += v & 1;
    }
    return n;
}

const Never = struct {
    fn stopping(_: Never) bool {
        return false;
    }
};

test "fit: a copy restore's page map is the hint, a map restore clears it, the same map is not copied again" {
    var h: Hint = .{};
    defer h.deinit();
    try std.testing.expect(h.pageMapCopy() == null and h.dirty_log); // before any restore: as every shell was

    var map = [_]u8{ 0b0000_0101, 0 };
    const copy_src: restore.MemorySource = .{ .copy = .{ .memory = &.{}, .page_map = &map, .packed_layout = false, .source_guard = null } };
    h.learn(copy_src, false);
    try std.testing.expect(!h.dirty_log);
    const got = h.pageMapCopy().?;
    defer allocator.free(got);
    try std.testing.expectEqualSlices(u8, &map, got);
    map[1] = 1; // same address: taken for the same snapshot, not copied again
    h.learn(copy_src, false);
    try std.testing.expectEqual(@as(u8, 0), h.map[1]);
    h.learn(.{ .map = .{ .snap = undefined } }, true);
    try std.testing.expect(h.pageMapCopy() == null and h.dirty_log);
    h.learn(copy_src, false); // after a map restore the copy is taken again
    try std.testing.expectEqual(@as(u8, 1), h.map[1]);
}

test "fit: populate makes exactly the present pages resident, in chunks, and stops when told" {
    const pages = 2 * chunk_pages + 8;
    const bytes = pages * boot.page_bytes;
    const addr = linux.mmap(null, bytes, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .ANONYMOUS = true }, -1, 0);
    try std.testing.expectEqual(linux.E.SUCCESS, linux.errno(addr));
    const mem = @as([*]u8, @ptrFromInt(addr))[0..bytes];
    defer _ = linux.munmap(mem.ptr, mem.len);
    var map: [(pages + 7) / 8]u8 = @splat(0);
    // Page 1, and a run from page 8 over two chunks' worth.
    map[0] = 0b10;
    for (8..pages) |p| map[p / 8] |= @as(u8, 1) << @intCast(p % 8);
    const done = populate(mem, &map, Never{});
    if (done == 0) return error.SkipZigTest; // a kernel without MADV_POPULATE_WRITE
    try std.testing.expectEqual(@as(u64, 1 + pages - 8), done);
    var resident: [pages]u8 = @splat(0);
    try std.testing.expectEqual(@as(usize, 0), linux.mincore(mem.ptr, mem.len, &resident));
    for (0..pages) |p| try std.testing.expectEqual(snapshot.isPresent(&map, p), resident[p] & 1 != 0);
    try std.testing.expectEqual(done, residentPages(mem));
    try std.testing.expect(std.mem.allEqual(u8, mem, 0));

    const Once = struct {
        calls: *u32,
        fn stopping(s: @This()) bool {
            s.calls.* += 1;
            return s.calls.* > 2;
        }
    };
    var calls: u32 = 0;
    try std.testing.expectEqual(@as(u64, 1 + chunk_pages), populate(mem, &map, Once{ .calls = &calls }));
}
