//! Last line of defence against SIGBUS from mapped snapshot files. kvmlab's
//! own reads of such mappings already go through process_vm_readv (safe.zig),
//! but Python code may read `snap.memory` (a zero-copy view) and a guest may
//! point a console write at any of its pages. If the file was truncated
//! meanwhile, that read faults. This handler, installed once, checks whether
//! the faulting address lies in a registered kvmlab mapping; if so it maps a
//! zero page over the page, marks the owner damaged (later kvmlab calls on it
//! raise SnapshotError) and lets the read continue. Any other SIGBUS goes to
//! the previous handler (or the default action).
const std = @import("std");
const linux = std.os.linux;

const max_ranges = 4096;

var starts: [max_ranges]std.atomic.Value(usize) = @splat(.init(0));
var lens: [max_ranges]usize = @splat(0);
var flags: [max_ranges]?*std.atomic.Value(bool) = @splat(null);
var installed = std.atomic.Value(bool).init(false);
var previous: linux.Sigaction = undefined;

/// Registers [start, start+len) as a kvmlab file mapping; returns the slot
/// (for unregister), or null if the table is full (then only process_vm_readv
/// protects that mapping).
pub fn register(start: usize, len: usize, damaged: *std.atomic.Value(bool)) ?usize {
    install();
    for (&starts, 0..) |*s, i| {
        if (s.load(.acquire) != 0) continue;
        // Claim with a sentinel first so the handler never sees a half-set slot.
        if (s.cmpxchgStrong(0, 1, .acq_rel, .acquire) != null) continue;
        lens[i] = len;
        flags[i] = damaged;
        s.store(start, .release);
        return i;
    }
    return null;
}

pub fn unregister(slot: ?usize) void {
    const i = slot orelse return;
    starts[i].store(0, .release);
}

/// Whether kvmlab's handler is the one installed now (someone may have
/// replaced it since). When it is, a plain memcpy from a registered mapping
/// cannot kill the process: a lost page reads as zeros and sets the owner's
/// damaged flag, which the caller checks afterwards.
pub fn active() bool {
    if (!installed.load(.acquire)) return false;
    var cur: linux.Sigaction = undefined;
    if (linux.errno(linux.sigaction(.BUS, null, &cur)) != .SUCCESS) return false;
    return cur.flags & linux.SA.SIGINFO != 0 and cur.handler.sigaction == &onSigbus;
}

fn install() void {
    if (installed.swap(true, .acq_rel)) return;
    var act = linux.Sigaction{
        .handler = .{ .sigaction = onSigbus },
        .mask = std.mem.zeroes(linux.sigset_t),
        .flags = linux.SA.SIGINFO | linux.SA.ONSTACK,
    };
    _ = linux.sigaction(.BUS, &act, &previous);
}

fn onSigbus(sig: linux.SIG, info: *const linux.siginfo_t, ctx: ?*anyopaque) callconv(.c) void {
    const addr = @intFromPtr(info.fields.sigfault.addr);
    for (&starts, 0..) |*s, i| {
        const start = s.load(.acquire);
        if (start <= 1 or addr < start or addr - start >= lens[i]) continue;
        const page = addr & ~@as(usize, 4095);
        // Zeros instead of the lost file page; the access is retried.
        const rc = linux.mmap(@ptrFromInt(page), 4096, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .ANONYMOUS = true, .FIXED = true }, -1, 0);
        if (linux.errno(rc) == .SUCCESS) {
            if (flags[i]) |f| f.store(true, .release);
            return;
        }
    }
    // Not ours: what would have happened without kvmlab.
    if (previous.flags & linux.SA.SIGINFO != 0) {
        if (previous.handler.sigaction) |h| return h(sig, info, ctx);
    } else if (previous.handler.handler) |h| {
        const raw = @intFromPtr(h);
        if (raw != 0 and raw != 1) return h(sig); // neither SIG_DFL nor SIG_IGN
    }
    var dfl = linux.Sigaction{ .handler = .{ .handler = null }, .mask = std.mem.zeroes(linux.sigset_t), .flags = 0 };
    _ = linux.sigaction(.BUS, &dfl, null);
}
