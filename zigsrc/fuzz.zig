//! Coverage-guided fuzzing of everything that parses untrusted bytes: the
//! snapshot container (snapshot.check + fromBytes), full-layout snapshot
//! files (snapshot.load: size, section and hole checks on a file), the state
//! blob (state.parse) and guest images (boot.loadImage's ELF reader).
//!
//!   python -m ziglang build test                  replays the seed corpus
//!   python -m ziglang build test --fuzz=20M       fuzzes (see docs/reliability.md)
//!
//! Seeds (zigsrc/fuzz_corpus/) are real snapshots of built-in guests saved by
//! kvmlab (`Snapshot.to_bytes`; the .state seed is a snapshot's `vcpu_state`;
//! the .full-prefix seed is the first 16 KiB, header and STATE, of a
//! `Snapshot.save` file of a guest whose memory is all zeros, so its MEMORY is
//! all holes): after a format change, save new ones the same way. spin.elf
//! is a minimal static ELF guest (one PT_LOAD of `jmp $` at 1 MiB), written
//! by hand as tests/test_guests.py builds its bad ones.
//!
//! How the harness reads an input (std.testing.Smith, Zig 0.17.1): `slice`
//! takes a u32 little-endian length, then that many bytes. Seeds are stored
//! raw and framed that way here (`framed`), or they would arrive cut by 4
//! bytes ("SNAP..." instead of "KVMLSNAP...") and never pass the magic check.
const std = @import("std");
const linux = std.os.linux;
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");

const raw_seeds = [_][]const u8{
    @embedFile("fuzz_corpus/counter-8mib.snap"),
    @embedFile("fuzz_corpus/hello-2vcpu.snap"),
    @embedFile("fuzz_corpus/counter-8mib.state"),
    @embedFile("fuzz_corpus/zeroed-8mib.full-prefix"),
    @embedFile("fuzz_corpus/spin.elf"),
};

/// What each raw seed must get through, replayed through the fuzz entry.
const seed_expect = [raw_seeds.len]Reached{
    .{ .bytes = true, .bytes_fixed = true },
    .{ .bytes = true, .bytes_fixed = true },
    .{ .state = true },
    .{ .file = true, .file_fixed = true },
    .{ .image = true },
};

/// A seed as Smith.slice reads it: its length (u32 LE), then its bytes.
fn framed(comptime bytes: []const u8) []const u8 {
    comptime {
        var len: [4]u8 = undefined;
        std.mem.writeInt(u32, &len, bytes.len, .little);
        const out = len ++ bytes[0..bytes.len].*;
        return &out;
    }
}

const seeds = blk: {
    var out: [raw_seeds.len][]const u8 = undefined;
    for (raw_seeds, 0..) |s, i| out[i] = framed(s);
    break :blk out;
};

/// Largest input the fuzzer builds (seeds are smaller).
const max_input = 96 * 1024;
/// Largest file the full-layout target builds (sparse: holes cost nothing).
const max_file_bytes = 2 * boot.min_memory_bytes;

/// Which parsers accepted an input.
const Reached = packed struct(u6) {
    bytes: bool = false,
    bytes_fixed: bool = false,
    file: bool = false,
    file_fixed: bool = false,
    state: bool = false,
    image: bool = false,
};

fn oneInput(_: void, smith: *std.testing.Smith) anyerror!void {
    var buf: [max_input]u8 align(16) = undefined;
    const n = smith.slice(&buf);
    _ = try parseAll(buf[0..n]);
}

/// Every parser on `input`. Whatever the bytes, each either accepts them or
/// returns its error; a crash or hang is a bug (leaks are not seen: the
/// parsers use the C allocator).
fn parseAll(input: []const u8) !Reached {
    var got: Reached = .{};
    if (snapshot.fromBytes(input)) |s| {
        std.debug.assert(s.parsed.vcpus >= 1 and s.parsed.vcpus <= boot.max_vcpus);
        s.release();
        got.bytes = true;
    } else |e| try expectKnown(e, error.Snapshot);
    // The same bytes with their checksums made right, so mutations reach the
    // checks after the CRCs (section contents, the state blob, page maps).
    if (input.len >= snapshot.header_bytes) {
        var fixed: [max_input]u8 align(16) = undefined;
        @memcpy(fixed[0..input.len], input);
        snapshot.fixChecksums(fixed[0..input.len]);
        if (snapshot.fromBytes(fixed[0..input.len])) |s| {
            s.release();
            got.bytes_fixed = true;
        } else |e| try expectKnown(e, error.Snapshot);
    }
    got.file = try loadAsFile(input, false);
    got.file_fixed = try loadAsFile(input, true);
    if (state.parse(input)) |p| {
        std.debug.assert(p.pageMap().len == state.pageMapBytes(p.memory_bytes));
        got.state = true;
    } else |e| try expectKnown(e, error.Snapshot);
    if (boot.loadImage(image_memory(), input)) |entry| {
        std.debug.assert(entry >= boot.image_gpa and entry < boot.image_end_gpa);
        got.image = true;
    } else |e| try expectKnown(e, error.Guest);
    return got;
}

/// The input as the beginning of a snapshot file (a memfd), extended with
/// holes to the total size its header claims (at most `max_file_bytes`), then
/// `snapshot.load`: the file-only checks (size, full layout, SEEK_DATA/HOLE
/// walk of non-present pages). `fix`: checksums made right on the whole file
/// first. True when load accepted it.
fn loadAsFile(input: []const u8, fix: bool) !bool {
    if (fix and input.len < snapshot.header_bytes) return false;
    const rc = linux.memfd_create("kvmlab-fuzz", linux.MFD.CLOEXEC);
    if (linux.errno(rc) != .SUCCESS) return false; // out of fds: not the parser's fault
    const fd: linux.fd_t = @intCast(rc);
    defer _ = linux.close(fd);
    var done: usize = 0;
    while (done < input.len) {
        const w = linux.write(fd, input[done..].ptr, input.len - done);
        if (linux.errno(w) != .SUCCESS) return false;
        done += w;
    }
    var size: u64 = input.len;
    if (input.len >= 56) {
        const claimed = std.mem.readInt(u64, input[48..56], .little);
        if (claimed > size and claimed <= max_file_bytes) {
            if (linux.errno(linux.ftruncate(fd, @intCast(claimed))) != .SUCCESS) return false;
            size = claimed;
        }
    }
    if (fix) {
        const addr = linux.mmap(null, size, .{ .READ = true, .WRITE = true }, .{ .TYPE = .SHARED }, fd, 0);
        if (linux.errno(addr) != .SUCCESS) return false;
        const m = @as([*]u8, @ptrFromInt(addr))[0..size];
        snapshot.fixChecksums(m);
        _ = linux.munmap(m.ptr, m.len);
    }
    var path_buf: [32]u8 = undefined;
    const path = std.fmt.bufPrintSentinel(&path_buf, "/proc/self/fd/{d}", .{fd}, 0) catch unreachable;
    if (snapshot.load(path.ptr)) |s| {
        std.debug.assert(s.parsed.vcpus >= 1 and s.parsed.vcpus <= boot.max_vcpus);
        s.release();
        return true;
    } else |e| try expectKnown(e, error.Snapshot);
    return false;
}

fn expectKnown(got: errors.Error, want: errors.Error) !void {
    if (got == error.OutOfMemory) return;
    try std.testing.expectEqual(want, got);
}

/// Guest memory for image loading, allocated once (8 MiB, never freed).
var image_mem: ?[]align(4096) u8 = null;
fn image_memory() []u8 {
    if (image_mem == null) image_mem = std.heap.page_allocator.alignedAlloc(u8, .fromByteUnits(4096), boot.min_memory_bytes) catch @panic("no memory for the fuzz harness");
    return image_mem.?;
}

test "fuzz: snapshot bytes and files, state and image parsers" {
    try std.testing.fuzz({}, oneInput, .{ .corpus = &seeds });
}

test "every seed, read through the fuzz entry as the harness reads it, gets through its parser" {
    for (seeds, seed_expect, 0..) |seed, want, i| {
        var smith: std.testing.Smith = .{ .in = seed };
        var buf: [max_input]u8 align(16) = undefined;
        const n = smith.slice(&buf);
        try std.testing.expectEqual(raw_seeds[i].len, n);
        const got = try parseAll(buf[0..n]);
        const missing = @as(u6, @bitCast(want)) & ~@as(u6, @bitCast(got));
        if (missing != 0) {
            std.debug.print("seed {d}: wanted {any}, got {any}\n", .{ i, want, got });
            return error.TestUnexpectedResult;
        }
    }
}

test "a seed stored raw (unframed) would arrive cut by 4 bytes and fail the magic check" {
    var smith: std.testing.Smith = .{ .in = raw_seeds[0] };
    var buf: [max_input]u8 align(16) = undefined;
    const n = smith.slice(&buf);
    try std.testing.expect(!std.mem.startsWith(u8, buf[0..n], "KVMLSNAP"));
    try std.testing.expectError(error.Snapshot, snapshot.fromBytes(buf[0..n]));
}
