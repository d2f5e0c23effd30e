//! The C ABI of libkvmlab: snapshot handles (kvmlab_snapshot).
const errors = @import("../errors.zig");
const snapshot = @import("../snapshot.zig");
const common = @import("common.zig");
const kvmlab_result = common.kvmlab_result;
const kvmlab_vm = common.kvmlab_vm;
const kvmlab_snapshot = common.kvmlab_snapshot;
const kvmlab_snapshot_info = common.kvmlab_snapshot_info;
const result = common.result;
const asVm = common.asVm;
const asSnap = common.asSnap;
const bytesOf = common.bytesOf;

/// Captures a stopped VM (memory and all device state) into a new snapshot.
pub export fn kvmlab_snapshot_capture(h: ?*kvmlab_vm, out: ?*?*kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(snapCapture(h, out));
}
fn snapCapture(h: ?*kvmlab_vm, out: ?*?*kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try (try asVm(h)).capture());
}

/// Checks and copies an encoded snapshot (packed or full layout).
pub export fn kvmlab_snapshot_from_bytes(data: ?[*]const u8, len: usize, out: ?*?*kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(snapFromBytes(data, len, out));
}
fn snapFromBytes(data: ?[*]const u8, len: usize, out: ?*?*kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try snapshot.fromBytes(try bytesOf(data, len)));
}

/// Maps and checks a snapshot file; its memory is not read into the heap.
pub export fn kvmlab_snapshot_load(path: ?[*:0]const u8, out: ?*?*kvmlab_snapshot) callconv(.c) kvmlab_result {
    return result(snapLoad(path, out));
}
fn snapLoad(path: ?[*:0]const u8, out: ?*?*kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = null;
    const p = path orelse return errors.fail(error.Config, "path is NULL", .{});
    o.* = @ptrCast(try snapshot.load(p));
}

/// Writes the snapshot atomically to `path` (mode 0600, zero pages as holes).
pub export fn kvmlab_snapshot_save(h: ?*const kvmlab_snapshot, path: ?[*:0]const u8) callconv(.c) kvmlab_result {
    return result(snapSave(h, path));
}
fn snapSave(h: ?*const kvmlab_snapshot, path: ?[*:0]const u8) errors.Error!void {
    const s = try asSnap(h);
    try s.checkIntact();
    try snapshot.save(s, path orelse return errors.fail(error.Config, "path is NULL", .{}));
}

/// The packed encoding. With buf NULL, only *out_bytes (the size) is set;
/// otherwise `capacity` must be at least that size.
pub export fn kvmlab_snapshot_to_bytes(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) kvmlab_result {
    return result(snapToBytes(h, buf, capacity, out_bytes));
}
fn snapToBytes(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const s = try asSnap(h);
    const o = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    try s.checkIntact();
    const n: usize = @intCast(snapshot.encodedBytes(s));
    o.* = n;
    const b = buf orelse return;
    if (capacity < n) return errors.fail(error.Config, "buffer of {d} bytes is smaller than the {d}-byte snapshot", .{ capacity, n });
    try snapshot.toBytes(s, b[0..n]);
}

/// Copies the state blob (everything but memory) into buf; NULL buf: size only.
pub export fn kvmlab_snapshot_state(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) kvmlab_result {
    return result(snapState(h, buf, capacity, out_bytes));
}
fn snapState(h: ?*const kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const s = try asSnap(h);
    const o = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    o.* = s.blob.len;
    const b = buf orelse return;
    if (capacity < s.blob.len) return errors.fail(error.Config, "buffer too small for the {d}-byte state", .{s.blob.len});
    @memcpy(b[0..s.blob.len], s.blob);
}

/// A dense read-only view of guest memory, valid until the snapshot is freed.
pub export fn kvmlab_snapshot_memory(h: ?*const kvmlab_snapshot, out_ptr: ?*?[*]const u8, out_bytes: ?*u64) callconv(.c) kvmlab_result {
    return result(snapMemory(h, out_ptr, out_bytes));
}
fn snapMemory(h: ?*const kvmlab_snapshot, out_ptr: ?*?[*]const u8, out_bytes: ?*u64) errors.Error!void {
    const s = try asSnap(h);
    const p = out_ptr orelse return errors.fail(error.Config, "out is NULL", .{});
    const n = out_bytes orelse return errors.fail(error.Config, "out is NULL", .{});
    p.* = s.memory.ptr;
    n.* = s.memory.len;
}

pub export fn kvmlab_snapshot_get_info(h: ?*const kvmlab_snapshot, out: ?*kvmlab_snapshot_info) callconv(.c) kvmlab_result {
    return result(snapInfo(h, out));
}
fn snapInfo(h: ?*const kvmlab_snapshot, out: ?*kvmlab_snapshot_info) errors.Error!void {
    const s = try asSnap(h);
    const o = out orelse return errors.fail(error.Config, "out is NULL", .{});
    s.checkFile() catch {}; // sets `damaged` when the file changed since load
    o.* = .{
        .memory_bytes = s.parsed.memory_bytes,
        .vcpus = s.parsed.vcpus,
        .file_backed = @intFromBool(s.fileBacked()),
        .present_pages = s.present_pages,
        .stored_bytes = s.stored_bytes,
        .created_unix_ns = s.created_unix_ns,
        .state_bytes = s.blob.len,
        .version_major = snapshot.version_major,
        .version_minor = snapshot.version_minor,
        .damaged = @intFromBool(s.damaged.load(.acquire)),
        .guest_name = @splat(0),
    };
    const name = s.guestName();
    @memcpy(o.guest_name[0..name.len], name);
}

pub export fn kvmlab_snapshot_free(h: ?*kvmlab_snapshot) callconv(.c) void {
    const s = asSnap(h) catch return;
    s.release();
}

