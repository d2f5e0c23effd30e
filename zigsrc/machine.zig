//! A machine is what a kvmlab_vm handle points to: a shell plus what the
//! restore and reset layers attached to it (each layer owns its own part:
//! restore.Mapping, reset.Resettable). Pools hold machines (`Factory`).
const std = @import("std");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const shell = @import("shell.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const restore = @import("restore.zig");
const reset = @import("reset.zig");
const safe = @import("safe.zig");
const fit = @import("fit.zig");
const Snapshot = snapshot.Snapshot;

const allocator = std.heap.c_allocator;

/// Told the duration of a machine's next run, once: a pool's timing record of
/// the restore that handed the machine out (first_run_ns). Set by whoever
/// hands it out (the C ABI's pool calls), so that no caller has to report it.
pub const FirstRunNote = struct {
    ctx: *anyopaque,
    seq: u64,
    record: *const fn (ctx: *anyopaque, seq: u64, run_ns: u64) void,
};

pub const Machine = struct {
    shell: *shell.Vm,
    mapping: restore.Mapping = .{},
    resettable: ?reset.Resettable = null,
    first_run: ?FirstRunNote = null,

    /// After a run that ended without an error: fires the first-run note, if any.
    pub fn noteRun(m: *Machine, run_ns: u64) void {
        const note = m.first_run orelse return;
        m.first_run = null;
        note.record(note.ctx, note.seq, run_ns);
    }

    /// A new empty shell in a machine (with everything: Vm.boot's).
    pub fn create(memory_bytes: u64, vcpus: u32) errors.Error!*Machine {
        return createWith(memory_bytes, vcpus, .{});
    }
    /// A shell for restores: the PIT only when a snapshot needs it (state.zig
    /// makes it then; the pristine state it compares with is read here, off
    /// the restore path, once per process).
    pub fn createWith(memory_bytes: u64, vcpus: u32, opts: shell.Vm.Options) errors.Error!*Machine {
        const vm = try shell.Vm.createWith(memory_bytes, vcpus, opts);
        errdefer vm.destroy(); // the shell owns a given vm_fd from its first line: nothing leaks below
        if (!opts.pit) _ = try state.pristinePit();
        const m = allocator.create(Machine) catch return error.OutOfMemory;
        m.* = .{ .shell = vm };
        return m;
    }

    /// Frees the shell, then what the layers attached (the mapped snapshot
    /// outlives the mapping it backs).
    pub fn destroy(m: *Machine) void {
        m.shell.destroy();
        if (m.resettable) |*r| r.deinit();
        m.mapping.release();
        allocator.destroy(m);
    }

    pub fn restoreFrom(m: *Machine, parsed: *const state.Parsed, src: restore.MemorySource, times: *restore.Times) errors.Error!void {
        try restore.restoreInto(m.shell, &m.mapping, parsed, src, times);
    }

    /// The snapshot a `map` restore maps, if any.
    pub fn mappedFrom(m: *const Machine) ?*const Snapshot {
        return m.mapping.source;
    }

    pub fn capture(m: *Machine) errors.Error!*Snapshot {
        return snapshot.capture(m.shell, m.mapping.sourceMap());
    }

    /// Makes the machine resettable to `s` (idempotent), with hot resets
    /// (reset.makeHot: the pages its guest writes again stay writable).
    pub fn enableReset(m: *Machine, s: *Snapshot) errors.Error!void {
        if (m.resettable != null) return;
        m.resettable = try reset.Resettable.init(m.shell, s);
        reset.makeHot(m.shell, &m.resettable.?);
    }

    fn resettableOrFail(m: *Machine) errors.Error!*reset.Resettable {
        if (m.resettable) |*r| return r;
        return errors.fail(.not_resettable, "this VM was not restored with reset enabled (restore it with resettable=True)", .{});
    }

    pub fn resetTo(m: *Machine, mode: reset.Mode, times: *reset.Times) errors.Error!void {
        try reset.reset(m.shell, try m.resettableOrFail(), m.mappedFrom(), mode, times);
    }

    pub fn resetFloor(m: *Machine, times: *reset.Times) errors.Error!void {
        const r = try m.resettableOrFail();
        if (m.shell.running.swap(true, .acq_rel)) return errors.fail(.vm_running, "cannot reset a running VM", .{});
        defer m.shell.running.store(false, .release);
        try reset.floor(m.shell, r, false, times);
    }

    pub fn resetLoop(m: *Machine, inputs: []const u8, input_bytes: usize, input_gpa: u64, timeout_ns: u64, mode: reset.Mode, out: []reset.LoopResult) errors.Error!usize {
        return reset.loop(m.shell, try m.resettableOrFail(), m.mappedFrom(), inputs, input_bytes, input_gpa, timeout_ns, mode, out);
    }

    pub fn resetLoopVar(m: *Machine, inputs: []const u8, offsets: []const u64, input_gpa: u64, timeout_ns: u64, mode: reset.Mode, out: []reset.LoopResult, console: []u8, console_stride: usize) errors.Error!usize {
        return reset.loopVar(m.shell, try m.resettableOrFail(), m.mappedFrom(), inputs, offsets, input_gpa, timeout_ns, mode, out, console, console_stride);
    }

    /// Host reads and writes of guest memory: plain copies but where a
    /// mapped snapshot file is not covered by kvmlab's SIGBUS handler
    /// (shell.memoryGuard). A process_vm_readv per copy made a call() on a
    /// map-restored VM ~10 us slower than on a copied one (five per call).
    pub fn readMemory(m: *Machine, gpa: u64, out: []u8) errors.Error!void {
        const src = try m.shell.guestSlice(gpa, out.len);
        const guard = m.shell.memoryGuard();
        try safe.copyGuarded(out, src, guard);
        try safe.finish(guard);
    }

    pub fn writeMemory(m: *Machine, gpa: u64, bytes: []const u8) errors.Error!void {
        const dst = try m.shell.guestSlice(gpa, bytes.len);
        const guard = m.shell.memoryGuard();
        if (guard) |g| if (!g.fast and bytes.len > 0) {
            // Writing a private file page reads it first (copy-on-write):
            // make sure that read cannot fault.
            var probe: [1]u8 = undefined;
            var at: usize = 0;
            while (at < bytes.len) : (at += @intCast(boot.page_bytes - ((gpa + at) % boot.page_bytes))) try safe.copy(&probe, dst[at..][0..1]);
        };
        @memcpy(dst, bytes);
        if (m.resettable) |*r| r.noteHostWrite(gpa, bytes.len);
        try safe.finish(guard);
    }
};

/// How a pool makes, restores, resets and frees machines (pool.Pool's
/// factory; tests use one without KVM).
pub const Factory = struct {
    pub const Item = Machine;
    pub const Source = restore.MemorySource;

    /// A pool's shell; `dirty_log` for a resettable VM (see fit.zig).
    pub fn create(memory_bytes: u64, vcpus: u32, dirty_log: bool) errors.Error!*Machine {
        return Machine.createWith(memory_bytes, vcpus, .{ .pit = false, .dirty_log = dirty_log });
    }
    pub fn destroy(m: *Machine) void {
        m.destroy();
    }
    /// A new shell: make `map`'s pages resident (see fit.zig).
    pub fn populate(m: *Machine, map: []const u8, stop: anytype) void {
        _ = fit.populate(m.shell.mem, map, stop);
    }
    pub fn restoreInto(m: *Machine, parsed: *const state.Parsed, src: restore.MemorySource, times: *restore.Times) errors.Error!void {
        try m.restoreFrom(parsed, src, times);
    }
    /// A released machine kept for reuse: reset it to its snapshot.
    pub fn resetForReuse(m: *Machine) errors.Error!void {
        var t: reset.Times = .{};
        try m.resetTo(.auto, &t);
    }
    /// Whether a parked machine resets to `snap` (and can serve its restore).
    /// A parked machine handed to a new owner: its previous owner's close()
    /// latched `closing` on the shell.
    pub fn reopen(m: *Machine) void {
        m.shell.closing.store(false, .seq_cst);
    }
    pub fn resetsTo(m: *const Machine, snap: *const Snapshot) bool {
        const r = m.resettable orelse return false;
        return r.snap == snap;
    }
    pub fn resettable(m: *const Machine) bool {
        return m.resettable != null;
    }
    /// A prepared VM (prepared.zig): `s` restored into a fresh machine,
    /// resettable to it.
    pub fn prepareInto(m: *Machine, s: *Snapshot, strategy: restore.Strategy, times: *restore.Times) errors.Error!void {
        try m.restoreFrom(&s.parsed, try restore.MemorySource.forSnapshot(s, strategy), times);
        try m.enableReset(s);
    }
    pub fn setIdentity(m: *Machine, identity: u64) void {
        m.shell.identity.store(identity, .release);
    }
    pub fn retainSnap(s: *Snapshot) *Snapshot {
        return s.retain();
    }
    pub fn releaseSnap(s: *Snapshot) void {
        s.release();
    }
};

test "a first-run note fires once, for the first run only" {
    const Rec = struct {
        var calls: u32 = 0;
        var got: [2]u64 = .{ 0, 0 };
        fn record(_: *anyopaque, seq: u64, run_ns: u64) void {
            calls += 1;
            got = .{ seq, run_ns };
        }
    };
    var ctx: u8 = 0;
    var m = Machine{ .shell = undefined, .first_run = .{ .ctx = &ctx, .seq = 7, .record = &Rec.record } };
    m.noteRun(123);
    m.noteRun(456);
    try std.testing.expectEqual(@as(u32, 1), Rec.calls);
    try std.testing.expectEqual([2]u64{ 7, 123 }, Rec.got);
    try std.testing.expect(m.first_run == null);
}
