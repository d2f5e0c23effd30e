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

test "snapshot check size: truncated below the header" {
    var img: Image = .{};
    img.valid();
    try expectRefused(.size, img.bytes()[0..100]);
}

test "snapshot check magic: magic" {
    var img: Image = .{};
    img.valid();
    img.h.magic[0] = 'X';
    try expectRefused(.magic, img.bytes());
}

test "snapshot check version: a newer major version" {
    var img: Image = .{};
    img.valid();
    img.h.version_major = 2;
    try expectRefused(.version, img.bytes());
}

test "snapshot check arch: another architecture" {
    var img: Image = .{};
    img.valid();
    img.h.arch = 2;
    try expectRefused(.arch, img.bytes());
}

test "snapshot check header_size: a header size other than 4096" {
    var img: Image = .{};
    img.valid();
    img.h.header_bytes = 0;
    try expectRefused(.header_size, img.bytes());
}

test "snapshot check section_count: three sections" {
    var img: Image = .{};
    img.valid();
    img.h.section_count = 3;
    try expectRefused(.section_count, img.bytes());
}

test "snapshot check total_bytes: one byte short" {
    var img: Image = .{};
    img.valid();
    img.len -= 1;
    try expectRefused(.total_bytes, img.bytes());
}

test "snapshot check section_kind: STATE labelled MEMORY" {
    var img: Image = .{};
    img.valid();
    img.h.sections[0].kind = 2;
    try expectRefused(.section_kind, img.bytes());
}

test "snapshot check state_limit: a STATE section over its limit" {
    var img: Image = .{};
    img.valid();
    img.h.sections[0].bytes = state.max_blob_bytes + 1;
    try expectRefused(.state_limit, img.bytes());
}

test "snapshot check section_bounds: MEMORY past the end" {
    var img: Image = .{};
    img.valid();
    img.h.sections[1].offset = 1 << 40;
    try expectRefused(.section_bounds, img.bytes());
}

test "snapshot check memory_alignment: MEMORY one byte early" {
    var img: Image = .{};
    img.valid();
    img.h.sections[1].offset -= 1;
    try expectRefused(.memory_alignment, img.bytes());
}

test "snapshot check section_overlap: STATE running into MEMORY" {
    var img: Image = .{};
    img.valid();
    img.h.sections[0].bytes = img.h.sections[1].offset - img.h.sections[0].offset + 1;
    try expectRefused(.section_overlap, img.bytes());
}

test "snapshot check memory_size: 3 MiB of memory" {
    var img: Image = .{};
    img.valid();
    img.h.memory_bytes = 3 << 20;
    try expectRefused(.memory_size, img.bytes());
}

test "snapshot check present_pages: more present pages than the guest has" {
    var img: Image = .{};
    img.valid();
    img.h.present_pages = 1 << 40;
    try expectRefused(.present_pages, img.bytes());
}

test "snapshot check flags: an unknown flag" {
    var img: Image = .{};
    img.valid();
    img.h.flags |= 2;
    try expectRefused(.flags, img.bytes());
}

test "snapshot check memory_section_size: an empty MEMORY section" {
    var img: Image = .{};
    img.valid();
    img.h.sections[1].bytes = 0;
    try expectRefused(.memory_section_size, img.bytes());
}

test "snapshot check reserved: a reserved header byte" {
    var img: Image = .{};
    img.valid();
    img.h.reserved[0] = 1;
    try expectRefused(.reserved, img.bytes());
}

test "snapshot check padding: a byte in the padding after STATE" {
    var img: Image = .{};
    img.valid();
    img.buf[@intCast(img.h.sections[0].offset + img.h.sections[0].bytes)] = 1;
    try expectRefused(.padding, img.bytes());
}

test "snapshot check header_crc: a flipped header checksum" {
    var img: Image = .{};
    img.valid();
    img.h.header_crc32c ^= 1;
    try expectRefused(.header_crc, img.bytes());
}

test "snapshot check state_crc: a flipped STATE byte" {
    var img: Image = .{};
    img.valid();
    img.buf[@intCast(img.h.sections[0].offset + 40)] ^= 1;
    try expectRefused(.state_crc, img.bytes());
}

test "snapshot check state_magic: a STATE blob with a bad magic (checksums fixed)" {
    var img: Image = .{};
    img.valid();
    img.buf[@intCast(img.h.sections[0].offset)] = 'X';
    img.fix = true;
    try expectRefused(.state_magic, img.bytes());
}

test "snapshot check state_memory: header and STATE disagreeing on memory size (checksums fixed)" {
    var img: Image = .{};
    img.valid();
    img.h.memory_bytes = 10 << 20;
    img.fix = true;
    try expectRefused(.state_memory, img.bytes());
}

test "snapshot check page_count: the header counting no present page (checksums fixed)" {
    var img: Image = .{};
    img.valid();
    img.h.present_pages = 0;
    img.h.sections[1].bytes = 0;
    img.fix = true;
    try expectRefused(.page_count, img.bytes());
}

test "snapshot check memory_crc: a flipped MEMORY byte" {
    var img: Image = .{};
    img.valid();
    img.buf[@intCast(img.h.sections[1].offset)] ^= 1;
    try expectRefused(.memory_crc, img.bytes());
}

test "snapshot check vcpu_count: the header claiming two vCPUs (checksums fixed)" {
    var img: Image = .{};
    img.valid();
    img.h.vcpus = 2;
    img.fix = true;
    try expectRefused(.vcpu_count, img.bytes());
}
