//! The restore layer: puts a snapshot's memory and state into a fresh shell.
//!
//! ONE `Strategy` enum names how memory arrives; the core, the C ABI
//! (kvmlab_strategy) and the pool's timing records all use it. Each strategy
//! except `auto` is one arm of `MemorySource`, whose payload type says how
//! that memory is chosen (`fromSnapshot`) and put in place (`apply`).
//! Adding a strategy: one Strategy member, one MemorySource arm (with its
//! payload type); the `inline else` switches below need no change.
const std = @import("std");
const errors = @import("errors.zig");
const shell = @import("shell.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const safe = @import("safe.zig");

pub const Strategy = enum(c_int) {
    /// `map` for a file-backed snapshot (Snapshot.load), else `copy`.
    auto = 0,
    copy = 1,
    map = 2,
    /// Chosen by a pool: a VM parked after its reset to the same snapshot.
    reuse = 3,
    /// Chosen by a pool: a VM the pool prepared for this snapshot
    /// (RestorePool.prepare: restored, maybe warmed and reset, kept ready).
    prepared = 4,
};

/// Copy the present pages from dense (or packed) memory into guest memory.
pub const Copy = struct {
    memory: []const u8,
    page_map: []const u8,
    packed_layout: bool,
    /// How reads of `memory` stay safe (safe.copyGuarded): null for anonymous
    /// memory, the snapshot's guard for a loaded file, Guard.unknown for a
    /// caller's buffer.
    source_guard: ?safe.Guard,

    pub const fresh_shell = true;

    pub fn fromSnapshot(s: *snapshot.Snapshot) errors.Error!Copy {
        return .{ .memory = s.memory, .page_map = s.parsed.pageMap(), .packed_layout = false, .source_guard = s.memoryGuard() };
    }
    pub fn apply(c: Copy, vm: *shell.Vm, _: *Mapping) errors.Error!void {
        try snapshot.copyPresent(vm.mem, c.memory, c.page_map, c.packed_layout, c.source_guard);
    }
};

/// Map a loaded snapshot's file copy-on-write over guest memory: O(1) in
/// memory size. The machine keeps the snapshot (and so its fd) alive.
pub const Map = struct {
    snap: *snapshot.Snapshot,

    pub const fresh_shell = true;

    pub fn fromSnapshot(s: *snapshot.Snapshot) errors.Error!Map {
        if (!s.fileBacked()) return errors.fail(.strategy_needs_file, "strategy 'map' needs a file-backed snapshot (Snapshot.load); use 'copy'", .{});
        return .{ .snap = s };
    }
    pub fn apply(m: Map, vm: *shell.Vm, mapping: *Mapping) errors.Error!void {
        try vm.mapFile(m.snap.fd, m.snap.memory_offset);
        mapping.source = m.snap.retain();
    }
};

/// A VM a pool chose because memory and state are already the snapshot's:
/// nothing is applied, and a caller cannot ask for one (`refusal` says why).
fn AlreadyThere(comptime refusal: []const u8) type {
    return struct {
        const Self = @This();
        pub const fresh_shell = false;

        pub fn fromSnapshot(_: *snapshot.Snapshot) errors.Error!Self {
            return errors.fail(.strategy_pool_only, refusal, .{});
        }
        pub fn apply(_: Self, vm: *shell.Vm, _: *Mapping) errors.Error!void {
            std.debug.assert(vm.booted);
        }
    };
}

/// A pooled VM that its pool reset to this snapshot after a release.
pub const Reuse = AlreadyThere("strategy 'reuse' is chosen by a pool (reset_on_release), not by the caller");
/// A VM the pool prepared for this snapshot (restored, maybe warmed up and reset).
pub const Prepared = AlreadyThere("strategy 'prepared' is chosen by a pool (RestorePool.prepare), not by the caller");

pub const MemorySource = union(enum) {
    copy: Copy,
    map: Map,
    reuse: Reuse,
    prepared: Prepared,

    pub fn strategy(src: MemorySource) Strategy {
        return switch (src) {
            inline else => |_, tag| @field(Strategy, @tagName(tag)),
        };
    }

    /// The bare memory operation of a restore (the benchmark floor times
    /// exactly this too).
    pub fn apply(src: MemorySource, vm: *shell.Vm, mapping: *Mapping) errors.Error!void {
        switch (src) {
            inline else => |x| try x.apply(vm, mapping),
        }
    }

    fn freshShell(src: MemorySource) bool {
        return switch (src) {
            inline else => |x| @TypeOf(x).fresh_shell,
        };
    }

    /// The source for restoring `s` with `strategy` (`auto` resolved here).
    pub fn forSnapshot(s: *snapshot.Snapshot, strategy_: Strategy) errors.Error!MemorySource {
        const chosen: Strategy = if (strategy_ == .auto) (if (s.fileBacked()) .map else .copy) else strategy_;
        const info = @typeInfo(MemorySource).@"union";
        inline for (info.field_names, info.field_types) |name, T| {
            if (chosen == @field(Strategy, name)) return @unionInit(MemorySource, name, try T.fromSnapshot(s));
        }
        unreachable; // every Strategy but auto is an arm (asserted below)
    }
};

comptime {
    for (@typeInfo(Strategy).@"enum".field_names) |name| {
        if (!std.mem.eql(u8, name, "auto") and !@hasField(MemorySource, name))
            @compileError("Strategy." ++ name ++ " needs a MemorySource arm");
    }
    for (@typeInfo(MemorySource).@"union".field_names) |name| _ = @field(Strategy, name);
}

/// What a restore leaves on a machine that must outlive it: the snapshot a
/// `map` restore maps (retained: its fd backs guest memory).
pub const Mapping = struct {
    source: ?*snapshot.Snapshot = null,

    pub fn release(m: *Mapping) void {
        if (m.source) |s| s.release();
        m.source = null;
    }
    /// The page map of the mapped snapshot (capture reads its pages too).
    pub fn sourceMap(m: *const Mapping) ?[]const u8 {
        return if (m.source) |s| s.parsed.pageMap() else null;
    }
};

/// Per-phase times of one restore, integer nanoseconds.
pub const Times = struct { memory_ns: u64 = 0, vcpu_ns: u64 = 0, devices_ns: u64 = 0 };

pub fn checkShape(vm: *const shell.Vm, parsed: *const state.Parsed) errors.Error!void {
    if (parsed.memory_bytes != vm.mem.len or parsed.vcpus != vm.vcpu_count)
        return errors.fail(.shape, "snapshot is {d} MiB with {d} vCPU(s); the VM shell is {d} MiB with {d} vCPU(s)", .{ parsed.memory_bytes >> 20, parsed.vcpus, vm.mem.len >> 20, vm.vcpu_count });
}

/// Restores into a fresh shell (never run, zeroed memory) of the same
/// shape: checks, then the memory source, then the state (state.restore).
pub fn restoreInto(vm: *shell.Vm, mapping: *Mapping, parsed: *const state.Parsed, src: MemorySource, times: *Times) errors.Error!void {
    try checkShape(vm, parsed);
    if (!src.freshShell()) {
        try src.apply(vm, mapping);
        times.* = .{};
        return;
    }
    if (vm.booted) return errors.fail(.vm_has_guest, "restore needs an empty VM shell", .{});
    try state.checkHost(parsed, vm);
    try bare(vm, mapping, parsed, src, times);
}

/// The bare operations of a restore into a fresh shell, timed per phase: the
/// memory source's apply, then state.apply.
fn bare(vm: *shell.Vm, mapping: *Mapping, parsed: *const state.Parsed, src: MemorySource, times: *Times) errors.Error!void {
    const t0 = shell.monotonicNs();
    try src.apply(vm, mapping);
    const t1 = shell.monotonicNs();
    var st: state.RestoreTimes = .{};
    try state.apply(vm, parsed, &st);
    times.* = .{ .memory_ns = t1 - t0, .vcpu_ns = st.vcpu_ns, .devices_ns = st.devices_ns };
}

/// The restore floor: the bare operations of restoreInto (`bare`), none of
/// its checks. Benchmarks divide
/// a restore's time by this; `vm` is a fresh shell of the snapshot's shape.
pub fn floor(vm: *shell.Vm, mapping: *Mapping, parsed: *const state.Parsed, src: MemorySource, times: *Times) errors.Error!void {
    if (vm.booted or !src.freshShell()) return errors.fail(.floor_shell, "the floor needs a fresh shell and a copy or map source", .{});
    try checkShape(vm, parsed);
    try bare(vm, mapping, parsed, src, times);
}

test "restore: every strategy but auto is a memory source, by name" {
    try std.testing.expectEqual(Strategy.copy, (MemorySource{ .copy = .{ .memory = &.{}, .page_map = &.{}, .packed_layout = false, .source_guard = null } }).strategy());
    try std.testing.expectEqual(Strategy.reuse, (MemorySource{ .reuse = .{} }).strategy());
    try std.testing.expect(!(MemorySource{ .reuse = .{} }).freshShell());
    try std.testing.expectEqual(@typeInfo(Strategy).@"enum".field_names.len - 1, @typeInfo(MemorySource).@"union".field_names.len);
}
