//! The C ABI of libkvmlab: snapshot handles (kvmlab_snapshot).
const errors = @import("../errors.zig");
const snapshot = @import("../snapshot.zig");
const common = @import("common.zig");

/// Captures a stopped VM (memory and all device state) into a new snapshot.
pub export fn kvmlab_snapshot_capture(h: ?*common.kvmlab_vm, out: ?*?*common.kvmlab_snapshot) callconv(.c) common.kvmlab_result {
    return common.call(snapCapture, .{ h, out });
}
fn snapCapture(h: ?*common.kvmlab_vm, out: ?*?*common.kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try (try common.asVm(h)).capture());
}

/// Checks and copies an encoded snapshot (packed or full layout).
pub export fn kvmlab_snapshot_from_bytes(data: ?[*]const u8, len: usize, out: ?*?*common.kvmlab_snapshot) callconv(.c) common.kvmlab_result {
    return common.call(snapFromBytes, .{ data, len, out });
}
fn snapFromBytes(data: ?[*]const u8, len: usize, out: ?*?*common.kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = null;
    o.* = @ptrCast(try snapshot.fromBytes(try common.bytesOf(data, len)));
}

/// Maps and checks a snapshot file; its memory is not read into the heap.
pub export fn kvmlab_snapshot_load(path: ?[*:0]const u8, out: ?*?*common.kvmlab_snapshot) callconv(.c) common.kvmlab_result {
    return common.call(snapLoad, .{ path, out });
}
fn snapLoad(path: ?[*:0]const u8, out: ?*?*common.kvmlab_snapshot) errors.Error!void {
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = null;
    const p = path orelse return errors.fail(.null_argument, "path is NULL", .{});
    o.* = @ptrCast(try snapshot.load(p));
}

/// Writes the snapshot atomically to `path` (mode 0600, zero pages as holes).
pub export fn kvmlab_snapshot_save(h: ?*const common.kvmlab_snapshot, path: ?[*:0]const u8) callconv(.c) common.kvmlab_result {
    return common.call(snapSave, .{ h, path });
}
fn snapSave(h: ?*const common.kvmlab_snapshot, path: ?[*:0]const u8) errors.Error!void {
    const s = try common.asSnap(h);
    try s.checkIntact();
    try snapshot.save(s, path orelse return errors.fail(.null_argument, "path is NULL", .{}));
}

/// The packed encoding. With buf NULL, only *out_bytes (the size) is set;
/// otherwise `capacity` must be at least that size.
pub export fn kvmlab_snapshot_to_bytes(h: ?*const common.kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) common.kvmlab_result {
    return common.call(snapToBytes, .{ h, buf, capacity, out_bytes });
}
fn snapToBytes(h: ?*const common.kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const s = try common.asSnap(h);
    const o = out_bytes orelse return errors.fail(.null_argument, "out is NULL", .{});
    try s.checkIntact();
    const n: usize = @intCast(snapshot.encodedBytes(s));
    o.* = n;
    const b = buf orelse return;
    if (capacity < n) return errors.fail(.buffer_size, "buffer of {d} bytes is smaller than the {d}-byte snapshot", .{ capacity, n });
    try snapshot.toBytes(s, b[0..n]);
}

/// Copies the state blob (everything but memory) into buf; NULL buf: size only.
pub export fn kvmlab_snapshot_state(h: ?*const common.kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) common.kvmlab_result {
    return common.call(snapState, .{ h, buf, capacity, out_bytes });
}
fn snapState(h: ?*const common.kvmlab_snapshot, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const s = try common.asSnap(h);
    const o = out_bytes orelse return errors.fail(.null_argument, "out is NULL", .{});
    o.* = s.blob.len;
    const b = buf orelse return;
    if (capacity < s.blob.len) return errors.fail(.buffer_size, "buffer too small for the {d}-byte state", .{s.blob.len});
    @memcpy(b[0..s.blob.len], s.blob);
}

/// A dense read-only view of guest memory, valid until the snapshot is freed.
pub export fn kvmlab_snapshot_memory(h: ?*const common.kvmlab_snapshot, out_ptr: ?*?[*]const u8, out_bytes: ?*u64) callconv(.c) common.kvmlab_result {
    return common.call(snapMemory, .{ h, out_ptr, out_bytes });
}
fn snapMemory(h: ?*const common.kvmlab_snapshot, out_ptr: ?*?[*]const u8, out_bytes: ?*u64) errors.Error!void {
    const s = try common.asSnap(h);
    const p = out_ptr orelse return errors.fail(.null_argument, "out is NULL", .{});
    const n = out_bytes orelse return errors.fail(.null_argument, "out is NULL", .{});
    p.* = s.memory.ptr;
    n.* = s.memory.len;
}

pub export fn kvmlab_snapshot_get_info(h: ?*const common.kvmlab_snapshot, out: ?*common.kvmlab_snapshot_info) callconv(.c) common.kvmlab_result {
    return common.call(snapInfo, .{ h, out });
}
fn snapInfo(h: ?*const common.kvmlab_snapshot, out: ?*common.kvmlab_snapshot_info) errors.Error!void {
    const s = try common.asSnap(h);
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
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

pub export fn kvmlab_snapshot_free(h: ?*common.kvmlab_snapshot) callconv(.c) void {
    const s = common.asSnap(h) catch return;
    s.release();
}

