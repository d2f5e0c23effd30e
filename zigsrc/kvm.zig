//! The KVM API for x86_64, typed: the uapi structs kvmlab uses and one
//! wrapper type per kind of file descriptor (`System` for /dev/kvm, `VmFd`,
//! `VcpuFd`), each ioctl written once with typed arguments and results (the
//! shape of rust-vmm's kvm-ioctls). Nothing outside this file issues an ioctl.
//! Numbers were taken from <linux/kvm.h>; struct sizes are asserted at compile
//! time against the kernel's (see the `comptime` block).
const std = @import("std");
const linux = std.os.linux;

const KVM_GET_API_VERSION: u32 = 0xae00;
const KVM_CREATE_VM: u32 = 0xae01;
const KVM_GET_MSR_INDEX_LIST: u32 = 0xc004ae02;
const KVM_CHECK_EXTENSION: u32 = 0xae03;
const KVM_GET_VCPU_MMAP_SIZE: u32 = 0xae04;
const KVM_GET_SUPPORTED_CPUID: u32 = 0xc008ae05;
const KVM_CREATE_VCPU: u32 = 0xae41;
const KVM_GET_DIRTY_LOG: u32 = 0x4010ae42;
const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020ae46;
const KVM_SET_TSS_ADDR: u32 = 0xae47;
const KVM_SET_IDENTITY_MAP_ADDR: u32 = 0x4008ae48;
const KVM_CREATE_IRQCHIP: u32 = 0xae60;
const KVM_GET_IRQCHIP: u32 = 0xc208ae62;
const KVM_SET_IRQCHIP: u32 = 0x8208ae63;
const KVM_CREATE_PIT2: u32 = 0x4040ae77;
const KVM_GET_PIT2: u32 = 0x8070ae9f;
const KVM_SET_PIT2: u32 = 0x4070aea0;
const KVM_SET_CLOCK: u32 = 0x4030ae7b;
const KVM_GET_CLOCK: u32 = 0x8030ae7c;
const KVM_RUN: u32 = 0xae80;
const KVM_GET_REGS: u32 = 0x8090ae81;
const KVM_SET_REGS: u32 = 0x4090ae82;
const KVM_GET_SREGS: u32 = 0x8138ae83;
const KVM_SET_SREGS: u32 = 0x4138ae84;
const KVM_GET_MSRS: u32 = 0xc008ae88;
const KVM_SET_MSRS: u32 = 0x4008ae89;
const KVM_SET_CPUID2: u32 = 0x4008ae90;
const KVM_GET_CPUID2: u32 = 0xc008ae91;
const KVM_GET_LAPIC: u32 = 0x8400ae8e;
const KVM_SET_LAPIC: u32 = 0x4400ae8f;
const KVM_GET_FPU: u32 = 0x81a0ae8c;
const KVM_SET_FPU: u32 = 0x41a0ae8d;
const KVM_GET_MP_STATE: u32 = 0x8004ae98;
const KVM_SET_MP_STATE: u32 = 0x4004ae99;
const KVM_GET_VCPU_EVENTS: u32 = 0x8040ae9f;
const KVM_SET_VCPU_EVENTS: u32 = 0x4040aea0;
const KVM_GET_DEBUGREGS: u32 = 0x8080aea1;
const KVM_SET_DEBUGREGS: u32 = 0x4080aea2;
const KVM_GET_XSAVE: u32 = 0x9000aea4;
const KVM_SET_XSAVE: u32 = 0x5000aea5;
const KVM_GET_XSAVE2: u32 = 0x9000aecf;
const KVM_GET_XCRS: u32 = 0x8188aea6;
const KVM_SET_XCRS: u32 = 0x4188aea7;
const KVM_SET_TSC_KHZ: u32 = 0xaea2;
const KVM_GET_TSC_KHZ: u32 = 0xaea3;
const KVM_CLEAR_DIRTY_LOG: u32 = 0xc018aec0;
const KVM_ENABLE_CAP: u32 = 0x4068aea3;
const KVM_KVMCLOCK_CTRL: u32 = 0xaead;
/// _IOW(KVMIO, 0x8b, struct kvm_signal_mask).
const KVM_SET_SIGNAL_MASK: u32 = 0x4004ae8b;

pub const CAP_IRQCHIP: u32 = 0;
pub const CAP_HLT: u32 = 1;
pub const CAP_USER_MEMORY: u32 = 3;
pub const CAP_SET_TSS_ADDR: u32 = 4;
pub const CAP_EXT_CPUID: u32 = 7;
pub const CAP_NR_VCPUS: u32 = 9;
pub const CAP_NR_MEMSLOTS: u32 = 10;
pub const CAP_PIT: u32 = 11;
pub const CAP_MP_STATE: u32 = 14;
pub const CAP_SYNC_MMU: u32 = 16;
pub const CAP_PIT2: u32 = 33;
pub const CAP_PIT_STATE2: u32 = 35;
pub const CAP_ADJUST_CLOCK: u32 = 39;
pub const CAP_VCPU_EVENTS: u32 = 41;
pub const CAP_DEBUGREGS: u32 = 50;
pub const CAP_XSAVE: u32 = 55;
pub const CAP_XCRS: u32 = 56;
pub const CAP_TSC_CONTROL: u32 = 60;
pub const CAP_GET_TSC_KHZ: u32 = 61;
pub const CAP_MAX_VCPUS: u32 = 66;
pub const CAP_IMMEDIATE_EXIT: u32 = 136;
pub const CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
pub const CAP_DIRTY_LOG_RING: u32 = 192;
pub const CAP_XSAVE2: u32 = 208;

pub const EXIT_UNKNOWN: u32 = 0;
pub const EXIT_EXCEPTION: u32 = 1;
pub const EXIT_IO: u32 = 2;
pub const EXIT_DEBUG: u32 = 4;
pub const EXIT_HLT: u32 = 5;
pub const EXIT_MMIO: u32 = 6;
pub const EXIT_SHUTDOWN: u32 = 8;
pub const EXIT_FAIL_ENTRY: u32 = 9;
pub const EXIT_INTR: u32 = 10;
pub const EXIT_INTERNAL_ERROR: u32 = 17;
pub const EXIT_SYSTEM_EVENT: u32 = 24;

pub const EXIT_IO_IN: u8 = 0;
pub const EXIT_IO_OUT: u8 = 1;

pub const MP_STATE_RUNNABLE: u32 = 0;
pub const MP_STATE_HALTED: u32 = 3;

pub const Regs = extern struct {
    rax: u64 = 0, rbx: u64 = 0, rcx: u64 = 0, rdx: u64 = 0,
    rsi: u64 = 0, rdi: u64 = 0, rsp: u64 = 0, rbp: u64 = 0,
    r8: u64 = 0, r9: u64 = 0, r10: u64 = 0, r11: u64 = 0,
    r12: u64 = 0, r13: u64 = 0, r14: u64 = 0, r15: u64 = 0,
    rip: u64 = 0, rflags: u64 = 0,
};

pub const Segment = extern struct {
    base: u64 = 0,
    limit: u32 = 0,
    selector: u16 = 0,
    type: u8 = 0,
    present: u8 = 0,
    dpl: u8 = 0,
    db: u8 = 0,
    s: u8 = 0,
    l: u8 = 0,
    g: u8 = 0,
    avl: u8 = 0,
    unusable: u8 = 0,
    padding: u8 = 0,
};

pub const DTable = extern struct {
    base: u64 = 0,
    limit: u16 = 0,
    padding: [3]u16 = .{ 0, 0, 0 },
};

pub const Sregs = extern struct {
    cs: Segment = .{}, ds: Segment = .{}, es: Segment = .{}, fs: Segment = .{},
    gs: Segment = .{}, ss: Segment = .{}, tr: Segment = .{}, ldt: Segment = .{},
    gdt: DTable = .{}, idt: DTable = .{},
    cr0: u64 = 0, cr2: u64 = 0, cr3: u64 = 0, cr4: u64 = 0, cr8: u64 = 0,
    efer: u64 = 0,
    apic_base: u64 = 0,
    interrupt_bitmap: [4]u64 = .{ 0, 0, 0, 0 },
};

pub const UserspaceMemoryRegion = extern struct {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
};
pub const MEM_LOG_DIRTY_PAGES: u32 = 1;

pub const PitConfig = extern struct {
    flags: u32 = 0,
    pad: [15]u32 = @splat(0),
};

pub const CpuidEntry2 = extern struct {
    function: u32,
    index: u32,
    flags: u32,
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
    padding: [3]u32,
};

pub const MsrEntry = extern struct {
    index: u32,
    reserved: u32 = 0,
    data: u64,
};

/// The `io` member of the kvm_run exit union.
pub const RunIo = extern struct {
    direction: u8,
    size: u8,
    port: u16,
    count: u32,
    data_offset: u64,
};

pub const RunMmio = extern struct {
    phys_addr: u64,
    data: [8]u8,
    len: u32,
    is_write: u8,
};

pub const RunInternal = extern struct {
    suberror: u32,
    ndata: u32,
    data: [16]u64,
};

pub const RunFailEntry = extern struct {
    hardware_entry_failure_reason: u64,
    cpu: u32,
};

/// The head of the shared kvm_run page (the rest is accessed through offsets).
pub const Run = extern struct {
    request_interrupt_window: u8,
    immediate_exit: u8,
    padding1: [6]u8,
    exit_reason: u32,
    ready_for_interrupt_injection: u8,
    if_flag: u8,
    flags: u16,
    cr8: u64,
    apic_base: u64,
    /// The exit union starts here (offset 32).
    exit: extern union {
        io: RunIo,
        mmio: RunMmio,
        internal: RunInternal,
        fail_entry: RunFailEntry,
        pad: [256]u8,
    },
};

/// Sizes of the opaque state blobs kvmlab saves and restores verbatim.
pub const FPU_BYTES = 416;
pub const XSAVE_LEGACY_BYTES = 4096;
pub const XCRS_BYTES = 392;
pub const LAPIC_BYTES = 1024;
pub const MP_STATE_BYTES = 4;
pub const VCPU_EVENTS_BYTES = 64;
pub const DEBUGREGS_BYTES = 128;
pub const IRQCHIP_BYTES = 520;
pub const PIT_STATE2_BYTES = 112;
pub const CLOCK_DATA_BYTES = 48;

comptime {
    std.debug.assert(@sizeOf(Regs) == 144);
    std.debug.assert(@sizeOf(Sregs) == 312);
    std.debug.assert(@sizeOf(Segment) == 24);
    std.debug.assert(@sizeOf(DTable) == 16);
    std.debug.assert(@sizeOf(UserspaceMemoryRegion) == 32);
    std.debug.assert(@sizeOf(PitConfig) == 64);
    std.debug.assert(@sizeOf(CpuidEntry2) == 40);
    std.debug.assert(@sizeOf(MsrEntry) == 16);
    std.debug.assert(@offsetOf(Run, "exit") == 32);
    std.debug.assert(@offsetOf(Run, "exit_reason") == 8);
}

pub const max_cpuid_entries = 256;
pub const max_msrs = 1024;

pub const DirtyLog = extern struct {
    slot: u32,
    padding: u32 = 0,
    /// Address of a bitmap of one bit per page of the slot.
    bitmap: u64,
};

/// KVM_CLEAR_DIRTY_LOG's argument (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
/// `first_page` and `num_pages` multiples of 64 (or to the slot's end).
pub const ClearDirtyLog = extern struct {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: u64,
};

/// KVM_ENABLE_CAP's argument.
pub const EnableCap = extern struct {
    cap: u32,
    flags: u32 = 0,
    args: [4]u64 = @splat(0),
    pad: [64]u8 = @splat(0),
};

/// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's flag: KVM_GET_DIRTY_LOG no longer
/// clears or write-protects; KVM_CLEAR_DIRTY_LOG does, for the pages given.
pub const MANUAL_PROTECT_ENABLE: u64 = 1;

/// KVM_GET/SET_IRQCHIP's argument; `chip_id` 0 PIC master, 1 PIC slave, 2 IOAPIC.
pub const Irqchip = extern struct {
    chip_id: u32,
    pad: u32 = 0,
    chip: [512]u8 = @splat(0),
};

pub const CpuidBuf = extern struct {
    nent: u32,
    padding: u32 = 0,
    entries: [max_cpuid_entries]CpuidEntry2 = undefined,
};

pub fn MsrBuf(comptime n: usize) type {
    return extern struct {
        nmsrs: u32,
        pad: u32 = 0,
        entries: [n]MsrEntry = undefined,
    };
}

pub const MsrList = extern struct {
    nmsrs: u32,
    indices: [max_msrs]u32 = undefined,
};

/// Fixed-size vCPU state kvmlab saves and restores verbatim: the size of each
/// and its get/set ioctl pair.
pub const VcpuState = enum {
    regs,
    sregs,
    fpu,
    xcrs,
    lapic,
    mp_state,
    events,
    debugregs,

    pub fn bytes(s: VcpuState) usize {
        return switch (s) {
            .regs => @sizeOf(Regs),
            .sregs => @sizeOf(Sregs),
            .fpu => FPU_BYTES,
            .xcrs => XCRS_BYTES,
            .lapic => LAPIC_BYTES,
            .mp_state => MP_STATE_BYTES,
            .events => VCPU_EVENTS_BYTES,
            .debugregs => DEBUGREGS_BYTES,
        };
    }
    fn requests(s: VcpuState) [2]u32 {
        return switch (s) {
            .regs => .{ KVM_GET_REGS, KVM_SET_REGS },
            .sregs => .{ KVM_GET_SREGS, KVM_SET_SREGS },
            .fpu => .{ KVM_GET_FPU, KVM_SET_FPU },
            .xcrs => .{ KVM_GET_XCRS, KVM_SET_XCRS },
            .lapic => .{ KVM_GET_LAPIC, KVM_SET_LAPIC },
            .mp_state => .{ KVM_GET_MP_STATE, KVM_SET_MP_STATE },
            .events => .{ KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS },
            .debugregs => .{ KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS },
        };
    }
};

/// Fixed-size VM-wide device state, saved and restored verbatim.
pub const VmState = enum {
    /// A whole `Irqchip` (the caller sets chip_id).
    irqchip,
    pit2,
    clock,

    pub fn bytes(s: VmState) usize {
        return switch (s) {
            .irqchip => IRQCHIP_BYTES,
            .pit2 => PIT_STATE2_BYTES,
            .clock => CLOCK_DATA_BYTES,
        };
    }
    fn requests(s: VmState) [2]u32 {
        return switch (s) {
            .irqchip => .{ KVM_GET_IRQCHIP, KVM_SET_IRQCHIP },
            .pit2 => .{ KVM_GET_PIT2, KVM_SET_PIT2 },
            .clock => .{ KVM_GET_CLOCK, KVM_SET_CLOCK },
        };
    }
};

comptime {
    std.debug.assert(@sizeOf(Irqchip) == IRQCHIP_BYTES);
    std.debug.assert(@sizeOf(DirtyLog) == 16);
    std.debug.assert(@sizeOf(ClearDirtyLog) == 24);
    std.debug.assert(@sizeOf(EnableCap) == 104);
    std.debug.assert(@sizeOf(CpuidBuf) == 8 + 40 * max_cpuid_entries);
}

pub const Error = error{Ioctl};

/// errno of the last failed ioctl on this thread (for error messages).
pub threadlocal var last_errno: linux.E = .SUCCESS;

/// The one ioctl call site: the raw result, or error.Ioctl with last_errno set.
fn call(fd: linux.fd_t, request: u32, arg: usize) Error!usize {
    const rc = linux.ioctl(fd, request, arg);
    if (linux.errno(rc) != .SUCCESS) {
        last_errno = linux.errno(rc);
        return error.Ioctl;
    }
    return rc;
}

fn ptr(p: anytype) usize {
    return @intFromPtr(p);
}

/// /dev/kvm.
pub const System = struct {
    fd: linux.fd_t,

    pub fn apiVersion(s: System) Error!usize {
        return call(s.fd, KVM_GET_API_VERSION, 0);
    }
    pub fn vcpuMmapSize(s: System) Error!usize {
        return call(s.fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    }
    /// KVM_CHECK_EXTENSION; 0 when absent or refused.
    pub fn checkExtension(s: System, cap: u32) usize {
        return call(s.fd, KVM_CHECK_EXTENSION, cap) catch 0;
    }
    pub fn createVm(s: System) Error!VmFd {
        return .{ .fd = @intCast(try call(s.fd, KVM_CREATE_VM, 0)) };
    }
    pub fn getSupportedCpuid(s: System, buf: *CpuidBuf) Error!void {
        _ = try call(s.fd, KVM_GET_SUPPORTED_CPUID, ptr(buf));
    }
    pub fn getMsrIndexList(s: System, list: *MsrList) Error!void {
        _ = try call(s.fd, KVM_GET_MSR_INDEX_LIST, ptr(list));
    }
};

/// A VM file descriptor.
pub const VmFd = struct {
    fd: linux.fd_t,

    pub fn checkExtension(v: VmFd, cap: u32) usize {
        return call(v.fd, KVM_CHECK_EXTENSION, cap) catch 0;
    }
    pub fn setTssAddr(v: VmFd, gpa: u64) Error!void {
        _ = try call(v.fd, KVM_SET_TSS_ADDR, gpa);
    }
    pub fn setUserMemoryRegion(v: VmFd, region: *const UserspaceMemoryRegion) Error!void {
        _ = try call(v.fd, KVM_SET_USER_MEMORY_REGION, ptr(region));
    }
    pub fn createIrqchip(v: VmFd) Error!void {
        _ = try call(v.fd, KVM_CREATE_IRQCHIP, 0);
    }
    pub fn createPit2(v: VmFd, config: *const PitConfig) Error!void {
        _ = try call(v.fd, KVM_CREATE_PIT2, ptr(config));
    }
    pub fn createVcpu(v: VmFd, index: u32) Error!VcpuFd {
        return .{ .fd = @intCast(try call(v.fd, KVM_CREATE_VCPU, index)) };
    }
    /// Reads the dirty log of a slot into `log.bitmap`, and clears it unless
    /// the VM has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (then clearDirtyLog does).
    pub fn getDirtyLog(v: VmFd, log: *const DirtyLog) Error!void {
        _ = try call(v.fd, KVM_GET_DIRTY_LOG, ptr(log));
    }
    /// Clears (and write-protects) the pages set in `log.bitmap`.
    pub fn clearDirtyLog(v: VmFd, log: *const ClearDirtyLog) Error!void {
        _ = try call(v.fd, KVM_CLEAR_DIRTY_LOG, ptr(log));
    }
    pub fn enableCap(v: VmFd, cap: *const EnableCap) Error!void {
        _ = try call(v.fd, KVM_ENABLE_CAP, ptr(cap));
    }
    pub fn getState(v: VmFd, which: VmState, buf: []u8) Error!void {
        std.debug.assert(buf.len == which.bytes());
        _ = try call(v.fd, which.requests()[0], ptr(buf.ptr));
    }
    pub fn setState(v: VmFd, which: VmState, buf: []const u8) Error!void {
        std.debug.assert(buf.len == which.bytes());
        _ = try call(v.fd, which.requests()[1], ptr(buf.ptr));
    }
};

/// A vCPU file descriptor.
pub const VcpuFd = struct {
    fd: linux.fd_t,

    /// KVM_RUN: the errno is the result (SUCCESS, INTR, AGAIN, FAULT, ...).
    pub fn run(v: VcpuFd) linux.E {
        return linux.errno(linux.ioctl(v.fd, KVM_RUN, 0));
    }
    pub fn getRegs(v: VcpuFd, regs: *Regs) Error!void {
        _ = try call(v.fd, KVM_GET_REGS, ptr(regs));
    }
    pub fn setRegs(v: VcpuFd, regs: *const Regs) Error!void {
        _ = try call(v.fd, KVM_SET_REGS, ptr(regs));
    }
    pub fn getSregs(v: VcpuFd, sregs: *Sregs) Error!void {
        _ = try call(v.fd, KVM_GET_SREGS, ptr(sregs));
    }
    pub fn setSregs(v: VcpuFd, sregs: *const Sregs) Error!void {
        _ = try call(v.fd, KVM_SET_SREGS, ptr(sregs));
    }
    pub fn getMpState(v: VcpuFd) Error!u32 {
        var mp: u32 = 0;
        _ = try call(v.fd, KVM_GET_MP_STATE, ptr(&mp));
        return mp;
    }
    pub fn setMpState(v: VcpuFd, mp: u32) Error!void {
        _ = try call(v.fd, KVM_SET_MP_STATE, ptr(&mp));
    }
    /// Fixed-size state as bytes (`buf` is 8-byte aligned, exactly `which.bytes()`).
    pub fn getState(v: VcpuFd, which: VcpuState, buf: []u8) Error!void {
        std.debug.assert(buf.len == which.bytes());
        _ = try call(v.fd, which.requests()[0], ptr(buf.ptr));
    }
    pub fn setState(v: VcpuFd, which: VcpuState, buf: []const u8) Error!void {
        std.debug.assert(buf.len == which.bytes());
        _ = try call(v.fd, which.requests()[1], ptr(buf.ptr));
    }
    /// XSAVE area of `buf.len` bytes (KVM_GET_XSAVE2 when over the legacy 4 KiB).
    pub fn getXsave(v: VcpuFd, buf: []u8) Error!void {
        std.debug.assert(buf.len >= XSAVE_LEGACY_BYTES);
        _ = try call(v.fd, if (buf.len > XSAVE_LEGACY_BYTES) KVM_GET_XSAVE2 else KVM_GET_XSAVE, ptr(buf.ptr));
    }
    /// `buf` must hold at least this host's XSAVE size (KVM reads that much).
    pub fn setXsave(v: VcpuFd, buf: []const u8) Error!void {
        std.debug.assert(buf.len >= XSAVE_LEGACY_BYTES);
        _ = try call(v.fd, KVM_SET_XSAVE, ptr(buf.ptr));
    }
    /// Reads the MSRs named in `buf` (a `*MsrBuf(n)`); returns how many were read.
    pub fn getMsrs(v: VcpuFd, buf: anytype) Error!usize {
        comptime assertMsrBuf(@TypeOf(buf));
        return call(v.fd, KVM_GET_MSRS, ptr(buf));
    }
    /// Sets the MSRs in `buf`; returns how many were set.
    pub fn setMsrs(v: VcpuFd, buf: anytype) Error!usize {
        comptime assertMsrBuf(@TypeOf(buf));
        return call(v.fd, KVM_SET_MSRS, ptr(buf));
    }
    pub fn getCpuid2(v: VcpuFd, buf: *CpuidBuf) Error!void {
        _ = try call(v.fd, KVM_GET_CPUID2, ptr(buf));
    }
    pub fn setCpuid2(v: VcpuFd, buf: *const CpuidBuf) Error!void {
        _ = try call(v.fd, KVM_SET_CPUID2, ptr(buf));
    }
    /// The signal mask KVM installs on the calling thread for the duration
    /// of each KVM_RUN on this vCPU.
    pub fn setSignalMask(v: VcpuFd, set: linux.sigset_t) Error!void {
        var arg: extern struct { len: u32 = 8, set: linux.sigset_t align(4) } = .{ .set = set };
        _ = try call(v.fd, KVM_SET_SIGNAL_MASK, ptr(&arg));
    }
    /// 0 when the host cannot tell.
    pub fn getTscKhz(v: VcpuFd) u32 {
        return @intCast(call(v.fd, KVM_GET_TSC_KHZ, 0) catch 0);
    }
};

fn assertMsrBuf(comptime P: type) void {
    const T = @typeInfo(P).pointer.child;
    if (!@hasField(T, "nmsrs") or !@hasField(T, "entries")) @compileError("expected *MsrBuf(n), got " ++ @typeName(P));
}

test "kvm: state sizes match the kernel's" {
    try std.testing.expectEqual(@as(usize, 144), VcpuState.regs.bytes());
    try std.testing.expectEqual(@as(usize, 312), VcpuState.sregs.bytes());
    try std.testing.expectEqual(@as(usize, 520), VmState.irqchip.bytes());
    // Every get/set pair differs and encodes the declared size (the ioctl
    // number's size field, bits 16..29, when the kernel encodes one).
    inline for (std.meta.tags(VcpuState)) |s| {
        const r = s.requests();
        try std.testing.expect(r[0] != r[1]);
        const size = (r[1] >> 16) & 0x3fff;
        if (size != 0) try std.testing.expectEqual(s.bytes(), size);
    }
}
