//! Signals in the core's blocking operations (runs and reset loops):
//!
//!   - the kick: kvmlab's own realtime signal, sent to a vCPU thread to get it
//!     out of KVM_RUN (a deadline's timer, interrupt(), close(), a crash);
//!   - ForeignSignals: every other signal waits blocked on a thread running
//!     an operation, except inside KVM_RUN (see its doc comment);
//!   - stop signals (SIGINT from Ctrl-C, SIGTERM): the kernel hands a signal
//!     sent to the process (kill(pid), Ctrl-C) to any thread that does not
//!     block it. Blocked on the operation's thread outside KVM_RUN, it goes to
//!     another thread (a Python helper thread, a Jupyter kernel's), where its
//!     handler runs unseen by the core. So the core installs its own handler
//!     for these signals (when a program's handler is installed: not over
//!     SIG_DFL or SIG_IGN), which calls the program's handler first (Python's
//!     sets its flag; KeyboardInterrupt follows), then counts the signal in
//!     `caught` and kicks every thread that is running a vCPU. Operations note
//!     `caught` when they begin and stop with reason `interrupted` once it
//!     moves, whichever thread the handler ran on.
//!
//! The stop handler is installed by the first operation and stays (it only
//! chains when no operation runs): restoring it after each operation would
//! race with operations starting on other threads and could undo a handler
//! the program installed meanwhile. A program that installs another handler
//! later (Python's signal.signal) displaces it; the next operation installs it
//! again over the new one (`arm`).
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");

/// Realtime signal used to kick vCPU threads out of KVM_RUN (glibc's
/// SIGRTMIN+6; glibc itself uses 32 and 33).
pub const kick_signal: u32 = 40;

/// The kvm_run of the vCPU this thread is running, for the kick handler.
pub threadlocal var current_run: ?*kvm.Run = null;
/// Set by the kick handler: tells kvmlab's own EINTRs from foreign signals.
pub threadlocal var kicked: bool = false;

fn onKick(_: linux.SIG) callconv(.c) void {
    kicked = true;
    if (current_run) |r| r.immediate_exit = 1;
}

var kick_installed = std.atomic.Value(bool).init(false);

pub fn installKickHandler() void {
    if (kick_installed.swap(true, .acq_rel)) return;
    var act = linux.Sigaction{
        .handler = .{ .handler = onKick },
        .mask = std.mem.zeroes(linux.sigset_t),
        // KVM_RUN still ends with EINTR (KVM returns it for a pending signal,
        // and the kernel never restarts an -EINTR). SA_RESTART is for a kick
        // that lands after the loop, in the program's own code (a deadline or
        // close() racing the loop's end): its blocked system call restarts
        // instead of failing with EINTR in C code that does not retry.
        .flags = linux.SA.RESTART,
    };
    _ = linux.sigaction(@enumFromInt(kick_signal), &act, null);
}

/// Sends the kick to thread `tid` of this process. Async-signal-safe.
pub fn kick(tid: i32) void {
    _ = linux.tgkill(linux.getpid(), tid, @enumFromInt(kick_signal));
}

/// Signals other than kvmlab's own kick (SIGINT from Ctrl-C...) are blocked
/// on a thread running the core's run loop or reset loop, except inside
/// KVM_RUN, where KVM installs the caller's own mask atomically
/// (KVM_SET_SIGNAL_MASK). One that arrives while the thread is outside
/// KVM_RUN (serving an exit, resetting between two runs of a loop) stays
/// pending: the next KVM_RUN returns EINTR at once (and the loop checks
/// `pending()` between runs) instead of its handler running unseen and the
/// run going on. When the operation ends the caller's mask is restored and
/// the handler runs (Python's sets its flag; KeyboardInterrupt follows). The
/// kick, the synchronous fault signals (SIGBUS for sigbus.zig...) and the
/// ones ignored by default (SIGCHLD...) are never blocked. A stop signal the
/// kernel gave another thread meanwhile is seen through `caught`.
pub const ForeignSignals = struct {
    /// The caller's mask, from before the outermost block() on this thread.
    outer: linux.sigset_t,
    /// Whether this block() blocked (false when an outer one did).
    owner: bool,

    threadlocal var outer_mask: ?linux.sigset_t = null;
    /// `caught` at the outermost block() on this thread.
    threadlocal var caught_seen: u64 = 0;

    fn set() linux.sigset_t {
        var m = linux.sigfillset();
        for ([_]linux.SIG{ .BUS, .SEGV, .FPE, .ILL, .TRAP, .ABRT, .SYS }) |sig| linux.sigdelset(&m, sig);
        // Ignored by default: blocked, they would be queued instead of
        // dropped and stop runs for nothing (a SIGCHLD from a subprocess).
        for ([_]linux.SIG{ .CHLD, .WINCH, .URG, .CONT }) |sig| linux.sigdelset(&m, sig);
        linux.sigdelset(&m, @enumFromInt(kick_signal));
        return m;
    }

    pub fn block() ForeignSignals {
        if (outer_mask) |m| return .{ .outer = m, .owner = false };
        arm();
        caught_seen = caughtCount();
        var old: linux.sigset_t = undefined;
        const m = set();
        _ = linux.sigprocmask(linux.SIG.BLOCK, &m, &old);
        outer_mask = old;
        return .{ .outer = old, .owner = true };
    }

    pub fn unblock(g: ForeignSignals) void {
        if (!g.owner) return;
        outer_mask = null;
        _ = linux.sigprocmask(linux.SIG.SETMASK, &g.outer, null);
    }

    /// For a vCPU thread whose KVM would not take a signal mask.
    pub fn unblockHere(outer: linux.sigset_t) void {
        _ = linux.sigprocmask(linux.SIG.SETMASK, &outer, null);
    }

    /// Whether the operation must stop for a signal: one the caller does not
    /// block waits for this thread or the process (blocked by block(),
    /// handled at unblock()), or the stop handler caught one on any thread
    /// since the outermost block().
    pub fn pending() bool {
        const outer = outer_mask orelse return false;
        if (caughtSince(caught_seen)) return true;
        var p: linux.sigset_t = @splat(0);
        _ = linux.syscall2(.rt_sigpending, @intFromPtr(&p), linux.NSIG / 8);
        const m = set();
        for (p, m, outer) |a, b, c| if (a & b & ~c != 0) return true;
        return false;
    }
};

// -- stop signals -------------------------------------------------------------

/// The signals whose handler must stop operations wherever the kernel runs it.
pub const stop_signals = [_]linux.SIG{ .INT, .TERM };
/// Threads running a vCPU at once that the stop handler can kick (a thread
/// over the limit still stops at its next exit to the host).
pub const max_kick_threads = 1024;

/// Stop signals the handler caught so far (only grows).
var caught = std.atomic.Value(u64).init(0);
/// Thread ids of threads inside a vCPU loop (0: free slot).
var kick_tids: [max_kick_threads]std.atomic.Value(i32) = @splat(.init(0));
/// The handler each stop signal had before ours (address; SA_SIGINFO form?).
var previous_fn: [stop_signals.len]std.atomic.Value(usize) = @splat(.init(0));
var previous_info: [stop_signals.len]std.atomic.Value(bool) = @splat(.init(false));
/// Serialises arm() (never taken by the handler).
var arm_mutex: std.c.pthread_mutex_t = .{};

pub fn caughtCount() u64 {
    return caught.load(.seq_cst);
}

/// Whether a stop signal was caught since `caughtCount()` returned `seen`.
pub fn caughtSince(seen: u64) bool {
    return caught.load(.seq_cst) != seen;
}

/// Makes this thread a target of the stop handler's kicks while it runs a
/// vCPU; returns the slot for `leaveRun`, null when all are taken. Call
/// before the loop's first check of `caught` (seq_cst: either the loop sees
/// `caught` move or the handler sees this tid, never neither).
pub fn enterRun() ?usize {
    const tid = linux.gettid();
    for (&kick_tids, 0..) |*t, i| {
        if (t.load(.monotonic) != 0) continue;
        if (t.cmpxchgStrong(0, tid, .seq_cst, .monotonic) == null) return i;
    }
    return null;
}

pub fn leaveRun(slot: ?usize) void {
    const i = slot orelse return;
    std.debug.assert(kick_tids[i].load(.monotonic) == linux.gettid());
    kick_tids[i].store(0, .release);
}

fn onStopSignal(sig: linux.SIG, info: *const linux.siginfo_t, ctx: ?*anyopaque) callconv(.c) void {
    // The program's handler first: once an operation sees `caught` move,
    // Python's flag is set, so the KeyboardInterrupt is raised as soon as the
    // operation returns (not left for the next signal).
    chain(sig, info, ctx);
    _ = caught.fetchAdd(1, .seq_cst);
    for (&kick_tids) |*t| {
        const tid = t.load(.seq_cst);
        // A thread that left its loop meanwhile gets a harmless kick.
        if (tid != 0) kick(tid);
    }
}

fn chain(sig: linux.SIG, info: *const linux.siginfo_t, ctx: ?*anyopaque) void {
    const i = indexOf(sig) orelse return;
    // Never installed over SIG_DFL / SIG_IGN, so a false return cannot happen.
    _ = callSaved(previous_fn[i].load(.acquire), previous_info[i].load(.acquire), sig, info, ctx);
}

/// Calls a handler saved from sigaction (`handler_addr`; `siginfo`: its
/// SA_SIGINFO form) the way the kernel would have. False, calling nothing,
/// when it is SIG_DFL (0) or SIG_IGN (1). Async-signal-safe.
pub fn callSaved(handler_addr: usize, siginfo: bool, sig: linux.SIG, info: *const linux.siginfo_t, ctx: ?*anyopaque) bool {
    if (handler_addr <= 1) return false;
    if (siginfo) {
        const f: linux.Sigaction.sigaction_fn = @ptrFromInt(handler_addr);
        f(sig, info, ctx);
    } else {
        const f: linux.Sigaction.handler_fn = @ptrFromInt(handler_addr);
        f(sig);
    }
    return true;
}

fn indexOf(sig: linux.SIG) ?usize {
    for (stop_signals, 0..) |s, i| if (s == sig) return i;
    return null;
}

fn isOurs(a: linux.Sigaction) bool {
    return a.flags & linux.SA.SIGINFO != 0 and a.handler.sigaction == &onStopSignal;
}

/// Installs the stop handler over each stop signal's current handler, unless
/// it is ours already or the signal has none (SIG_DFL, SIG_IGN): one
/// sigaction query per signal when nothing changed.
pub fn arm() void {
    for (stop_signals, 0..) |sig, i| {
        var cur: linux.Sigaction = undefined;
        if (linux.errno(linux.sigaction(sig, null, &cur)) != .SUCCESS) continue;
        if (isOurs(cur) or @intFromPtr(cur.handler.handler) <= 1) continue;
        _ = std.c.pthread_mutex_lock(&arm_mutex);
        defer _ = std.c.pthread_mutex_unlock(&arm_mutex);
        // Again under the lock: another thread may have armed meanwhile (and
        // ours must never become its own previous handler).
        if (linux.errno(linux.sigaction(sig, null, &cur)) != .SUCCESS) continue;
        if (isOurs(cur) or @intFromPtr(cur.handler.handler) <= 1) continue;
        previous_fn[i].store(@intFromPtr(cur.handler.handler), .release);
        previous_info[i].store(cur.flags & linux.SA.SIGINFO != 0, .release);
        var act = cur; // the program's mask and flags (SA_ONSTACK for Python's)
        act.handler = .{ .sigaction = onStopSignal };
        act.flags = (cur.flags | linux.SA.SIGINFO) & ~@as(@TypeOf(cur.flags), linux.SA.RESETHAND);
        _ = linux.sigaction(sig, &act, null);
    }
}

var test_hits = std.atomic.Value(u32).init(0);
fn testHandler(_: linux.SIG) callconv(.c) void {
    _ = test_hits.fetchAdd(1, .seq_cst);
}

test "stop handler: installed over a program's handler, chains to it, counts, kicks running threads" {
    installKickHandler();
    var saved: linux.Sigaction = undefined;
    _ = linux.sigaction(.TERM, null, &saved);
    defer _ = linux.sigaction(.TERM, &saved, null);

    // Over SIG_DFL: nothing installed (the default action is the program's choice).
    var dfl = linux.Sigaction{ .handler = .{ .handler = null }, .mask = std.mem.zeroes(linux.sigset_t), .flags = 0 };
    _ = linux.sigaction(.TERM, &dfl, null);
    arm();
    var cur: linux.Sigaction = undefined;
    _ = linux.sigaction(.TERM, null, &cur);
    try std.testing.expect(!isOurs(cur));

    // Over a handler: ours, once (arming again changes nothing).
    var act = linux.Sigaction{ .handler = .{ .handler = testHandler }, .mask = std.mem.zeroes(linux.sigset_t), .flags = 0 };
    _ = linux.sigaction(.TERM, &act, null);
    arm();
    arm();
    _ = linux.sigaction(.TERM, null, &cur);
    try std.testing.expect(isOurs(cur));

    // This thread "runs a vCPU": the signal chains once, counts, kicks it.
    const slot = enterRun().?;
    defer leaveRun(slot);
    const seen = caughtCount();
    kicked = false;
    _ = linux.tgkill(linux.getpid(), linux.gettid(), .TERM);
    try std.testing.expectEqual(@as(u32, 1), test_hits.load(.seq_cst));
    try std.testing.expect(caughtSince(seen));
    try std.testing.expect(kicked);
}

test "stop handler: kick slots are claimed once each and freed" {
    var slots: [3]usize = undefined;
    for (&slots) |*s| s.* = enterRun().?;
    try std.testing.expect(slots[0] != slots[1] and slots[1] != slots[2] and slots[0] != slots[2]);
    for (slots) |s| try std.testing.expectEqual(linux.gettid(), kick_tids[s].load(.seq_cst));
    for (slots) |s| leaveRun(s);
    for (slots) |s| try std.testing.expectEqual(@as(i32, 0), kick_tids[s].load(.seq_cst));
}
