//! Coverage-guided fuzzing of everything that parses untrusted bytes: the
//! snapshot container (snapshot.check + fromBytes), the state blob
//! (state.parse) and guest images (boot.loadImage's ELF reader).
//!
//!   python -m ziglang build test                  replays the seed corpus
//!   python -m ziglang build test --fuzz=20M       fuzzes (see docs/reliability.md)
//!
//! Seeds (zigsrc/fuzz_corpus/) are real snapshots of built-in guests saved by
//! kvmlab (`Snapshot.save`; the .state seed is a snapshot's `vcpu_state`):
//! after a format change, save new ones the same way.
const std = @import("std");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");

const seeds = [_][]const u8{
    @embedFile("fuzz_corpus/counter-8mib.snap"),
    @embedFile("fuzz_corpus/hello-2vcpu.snap"),
    @embedFile("fuzz_corpus/counter-8mib.state"),
    "KVMLSNAP",
    "KVMLSTAT\x01\x00\x00\x00\x01\x00\x00\x00",
    "\x7fELF\x02\x01\x01",
};

/// Largest input the fuzzer builds (seeds are smaller).
const max_input = 96 * 1024;

fn oneInput(_: void, smith: *std.testing.Smith) anyerror!void {
    var buf: [max_input]u8 align(16) = undefined;
    const n = smith.slice(&buf);
    const input = buf[0..n];
    // Whatever the bytes, each parser either accepts them or returns its
    // error; a crash or hang is a bug (leaks are not seen: the parsers use
    // the C allocator).
    if (snapshot.fromBytes(input)) |s| {
        std.debug.assert(s.parsed.vcpus >= 1 and s.parsed.vcpus <= boot.max_vcpus);
        s.release();
    } else |e| try expectKnown(e, error.Snapshot);
    // The same bytes with their checksums made right, so mutations reach the
    // checks after the CRCs (section contents, the state blob, page maps).
    if (n >= snapshot.header_bytes) {
        var fixed: [max_input]u8 align(16) = undefined;
        @memcpy(fixed[0..n], input);
        snapshot.fixChecksums(fixed[0..n]);
        if (snapshot.fromBytes(fixed[0..n])) |s| s.release() else |e| try expectKnown(e, error.Snapshot);
    }
    if (state.parse(input)) |p| {
        std.debug.assert(p.pageMap().len == state.pageMapBytes(p.memory_bytes));
    } else |e| try expectKnown(e, error.Snapshot);
    if (boot.loadImage(image_memory(), input)) |entry| {
        std.debug.assert(entry >= boot.image_gpa and entry < boot.image_end_gpa);
    } else |e| try expectKnown(e, error.Guest);
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

test "fuzz: snapshot, state and image parsers" {
    try std.testing.fuzz({}, oneInput, .{ .corpus = &seeds });
}

test "seed corpus loads" {
    const s = try snapshot.fromBytes(seeds[0]);
    defer s.release();
    try std.testing.expectEqual(@as(u32, 1), s.parsed.vcpus);
    _ = try state.parse(seeds[2]);
}
