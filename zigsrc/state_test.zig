//! Unit tests of state.zig: every step of state.parse reached by a minimal
//! mutation of a valid blob, and the records table. No KVM needed.
const std = @import("std");
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const cpuid = @import("cpuid.zig");

/// A minimal valid blob for tests: one vCPU, 8 MiB, every required record
/// (zeros), XSAVE-less (FPU).
pub fn testBlob(buf: []u8) []u8 {
    var off: usize = state.header_bytes;
    @memset(buf, 0);
    @memcpy(buf[0..8], &state.magic);
    std.mem.writeInt(u16, buf[8..10], state.version_major, .little);
    std.mem.writeInt(u32, buf[12..16], 1, .little);
    std.mem.writeInt(u64, buf[16..24], boot.min_memory_bytes, .little);
    var count: u32 = 0;
    inline for (state.vcpu_records ++ state.vm_records, 0..) |r, k| {
        const is_vm = k >= state.vcpu_records.len;
        const want = r.required or r.tag == .fpu;
        if (want) {
            const len: u32 = switch (r.io) {
                .msrs => 0,
                .cpuid => @sizeOf(kvm.CpuidEntry2),
                .page_map => @intCast(state.pageMapBytes(boot.min_memory_bytes)),
                else => r.fixedBytes(),
            };
            std.mem.writeInt(u32, buf[off..][0..4], @intFromEnum(r.tag), .little);
            std.mem.writeInt(u32, buf[off + 4 ..][0..4], if (is_vm) state.vm_wide else 0, .little);
            std.mem.writeInt(u32, buf[off + 8 ..][0..4], len, .little);
            off += state.record_header_bytes + std.mem.alignForward(usize, len, 8);
            count += 1;
        }
    }
    std.mem.writeInt(u32, buf[24..28], count, .little);
    return buf[0..off];
}

fn expectCheck(want: errors.Check, blob: []const u8) !void {
    try std.testing.expectError(error.Snapshot, state.parse(blob));
    try std.testing.expectEqual(want, errors.lastCheck());
}

test "state: the minimal blob parses" {
    var buf: [8192]u8 align(8) = undefined;
    const p = try state.parse(testBlob(&buf));
    try std.testing.expectEqual(@as(u32, 1), p.vcpus);
    try std.testing.expect(p.get(.fpu, 0) != null and p.get(.xsave, 0) == null);
}

test "state: every parse step fails with its own check id" {
    var buf: [8192]u8 align(8) = undefined;
    const good = testBlob(&buf);
    var m: [8192]u8 align(8) = undefined;
    try expectCheck(.state_size, good[0..8]);
    @memcpy(m[0..good.len], good);
    m[0] = 'X';
    try expectCheck(.state_magic, m[0..good.len]);
    @memcpy(m[0..good.len], good);
    std.mem.writeInt(u16, m[8..10], 2, .little);
    try expectCheck(.state_version, m[0..good.len]);
    @memcpy(m[0..good.len], good);
    std.mem.writeInt(u32, m[12..16], 0, .little);
    try expectCheck(.state_shape, m[0..good.len]);
    @memcpy(m[0..good.len], good);
    std.mem.writeInt(u32, m[24..28], state.max_records + 1, .little);
    try expectCheck(.state_record_count, m[0..good.len]);
    @memcpy(m[0..good.len], good);
    std.mem.writeInt(u32, m[state.header_bytes..][0..4], 31, .little); // unknown tag
    try expectCheck(.state_record, m[0..good.len]);
    @memcpy(m[0..good.len], good);
    m[good.len] = 0;
    try expectCheck(.state_trailing, m[0 .. good.len + 8]);
    @memcpy(m[0..good.len], good);
    std.mem.writeInt(u32, m[24..28], std.mem.readInt(u32, good[24..28], .little) - 1, .little);
    try expectCheck(.state_trailing, m[0..good.len]);
}

test "state: a blob without a required record is refused" {
    var buf: [8192]u8 align(8) = undefined;
    const good = testBlob(&buf);
    // The first record is CPUID (vCPU 0): rename it to an optional tag.
    std.mem.writeInt(u32, buf[state.header_bytes..][0..4], @intFromEnum(state.Tag.debugregs), .little);
    try std.testing.expectError(error.Snapshot, state.parse(good));
}

test "state: records table covers every tag once, required records have a fixed or checked size" {
    try std.testing.expectEqual(std.meta.tags(state.Tag).len, state.vcpu_records.len + state.vm_records.len);
    try std.testing.expectEqual(@as(u32, @sizeOf(kvm.Regs)), state.vcpu_records[2].fixedBytes());
    try std.testing.expectEqual(state.Tag.regs, state.vcpu_records[2].tag);
    // CPUID before SREGS before REGS; XSAVE/XCRS before MSRS; LAPIC before EVENTS.
    const order = struct {
        fn at(t: state.Tag) usize {
            for (state.vcpu_records, 0..) |r, i| if (r.tag == t) return i;
            unreachable;
        }
    };
    try std.testing.expect(order.at(.cpuid) < order.at(.sregs));
    try std.testing.expect(order.at(.sregs) < order.at(.regs));
    try std.testing.expect(order.at(.xsave) < order.at(.msrs) and order.at(.xcrs) < order.at(.msrs));
    try std.testing.expect(order.at(.mp_state) < order.at(.lapic) and order.at(.lapic) < order.at(.events));
}

test "state: sameAsShell ignores APIC ids and OSXSAVE only" {
    var e = [_]kvm.CpuidEntry2{.{ .function = 1, .index = 0, .flags = 0, .eax = 1, .ebx = 0x0300_0000, .ecx = 1 << 27, .edx = 0, .padding = @splat(0) }};
    var w = e;
    w[0].ebx = 0x0100_0000; // vCPU 1's APIC id
    w[0].ecx = 0;
    try std.testing.expect(cpuid.sameAsShell(std.mem.sliceAsBytes(&w), &e, 1));
    w[0].eax = 2;
    try std.testing.expect(!cpuid.sameAsShell(std.mem.sliceAsBytes(&w), &e, 1));
}

test "state: every skip_if_default record has its own at_default bit per vCPU, and one VM-wide" {
    var seen: u64 = 0;
    var count: u32 = 0;
    inline for (state.vcpu_records) |r| if (r.skip_if_default) {
        for (0..boot.max_vcpus) |i| {
            const b = state.defaultBit(r.tag, @intCast(i));
            try std.testing.expect(seen & b == 0);
            seen |= b;
            count += 1;
        }
    };
    inline for (state.vm_records) |r| if (r.skip_if_default) {
        const b = state.defaultBit(r.tag, state.vm_wide);
        try std.testing.expect(seen & b == 0);
        seen |= b;
        count += 1;
    };
    try std.testing.expectEqual(count, @popCount(seen));
    try std.testing.expect(count > boot.max_vcpus); // some of each table
}
