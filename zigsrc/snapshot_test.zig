//! Unit tests of snapshot.check: a valid packed image built without KVM
//! (one vCPU, 8 MiB, one present page), then every step of `check_order`
//! reached by a minimal mutation of it, each refused with its own check id.
const std = @import("std");
const errors = @import("errors.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const state_test = @import("state_test.zig");

const Image = struct {
    buf: [32 << 10]u8 align(4096) = undefined,
    len: usize = 0,
    h: snapshot.Header = undefined,
    /// Recompute every checksum after the mutation (to reach later steps).
    fix: bool = false,

    fn valid(img: *Image) void {
        var blob_buf: [8192]u8 align(8) = undefined;
        const blob = state_test.testBlob(&blob_buf);
        const map = (state.parse(blob) catch unreachable).pageMap();
        blob_buf[@intFromPtr(map.ptr) - @intFromPtr(blob.ptr)] |= 1; // page 0 present
        var memory: [4096]u8 align(4096) = @splat(0xAB);
        const s = snapshot.Snapshot{
            .blob = blob,
            .parsed = state.parse(blob) catch unreachable,
            .memory = &memory,
            .memory_owned = false,
            .present_pages = 1,
            .created_unix_ns = 1,
            .stored_bytes = 0,
        };
        img.len = @intCast(snapshot.encodedBytes(&s));
        snapshot.toBytes(&s, img.buf[0..img.len]) catch unreachable;
        img.h = snapshot.readHeader(&img.buf);
    }

    fn bytes(img: *Image) []u8 {
        @memcpy(img.buf[0..@sizeOf(snapshot.Header)], std.mem.asBytes(&img.h));
        if (img.fix) snapshot.fixChecksums(img.buf[0..img.len]);
        return img.buf[0..img.len];
    }
};

fn expectRefused(want: errors.Check, data: []const u8) !void {
    try std.testing.expectError(error.Snapshot, snapshot.check(data));
    try std.testing.expectEqual(want, errors.lastCheck());
}

test "snapshot: the test image passes every check and loads" {
    var img: Image = .{};
    img.valid();
    const c = try snapshot.check(img.bytes());
    try std.testing.expect(c.packed_layout);
    try std.testing.expectEqual(@as(u64, 1), c.present_pages);
    const s = try snapshot.fromBytes(img.bytes());
    defer s.release();
    try std.testing.expectEqual(@as(u8, 0xAB), s.memory[0]);
}

test "snapshot: check_order runs the steps in the order of their ids" {
    for (snapshot.check_order[1..], snapshot.check_order[0 .. snapshot.check_order.len - 1]) |later, earlier|
        try std.testing.expect(@intFromEnum(later) > @intFromEnum(earlier));
}

test "snapshot: a mutation that breaks two steps is refused by the earlier one" {
    var img: Image = .{};
    img.valid();
    img.h.vcpus = 2; // vcpu_count, but the header CRC is not fixed
    img.h.version_major = 9; // version comes first
    try expectRefused(.version, img.bytes());
}

/// A valid image with the minimal mutation that check step `id` must refuse
/// (and no earlier step); returns the bytes to check. Steps that come after
/// the checksums get them recomputed (`fix`), so only their own step trips.
fn mutated(img: *Image, comptime id: errors.Check) []u8 {
    img.* = .{};
    img.valid();
    const h = &img.h;
    switch (id) {
        .size => return img.bytes()[0..100], // truncated below the header
        .magic => h.magic[0] = 'X',
        .version => h.version_major = 2, // a newer major version
        .arch => h.arch = 2, // another architecture
        .header_size => h.header_bytes = 0, // other than 4096
        .section_count => h.section_count = 3,
        .total_bytes => img.len -= 1, // one byte short
        .section_kind => h.sections[0].kind = 2, // STATE labelled MEMORY
        .state_limit => h.sections[0].bytes = state.max_blob_bytes + 1,
        .section_bounds => h.sections[1].offset = 1 << 40, // MEMORY past the end
        .memory_alignment => h.sections[1].offset -= 1, // MEMORY one byte early
        .section_overlap => h.sections[0].bytes = h.sections[1].offset - h.sections[0].offset + 1, // STATE into MEMORY
        .memory_size => h.memory_bytes = 3 << 20,
        .present_pages => h.present_pages = 1 << 40, // more than the guest has
        .flags => h.flags |= 2, // an unknown flag
        .memory_section_size => h.sections[1].bytes = 0, // an empty MEMORY section
        .reserved => h.reserved[0] = 1,
        .padding => img.buf[@intCast(h.sections[0].offset + h.sections[0].bytes)] = 1, // after STATE
        .header_crc => h.header_crc32c ^= 1,
        .state_crc => img.buf[@intCast(h.sections[0].offset + 40)] ^= 1,
        .memory_crc => img.buf[@intCast(h.sections[1].offset)] ^= 1,
        .state_magic => {
            img.buf[@intCast(h.sections[0].offset)] = 'X';
            img.fix = true;
        },
        .state_memory => { // header and STATE disagreeing on memory size
            h.memory_bytes = 10 << 20;
            img.fix = true;
        },
        .page_count => { // the header counting no present page
            h.present_pages = 0;
            h.sections[1].bytes = 0;
            img.fix = true;
        },
        .vcpu_count => { // the header claiming two vCPUs
            h.vcpus = 2;
            img.fix = true;
        },
        else => @compileError("no mutation for check step " ++ @tagName(id)),
    }
    return img.bytes();
}

test "snapshot: every check step refuses its minimal mutation, with its own id" {
    // check_order, and state.parse's magic step, reached through check.
    const steps = snapshot.check_order ++ [_]errors.Check{.state_magic};
    var img: Image = .{};
    inline for (steps) |id| {
        expectRefused(id, mutated(&img, id)) catch |e| {
            std.debug.print("check step {s}\n", .{@tagName(id)});
            return e;
        };
    }
}
