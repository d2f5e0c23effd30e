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

/// Each error's class: the `Result` of the same name in snake case
/// (`KvmUnavailable` -> `kvm_unavailable`), so a new class is one member of
/// each list and a misspelt one fails to compile.
pub fn toResult(e: Error) Result {
    switch (e) {
        inline else => |err| return comptime @field(Result, snakeCase(@errorName(err))),
    }
}

fn snakeCase(comptime camel: []const u8) []const u8 {
    comptime var out: []const u8 = "";
    inline for (camel, 0..) |ch, i| {
        const lower = std.ascii.toLower(ch);
        out = out ++ (if (i > 0 and lower != ch) "_" else "") ++ [_]u8{lower};
    }
    return out;
}

/// The machine-readable id of every refusal: each failure site of the core
/// fails with its own id (`fail(.cpuid_leaf, ...)`), and the id decides the
/// error class. The value says the class once: `value / 100` is the negated
/// `Result` of the class (cpuid_leaf = 1301 is an `incompatible` error). Ids
/// are stable (never renumber one; add new ones at the end of their class)
/// and every id is documented in docs/errors.md (tests/test_errors.py checks
/// both). `none`: no failure recorded on this thread.
pub const Check = enum(c_int) {
    none = 0,
    // out_of_memory
    out_of_memory = 100, // an allocation failed (no site of its own)
    guest_memory_map = 101,
    thread_spawn = 102,
    snapshot_memory_map = 103,
    sigbus_slots = 104,
    // kvm_unavailable: /dev/kvm (host.zig)
    kvm_open = 201,
    kvm_open_limit = 202,
    kvm_missing = 203,
    kvm_permission = 204,
    kvm_api_version = 205,
    kvm_mmap_size = 206,
    kvm_capability = 207,
    // kvm_failed
    ioctl_failed = 301, // the message names the ioctl
    state_read = 302,
    msr_read = 303,
    cpuid_entries = 304,
    state_write = 305,
    vcpu_mmap = 306,
    pending_io = 307,
    snapshot_mapping = 308,
    fault_injected = 309,
    // config: arguments of the C ABI
    null_argument = 401,
    vm_memory_range = 402,
    vm_memory_multiple = 403,
    vm_vcpus_range = 404,
    guest_args_size = 405,
    cpl = 406,
    strategy_needs_file = 407,
    strategy_pool_only = 408,
    floor_shell = 409,
    vcpu_index = 410,
    unknown_strategy = 411,
    unknown_reset_mode = 412,
    unknown_fault_site = 413,
    loop_limit = 414,
    buffer_size = 415,
    pool_max_size = 416,
    pool_min_size = 417,
    snapshot_path = 418,
    save_create = 419,
    save_write = 420,
    save_rename = 421,
    drop_needs_map = 422,
    loop_inputs = 423,
    loop_offsets = 424,
    loop_console = 425,
    input_size = 426,
    fork_count = 427,
    fork_threads = 428,
    service_payload = 429,
    // guest: the image (boot.zig)
    image_empty = 501,
    image_size = 502,
    elf_truncated = 503,
    elf_class = 504,
    elf_machine = 505,
    elf_type = 506,
    elf_phentsize = 507,
    elf_phnum = 508,
    elf_phdrs_bounds = 509,
    elf_segment_size = 510,
    elf_segment_bounds = 511,
    elf_segment_address = 512,
    elf_no_load = 513,
    elf_entry = 514,
    // guest_crash: the first crash of a run (shell.zig's crash causes)
    guest_crash = 601, // a crash with no cause of its own
    snapshot_crashed = 602,
    run_efault = 603,
    run_failed = 604,
    triple_fault = 605,
    emulation_failed = 606,
    entry_failed = 607,
    mmio_outside = 608,
    unexpected_exit = 609,
    io_data_outside = 610,
    port_read_size = 611,
    unknown_port_read = 612,
    console_descriptor = 613,
    console_write = 614,
    unknown_port_write = 615,
    // timeout
    prepare_timeout = 701,
    // snapshot: snapshot.check(), in order
    size = 801,
    magic = 802,
    version = 803,
    arch = 804,
    header_size = 805,
    section_count = 806,
    total_bytes = 807,
    section_kind = 808,
    state_limit = 809,
    section_bounds = 810,
    memory_alignment = 811,
    section_overlap = 812,
    memory_size = 813,
    present_pages = 814,
    flags = 815,
    memory_section_size = 816,
    reserved = 817,
    padding = 818,
    header_crc = 819,
    state_crc = 820,
    // (the STATE section is then checked by state.parse: the state_* ids)
    state_memory = 822,
    page_count = 823,
    memory_crc = 824,
    vcpu_count = 825,
    // snapshot.load() of a file, after check()
    file = 826,
    holes = 827,
    // state.parse(), in order
    state_size = 840,
    state_magic = 841,
    state_version = 842,
    state_shape = 843,
    state_record_count = 844,
    state_record = 845,
    state_trailing = 846,
    state_missing = 847,
    state_alignment = 848,
    // using a snapshot
    /// The snapshot does not fit the VM or pool it is restored into.
    shape = 860,
    /// The file behind a loaded snapshot was truncated or replaced.
    damaged = 861,
    // closed
    null_handle = 901,
    vm_closed = 902,
    pool_closed = 903,
    // busy
    vm_has_guest = 1001,
    vm_no_guest = 1002,
    vm_running = 1003,
    not_resettable = 1004,
    pool_no_idle = 1005,
    // bounds
    gpa_out_of_range = 1101,
    // pool_exhausted
    pool_exhausted = 1201,
    pool_wait_timeout = 1202,
    prepare_max_size = 1203,
    prepare_targets = 1204,
    // incompatible: the snapshot needs what this host lacks (state.zig)
    cpuid_leaf = 1301,
    cpuid_features = 1302,
    xsave_size = 1303,
    cpuid_set = 1304,
    msr_refused = 1305,
};

/// The Zig error of each `Result` but ok and internal.
fn errorOfResult(r: Result) ?Error {
    inline for (@typeInfo(Error).error_set.error_names.?) |name| {
        const err = @field(Error, name);
        if (toResult(err) == r) return err;
    }
    return null;
}

fn resultOfCheck(c: Check) ?Result {
    return std.enums.fromInt(Result, -@divTrunc(@intFromEnum(c), 100));
}

comptime {
    // Every id but none names a class: errorOf cannot fail.
    @setEvalBranchQuota(100 * std.meta.tags(Check).len * std.meta.tags(Result).len);
    for (std.meta.tags(Check)) |c| {
        if (c == .none) continue;
        const r = resultOfCheck(c) orelse @compileError("check id " ++ @tagName(c) ++ " is in no class's hundred");
        if (errorOfResult(r) == null) @compileError("check id " ++ @tagName(c) ++ " is in the hundred of a result with no error");
    }
}

/// The error class of a check id (its hundred, see `Check`).
pub fn errorOf(c: Check) Error {
    std.debug.assert(c != .none);
    return errorOfResult(resultOfCheck(c) orelse unreachable) orelse unreachable; // proven for every tag above
}

threadlocal var last_check: Check = .none;

/// The id of this thread's last failure (`none` if it recorded none).
pub fn lastCheck() Check {
    return last_check;
}

/// The C ABI's result of a failed call: an error that did not come from
/// `fail` (an allocator's OutOfMemory passed up with `try`) would leave an
/// older id and message behind; it gets the generic `out_of_memory` id (or
/// `none`) and a message saying so.
pub fn finish(e: Error) Result {
    if (last_check == .none or errorOf(last_check) != e) {
        if (e == error.OutOfMemory) {
            setMessage("out of memory: the host could not allocate; free memory or use fewer or smaller VMs", .{});
            last_check = .out_of_memory;
        } else {
            setMessage("kvmlab core call failed ({s})", .{@tagName(toResult(e))});
        }
    }
    return toResult(e);
}

pub const message_capacity = 1024;
threadlocal var message_buf: [message_capacity]u8 = undefined;
threadlocal var message_len: usize = 0;

/// Forgets this thread's last check id: each C ABI call begins with it
/// (capi/common.zig `call`).
pub fn clear() void {
    last_check = .none;
    message_len = 0;
}

/// Records `check` and a message for `kvmlab_last_error_check()` and
/// `kvmlab_last_error_message()`, and returns the check's error class, so
/// callers write `return errors.fail(.vm_running, "...", .{...})`.
pub fn fail(check: Check, comptime fmt: []const u8, args: anytype) Error {
    setMessage(fmt, args);
    last_check = check;
    return errorOf(check);
}

fn setMessage(comptime fmt: []const u8, args: anytype) void {
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
    return fail(.ioctl_failed, "{s} failed: E{s}", .{ what, @tagName(kvm.last_errno) });
}

test "messages are NUL-terminated and cut when too long" {
    try std.testing.expectEqual(error.Config, fail(.cpl, "bad value {d}", .{42}));
    try std.testing.expectEqualStrings("bad value 42", std.mem.span(message()));
    var long: [3000]u8 = undefined;
    @memset(&long, 'x');
    try std.testing.expectEqual(error.Config, fail(.cpl, "{s}", .{@as([]const u8, &long)}));
    const m = std.mem.span(message());
    try std.testing.expectEqual(@as(usize, message_capacity - 1), m.len);
    try std.testing.expect(std.mem.endsWith(u8, m, "..."));
}

test "a failure records its id; the id decides the error class" {
    try std.testing.expectEqual(error.Snapshot, fail(.magic, "bad magic", .{}));
    try std.testing.expectEqual(Check.magic, lastCheck());
    try std.testing.expectEqual(error.Incompatible, fail(.cpuid_leaf, "x", .{}));
    try std.testing.expectEqual(Check.cpuid_leaf, lastCheck());
    try std.testing.expectEqual(error.PoolExhausted, errorOf(.pool_exhausted));
    try std.testing.expectEqual(error.Closed, errorOf(.pool_closed));
    try std.testing.expectEqual(error.Busy, errorOf(.vm_running));
    try std.testing.expectEqual(error.Bounds, errorOf(.gpa_out_of_range));
    try std.testing.expectEqual(error.OutOfMemory, errorOf(.out_of_memory));
}

test "every id but none is in the hundred of its class, and every class has an id" {
    var seen: std.EnumSet(Result) = .empty;
    for (std.meta.tags(Check)) |c| {
        if (c == .none) continue;
        const e = errorOf(c);
        try std.testing.expectEqual(-@divTrunc(@intFromEnum(c), 100), @intFromEnum(toResult(e)));
        seen.insert(toResult(e));
    }
    for (std.meta.tags(Result)) |r| {
        if (r == .ok or r == .internal) continue;
        try std.testing.expect(seen.contains(r));
    }
}

test "finish: an error that did not come from fail gets no stale id" {
    try std.testing.expectEqual(error.Snapshot, fail(.magic, "bad magic", .{}));
    try std.testing.expectEqual(Result.snapshot, finish(error.Snapshot));
    try std.testing.expectEqual(Check.magic, lastCheck()); // from fail: kept
    try std.testing.expectEqual(Result.out_of_memory, finish(error.OutOfMemory));
    try std.testing.expectEqual(Check.out_of_memory, lastCheck());
    try std.testing.expect(std.mem.startsWith(u8, std.mem.span(message()), "out of memory"));
    try std.testing.expectEqual(error.Snapshot, fail(.magic, "bad magic", .{}));
    try std.testing.expectEqual(Result.config, finish(error.Config));
    try std.testing.expectEqual(Check.none, lastCheck());
    try std.testing.expectEqualStrings("kvmlab core call failed (config)", std.mem.span(message()));
}

test "toResult: every error maps to the result of its name" {
    try std.testing.expectEqual(Result.kvm_unavailable, toResult(error.KvmUnavailable));
    try std.testing.expectEqual(Result.pool_exhausted, toResult(error.PoolExhausted));
    try std.testing.expectEqual(Result.out_of_memory, toResult(error.OutOfMemory));
    try std.testing.expectEqual(Result.config, toResult(error.Config));
}
