//! The process-wide KVM handle: /dev/kvm opened once, and what it reports that
//! every VM needs (vCPU mmap size, supported CPUID). Opened lazily on first use
//! so that importing the library never touches /dev/kvm.
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");

pub const max_cpuid_entries = kvm.max_cpuid_entries;

pub const Host = struct {
    system: kvm.System,
    api_version: u32,
    vcpu_mmap_bytes: usize,
    /// KVM_GET_SUPPORTED_CPUID, set as-is on every vCPU (with its APIC id).
    cpuid_count: u32,
    cpuid: [max_cpuid_entries]kvm.CpuidEntry2,
};

var host: Host = undefined;
var state = std.atomic.Value(u8).init(0); // 0 = not opened, 1 = opening, 2 = ready
var open_check: errors.Check = .kvm_open;
var open_message: [512]u8 = undefined;
var open_message_len: usize = 0;

/// Returns the opened host, opening /dev/kvm on first use. Thread-safe.
pub fn get() errors.Error!*const Host {
    while (true) {
        switch (state.load(.acquire)) {
            2 => return &host,
            3 => {
                return errors.fail(open_check, "{s}", .{open_message[0..open_message_len]});
            },
            0 => if (state.cmpxchgStrong(0, 1, .acquire, .monotonic) == null) {
                if (open()) {
                    state.store(2, .release);
                } else |e| {
                    if (transient) {
                        // EMFILE, ENOMEM...: the next call tries again.
                        state.store(0, .release);
                        return e;
                    }
                    // Remember permanent failures, so a missing /dev/kvm fails fast and
                    // the message stays the same for every caller.
                    open_check = if (errors.lastCheck() == .none) .kvm_open else errors.lastCheck();
                    const m = std.mem.span(errors.message());
                    open_message_len = @min(m.len, open_message.len);
                    @memcpy(open_message[0..open_message_len], m[0..open_message_len]);
                    state.store(3, .release);
                }
            },
            else => std.atomic.spinLoopHint(),
        }
    }
}

/// Whether the last open() failure may go away (resource limits).
var transient = false;

fn open() errors.Error!void {
    transient = false;
    const rc = linux.open("/dev/kvm", .{ .ACCMODE = .RDWR, .CLOEXEC = true }, 0);
    switch (linux.errno(rc)) {
        .MFILE, .NFILE, .NOMEM, .INTR, .AGAIN => |e| {
            transient = true;
            return errors.fail(.kvm_open_limit, "cannot open /dev/kvm: E{s} (a resource limit: close files or raise RLIMIT_NOFILE, then retry)", .{@tagName(e)});
        },
        .SUCCESS => {},
        .NOENT => return errors.fail(.kvm_missing, "/dev/kvm does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization in the BIOS/hypervisor", .{}),
        .ACCES, .PERM => return errors.fail(.kvm_permission, "/dev/kvm: permission denied: add yourself to group kvm (sudo usermod -aG kvm $USER) and log in again", .{}),
        else => |e| return errors.fail(.kvm_open, "cannot open /dev/kvm: E{s}", .{@tagName(e)}),
    }
    const fd: linux.fd_t = @intCast(rc);
    errdefer _ = linux.close(fd);
    const system = kvm.System{ .fd = fd };
    const version = system.apiVersion() catch return errors.ioctlFailed("KVM_GET_API_VERSION");
    if (version != 12) return errors.fail(.kvm_api_version, "KVM API version {d}; kvmlab needs 12", .{version});
    const mmap_bytes = system.vcpuMmapSize() catch return errors.ioctlFailed("KVM_GET_VCPU_MMAP_SIZE");
    if (mmap_bytes < @sizeOf(kvm.Run) or mmap_bytes > 1 << 20)
        return errors.fail(.kvm_mmap_size, "KVM reports a vCPU mmap size of {d} bytes", .{mmap_bytes});
    const required = [_]struct { cap: u32, name: []const u8 }{
        .{ .cap = kvm.CAP_USER_MEMORY, .name = "KVM_CAP_USER_MEMORY" },
        .{ .cap = kvm.CAP_IRQCHIP, .name = "KVM_CAP_IRQCHIP" },
        .{ .cap = kvm.CAP_PIT2, .name = "KVM_CAP_PIT2" },
        .{ .cap = kvm.CAP_IMMEDIATE_EXIT, .name = "KVM_CAP_IMMEDIATE_EXIT" },
        .{ .cap = kvm.CAP_EXT_CPUID, .name = "KVM_CAP_EXT_CPUID" },
        .{ .cap = kvm.CAP_MP_STATE, .name = "KVM_CAP_MP_STATE" },
    };
    for (required) |r| {
        if (system.checkExtension(r.cap) == 0) return errors.fail(.kvm_capability, "this KVM lacks {s}, which kvmlab needs", .{r.name});
    }
    host.system = system;
    host.api_version = @intCast(version);
    host.vcpu_mmap_bytes = mmap_bytes;
    try loadCpuid(system);
}

fn loadCpuid(system: kvm.System) errors.Error!void {
    var buf: kvm.CpuidBuf = .{ .nent = max_cpuid_entries };
    system.getSupportedCpuid(&buf) catch return errors.ioctlFailed("KVM_GET_SUPPORTED_CPUID");
    if (buf.nent > max_cpuid_entries) return errors.fail(.cpuid_entries, "KVM returned {d} CPUID entries", .{buf.nent});
    host.cpuid_count = buf.nent;
    host.cpuid = buf.entries;
}

/// KVM_CHECK_EXTENSION on the system fd; 0 when absent.
pub fn checkExtension(cap: u32) errors.Error!u64 {
    const h = try get();
    return h.system.checkExtension(cap);
}

/// Sets the host's supported CPUID on a vCPU, with the vCPU's initial APIC id
/// (CPUID.1:EBX[31:24] and the x2APIC id in leaves 0xB/0x1F).
pub fn setVcpuCpuid(vcpu: kvm.VcpuFd, index: u32) errors.Error!void {
    const h = try get();
    var buf: kvm.CpuidBuf = .{ .nent = h.cpuid_count };
    @memcpy(buf.entries[0..h.cpuid_count], h.cpuid[0..h.cpuid_count]);
    for (buf.entries[0..h.cpuid_count]) |*e| setApicId(e, index);
    vcpu.setCpuid2(&buf) catch return errors.ioctlFailed("KVM_SET_CPUID2");
}

/// Puts vCPU `index`'s initial APIC id where a CPUID entry reports it
/// (CPUID.1:EBX[31:24], the x2APIC id in EDX of leaves 0xB/0x1F).
pub fn setApicId(e: *kvm.CpuidEntry2, index: u32) void {
    std.debug.assert(index <= 0xFF);
    if (e.function == 1) e.ebx = (e.ebx & 0x00FF_FFFF) | (index << 24);
    if (e.function == 0xB or e.function == 0x1F) e.edx = index;
}
