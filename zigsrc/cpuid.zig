//! CPUID as this host's KVM presents it: the effective CPUID of a fresh
//! vCPU (read once), and whether a snapshot's CPUID record equals it (then
//! restore skips KVM_SET_CPUID2). Used by state.zig's host check.
const std = @import("std");
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const host = @import("host.zig");

const allocator = std.heap.c_allocator;

/// The CPUID a fresh vCPU of this host presents to its guest (what KVM
/// reports after SET_CPUID2 with the supported set), read once.
var effective_lock: std.c.pthread_mutex_t = .{};
var effective_buf: ?*kvm.CpuidBuf = null;

pub fn effective(vcpu: kvm.VcpuFd) errors.Error![]const kvm.CpuidEntry2 {
    _ = std.c.pthread_mutex_lock(&effective_lock);
    defer _ = std.c.pthread_mutex_unlock(&effective_lock);
    if (effective_buf == null) {
        const b = allocator.create(kvm.CpuidBuf) catch return error.OutOfMemory;
        b.* = .{ .nent = host.max_cpuid_entries };
        vcpu.getCpuid2(b) catch {
            allocator.destroy(b);
            return errors.ioctlFailed("KVM_GET_CPUID2");
        };
        effective_buf = b;
    }
    return effective_buf.?.entries[0..@min(effective_buf.?.nent, host.max_cpuid_entries)];
}

/// True when `cpuid` (a snapshot's record for vCPU `idx`) equals what a fresh
/// shell's vCPU `idx` presents: the effective CPUID with that vCPU's APIC id.
pub fn sameAsShell(cpuid: []const u8, effective_entries: []const kvm.CpuidEntry2, idx: u32) bool {
    const want = std.mem.bytesAsSlice(kvm.CpuidEntry2, cpuid);
    if (want.len != effective_entries.len) return false;
    for (want, effective_entries) |w_unaligned, e0| {
        var w: kvm.CpuidEntry2 = w_unaligned;
        var e = e0;
        host.setApicId(&e, idx);
        if (e.function == 1) {
            // OSXSAVE mirrors CR4 and may differ between capture and a fresh vCPU.
            w.ecx &= ~@as(u32, 1 << 27);
            e.ecx &= ~@as(u32, 1 << 27);
        }
        if (!std.mem.eql(u8, std.mem.asBytes(&w), std.mem.asBytes(&e))) return false;
    }
    return true;
}

pub fn find(entries: []const kvm.CpuidEntry2, function: u32, index: u32) ?kvm.CpuidEntry2 {
    for (entries) |e| if (e.function == function and e.index == index) return e;
    return null;
}
