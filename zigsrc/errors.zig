//! The one result code of the C ABI and the per-thread error message that
//! explains the last failure. Every fallible core function returns a Zig error
//! from `Error`; the C ABI maps it to `Result` in one place (`toResult`).
const std = @import("std");

/// Result of every C ABI call: 0 is success, negatives are errors. The Python
/// binding maps each to one exception class (kvmlab/_ffi.py, `_ERRORS`).
pub const Result = enum(c_int) {
    ok = 0,
    out_of_memory = -1,
    /// /dev/kvm missing, not accessible, or an unusable API version.
    kvm_unavailable = -2,
    /// A KVM ioctl or syscall failed unexpectedly.
    kvm_failed = -3,
    /// Bad configuration or argument values.
    config = -4,
    /// Bad or missing guest image.
    guest = -5,
    /// The guest triple-faulted, shut down, or KVM could not emulate it.
    guest_crash = -6,
    /// An operation that must finish in time did not.
    timeout = -7,
    /// A snapshot is malformed, corrupt, or does not fit.
    snapshot = -8,
    /// The object was closed.
    closed = -9,
    /// The object is in the wrong state for this call (e.g. already running).
    busy = -10,
    /// A guest address range is outside guest memory.
    bounds = -11,
    /// The pool has max_in_use VMs out.
    pool_exhausted = -12,
    /// The snapshot needs something this host's KVM cannot provide.
    incompatible = -13,
    internal = -99,
};

pub const Error = error{
    OutOfMemory,
    KvmUnavailable,
    KvmFailed,
    Config,
    Guest,
    GuestCrash,
    Timeout,
    Snapshot,
    Closed,
    Busy,
    Bounds,
    PoolExhausted,
    Incompatible,
};

pub fn toResult(e: Error) Result {
    return switch (e) {
        error.OutOfMemory => .out_of_memory,
        error.KvmUnavailable => .kvm_unavailable,
        error.KvmFailed => .kvm_failed,
        error.Config => .config,
        error.Guest => .guest,
        error.GuestCrash => .guest_crash,
        error.Timeout => .timeout,
        error.Snapshot => .snapshot,
        error.Closed => .closed,
        error.Busy => .busy,
        error.Bounds => .bounds,
        error.PoolExhausted => .pool_exhausted,
        error.Incompatible => .incompatible,
    };
}

/// Which check refused an input (a snapshot, a state blob): the machine-
/// readable id of a `Snapshot` error, next to its message. The steps of
/// snapshot.check() and state.parse() each fail with their own id, in the
/// order listed in those files. `none`: the last error was not a failed check.
pub const Check = enum(c_int) {
    none = 0,
    // snapshot.check(), in order
    size = 1,
    magic = 2,
    version = 3,
    arch = 4,
    header_size = 5,
    section_count = 6,
    total_bytes = 7,
    section_kind = 8,
    state_limit = 9,
    section_bounds = 10,
    memory_alignment = 11,
    section_overlap = 12,
    memory_size = 13,
    present_pages = 14,
    flags = 15,
    memory_section_size = 16,
    reserved = 17,
    padding = 18,
    header_crc = 19,
    state_crc = 20,
    // (the STATE section is then checked by state.parse: the state_* ids)
    state_memory = 22,
    page_count = 23,
    memory_crc = 24,
    vcpu_count = 25,
    // snapshot.load() of a file, after check()
    file = 26,
    holes = 27,
    // state.parse(), in order
    state_size = 40,
    state_magic = 41,
    state_version = 42,
    state_shape = 43,
    state_record_count = 44,
    state_record = 45,
    state_trailing = 46,
    state_missing = 47,
    // using a snapshot
    /// The snapshot does not fit the VM or pool it is restored into.
    shape = 60,
    /// The file behind a loaded snapshot was truncated or replaced.
    damaged = 61,
};

threadlocal var last_check: Check = .none;

/// Fails with `Snapshot`, recording `check` as the id of the failed check.
pub fn failCheck(check: Check, comptime fmt: []const u8, args: anytype) Error {
    setMessage(fmt, args);
    last_check = check;
    return error.Snapshot;
}

/// The id of this thread's last failed check (`none` unless the last error
/// came from failCheck).
pub fn lastCheck() Check {
    return last_check;
}

pub const message_capacity = 1024;
threadlocal var message_buf: [message_capacity]u8 = undefined;
threadlocal var message_len: usize = 0;

/// Records a message for `kvmlab_last_error_message()` and returns `e`, so
/// callers write `return errors.fail(error.Config, "...", .{...})`.
pub fn fail(e: Error, comptime fmt: []const u8, args: anytype) Error {
    setMessage(fmt, args);
    return e;
}

pub fn setMessage(comptime fmt: []const u8, args: anytype) void {
    last_check = .none;
    // Leave room for the terminating NUL; a message that does not fit is cut.
    const out = std.fmt.bufPrint(message_buf[0 .. message_capacity - 1], fmt, args) catch blk: {
        const tail = "...";
        @memcpy(message_buf[message_capacity - 1 - tail.len .. message_capacity - 1], tail);
        break :blk message_buf[0 .. message_capacity - 1];
    };
    message_len = out.len;
    message_buf[message_len] = 0;
}

pub fn message() [*:0]const u8 {
    if (message_len == 0) return "";
    return @ptrCast(&message_buf);
}

/// Fails with `KvmFailed`, naming the ioctl and the errno it returned.
pub fn ioctlFailed(what: []const u8) Error {
    const kvm = @import("kvm.zig"); // below errors in spirit: only last_errno
    return fail(error.KvmFailed, "{s} failed: E{s}", .{ what, @tagName(kvm.last_errno) });
}

test "messages are NUL-terminated and cut when too long" {
    try std.testing.expectEqual(error.Config, fail(error.Config, "bad value {d}", .{42}));
    try std.testing.expectEqualStrings("bad value 42", std.mem.span(message()));
    var long: [3000]u8 = undefined;
    @memset(&long, 'x');
    try std.testing.expectEqual(error.Config, fail(error.Config, "{s}", .{@as([]const u8, &long)}));
    const m = std.mem.span(message());
    try std.testing.expectEqual(@as(usize, message_capacity - 1), m.len);
    try std.testing.expect(std.mem.endsWith(u8, m, "..."));
}

test "a failed check records its id; any other failure clears it" {
    try std.testing.expectEqual(error.Snapshot, failCheck(.magic, "bad magic", .{}));
    try std.testing.expectEqual(Check.magic, lastCheck());
    try std.testing.expectEqual(error.Config, fail(error.Config, "x", .{}));
    try std.testing.expectEqual(Check.none, lastCheck());
}
