//! The restore floor: the bare KVM ioctls and memory operations a restore
//! needs, with every buffer prepared beforehand and no checks, so benchmarks
//! can show kvmlab's restore as a ratio of what this host physically allows.
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const vm_mod = @import("vm.zig");
const Vm = vm_mod.Vm;

/// Times the bare restore operations into `vm`, a fresh empty shell of the
/// snapshot's shape (the shell is used up: free it afterwards).
pub fn restoreFloor(vm: *Vm, s: *const snapshot.Snapshot, use_map: bool, times: *snapshot.RestoreTimes) errors.Error!void {
    const p = &s.parsed;
    if (p.memory_bytes != vm.mem.len or p.vcpus != vm.vcpu_count or vm.booted)
        return errors.fail(error.Config, "the floor needs a fresh shell of the snapshot's shape", .{});
    const t0 = vm_mod.monotonicNs();
    if (use_map) {
        const addr = linux.mmap(vm.mem.ptr, vm.mem.len, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .FIXED = true, .NORESERVE = true }, s.fd, @intCast(s.memory_offset));
        if (linux.errno(addr) != .SUCCESS) return errors.fail(error.KvmFailed, "mmap failed", .{});
    } else {
        try snapshot.copyPresent(vm.mem, s.memory, p.pageMap(), false, s.fileBacked());
    }
    const t1 = vm_mod.monotonicNs();
    var st: snapshot.RestoreTimes = .{};
    try vcpuAndDevices(vm, p, &st);
    times.* = .{ .memory_ns = t1 - t0, .vcpu_ns = st.vcpu_ns, .devices_ns = st.devices_ns };
}

/// The vCPU and VM state ioctls of a restore, from prepared buffers.
fn vcpuAndDevices(vm: *Vm, p: *const state.Parsed, times: *snapshot.RestoreTimes) errors.Error!void {
    const t1 = vm_mod.monotonicNs();
    // The order of state.restore (CPUID is the shell's: not timed there either
    // when unchanged): before MSRs, then MSRs, then the rest.
    const Op = struct { tag: state.Tag, req: u32 };
    const before_msrs = [_]Op{
        .{ .tag = .sregs, .req = kvm.KVM_SET_SREGS },
        .{ .tag = .regs, .req = kvm.KVM_SET_REGS },
        .{ .tag = .xsave, .req = kvm.KVM_SET_XSAVE },
        .{ .tag = .xcrs, .req = kvm.KVM_SET_XCRS },
    };
    const after_msrs = [_]Op{
        .{ .tag = .mp_state, .req = kvm.KVM_SET_MP_STATE },
        .{ .tag = .lapic, .req = kvm.KVM_SET_LAPIC },
        .{ .tag = .events, .req = kvm.KVM_SET_VCPU_EVENTS },
        .{ .tag = .debugregs, .req = kvm.KVM_SET_DEBUGREGS },
    };
    for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
        for (before_msrs) |op| if (p.get(op.tag, @intCast(i))) |d| {
            _ = kvm.ioctl(v.fd, op.req, @intFromPtr(d.ptr)) catch return errors.ioctlFailed("floor vCPU ioctl");
        };
        // MSRs: the blob holds bare entries; KVM wants the counted header.
        const msrs = p.get(.msrs, @intCast(i)).?;
        var buf: [8 + state.max_msrs * @sizeOf(kvm.MsrEntry)]u8 align(8) = undefined;
        std.mem.writeInt(u32, buf[0..4], @intCast(msrs.len / @sizeOf(kvm.MsrEntry)), .little);
        std.mem.writeInt(u32, buf[4..8], 0, .little);
        @memcpy(buf[8..][0..msrs.len], msrs);
        _ = kvm.ioctl(v.fd, kvm.KVM_SET_MSRS, @intFromPtr(&buf)) catch return errors.ioctlFailed("KVM_SET_MSRS");
        for (after_msrs) |op| if (p.get(op.tag, @intCast(i))) |d| {
            _ = kvm.ioctl(v.fd, op.req, @intFromPtr(d.ptr)) catch return errors.ioctlFailed("floor vCPU ioctl");
        };
    }
    const t2 = vm_mod.monotonicNs();
    for ([_]state.Tag{ .pic_master, .pic_slave, .ioapic }, 0..) |tag, chip| {
        var ic: [8 + 512]u8 align(8) = undefined;
        @memcpy(ic[0..kvm.IRQCHIP_BYTES], p.get(tag, state.vm_wide).?);
        std.mem.writeInt(u32, ic[0..4], @intCast(chip), .little);
        _ = kvm.ioctl(vm.vm_fd, kvm.KVM_SET_IRQCHIP, @intFromPtr(&ic)) catch return errors.ioctlFailed("KVM_SET_IRQCHIP");
    }
    _ = kvm.ioctl(vm.vm_fd, kvm.KVM_SET_PIT2, @intFromPtr(p.get(.pit2, state.vm_wide).?.ptr)) catch return errors.ioctlFailed("KVM_SET_PIT2");
    if (p.get(.clock, state.vm_wide)) |c| {
        var clock: [kvm.CLOCK_DATA_BYTES]u8 align(8) = undefined;
        @memcpy(&clock, c);
        std.mem.writeInt(u32, clock[8..12], 0, .little);
        _ = kvm.ioctl(vm.vm_fd, kvm.KVM_SET_CLOCK, @intFromPtr(&clock)) catch {};
    }
    const t3 = vm_mod.monotonicNs();
    times.* = .{ .vcpu_ns = t2 - t1, .devices_ns = t3 - t2 };
}

/// The reset floor: the bare operations of a reset of a resettable VM (read
/// and clear the dirty log, copy the dirty pages back with memcpy, the vCPU
/// and VM state ioctls), no checks. The VM ends up reset (host writes made
/// through write_memory are not covered: use guest writes).
pub fn resetFloor(vm: *Vm, times: *snapshot.RestoreTimes, dirty_out: *u64) errors.Error!void {
    const s = vm.reset_snap orelse return errors.fail(error.Busy, "the VM is not resettable", .{});
    const p = &s.parsed;
    const words = (vm.mem.len / 4096 + 63) / 64;
    var stack_buf: [2048]u64 = undefined;
    if (words > stack_buf.len) return errors.fail(error.Config, "the reset floor handles guests up to 512 MiB", .{});
    const bitmap = stack_buf[0..words];
    const t0 = vm_mod.monotonicNs();
    @memset(bitmap, 0);
    const DirtyLog = extern struct { slot: u32, padding: u32 = 0, bitmap: u64 };
    var log = DirtyLog{ .slot = 0, .bitmap = @intFromPtr(bitmap.ptr) };
    _ = kvm.ioctl(vm.vm_fd, kvm.KVM_GET_DIRTY_LOG, @intFromPtr(&log)) catch return errors.ioctlFailed("KVM_GET_DIRTY_LOG");
    var dirty: u64 = 0;
    const map = p.pageMap();
    for (bitmap, 0..) |w, wi| {
        var bits = w;
        while (bits != 0) {
            const b: u6 = @intCast(@ctz(bits));
            bits &= bits - 1;
            const page = wi * 64 + b;
            const dst = vm.mem[page * 4096 ..][0..4096];
            if (snapshot.isPresent(map, page)) @memcpy(dst, s.memory[page * 4096 ..][0..4096]) else @memset(dst, 0);
            dirty += 1;
        }
    }
    const t1 = vm_mod.monotonicNs();
    var st: snapshot.RestoreTimes = .{};
    try vcpuAndDevices(vm, p, &st);
    times.* = .{ .memory_ns = t1 - t0, .vcpu_ns = st.vcpu_ns, .devices_ns = st.devices_ns };
    dirty_out.* = dirty;
    // kvmlab's own per-vCPU run state (not timed: bookkeeping, not KVM), so
    // the VM really is back at the snapshot and the next run runs the guest.
    for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
        const hv = std.mem.bytesToValue(state.HostVcpu, p.get(.host_vcpu, @intCast(i)).?);
        v.status = @enumFromInt(hv.status);
        v.exit_code = hv.exit_code;
        v.checkpoint_tag = hv.checkpoint_tag;
    }
    vm.crash_len = 0;
}
