//! Raw KVM API for x86_64: ioctl numbers, capability numbers and the uapi
//! structs kvmlab uses. Numbers were taken from <linux/kvm.h>; struct sizes are
//! asserted at compile time against the kernel's (see the `comptime` block).
const std = @import("std");
const linux = std.os.linux;

pub const KVM_GET_API_VERSION: u32 = 0xae00;
pub const KVM_CREATE_VM: u32 = 0xae01;
pub const KVM_GET_MSR_INDEX_LIST: u32 = 0xc004ae02;
pub const KVM_CHECK_EXTENSION: u32 = 0xae03;
pub const KVM_GET_VCPU_MMAP_SIZE: u32 = 0xae04;
pub const KVM_GET_SUPPORTED_CPUID: u32 = 0xc008ae05;
pub const KVM_CREATE_VCPU: u32 = 0xae41;
pub const KVM_GET_DIRTY_LOG: u32 = 0x4010ae42;
pub const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020ae46;
pub const KVM_SET_TSS_ADDR: u32 = 0xae47;
pub const KVM_SET_IDENTITY_MAP_ADDR: u32 = 0x4008ae48;
pub const KVM_CREATE_IRQCHIP: u32 = 0xae60;
pub const KVM_GET_IRQCHIP: u32 = 0xc208ae62;
pub const KVM_SET_IRQCHIP: u32 = 0x8208ae63;
pub const KVM_CREATE_PIT2: u32 = 0x4040ae77;
pub const KVM_GET_PIT2: u32 = 0x8070ae9f;
pub const KVM_SET_PIT2: u32 = 0x4070aea0;
pub const KVM_SET_CLOCK: u32 = 0x4030ae7b;
pub const KVM_GET_CLOCK: u32 = 0x8030ae7c;
pub const KVM_RUN: u32 = 0xae80;
pub const KVM_GET_REGS: u32 = 0x8090ae81;
pub const KVM_SET_REGS: u32 = 0x4090ae82;
pub const KVM_GET_SREGS: u32 = 0x8138ae83;
pub const KVM_SET_SREGS: u32 = 0x4138ae84;
pub const KVM_GET_MSRS: u32 = 0xc008ae88;
pub const KVM_SET_MSRS: u32 = 0x4008ae89;
pub const KVM_SET_CPUID2: u32 = 0x4008ae90;
pub const KVM_GET_CPUID2: u32 = 0xc008ae91;
pub const KVM_GET_LAPIC: u32 = 0x8400ae8e;
pub const KVM_SET_LAPIC: u32 = 0x4400ae8f;
pub const KVM_GET_FPU: u32 = 0x81a0ae8c;
pub const KVM_SET_FPU: u32 = 0x41a0ae8d;
pub const KVM_GET_MP_STATE: u32 = 0x8004ae98;
pub const KVM_SET_MP_STATE: u32 = 0x4004ae99;
pub const KVM_GET_VCPU_EVENTS: u32 = 0x8040ae9f;
pub const KVM_SET_VCPU_EVENTS: u32 = 0x4040aea0;
pub const KVM_GET_DEBUGREGS: u32 = 0x8080aea1;
pub const KVM_SET_DEBUGREGS: u32 = 0x4080aea2;
pub const KVM_GET_XSAVE: u32 = 0x9000aea4;
pub const KVM_SET_XSAVE: u32 = 0x5000aea5;
pub const KVM_GET_XSAVE2: u32 = 0x9000aecf;
pub const KVM_GET_XCRS: u32 = 0x8188aea6;
pub const KVM_SET_XCRS: u32 = 0x4188aea7;
pub const KVM_SET_TSC_KHZ: u32 = 0xaea2;
pub const KVM_GET_TSC_KHZ: u32 = 0xaea3;
pub const KVM_CLEAR_DIRTY_LOG: u32 = 0xc018aec0;
pub const KVM_ENABLE_CAP: u32 = 0x4068aea3;
pub const KVM_KVMCLOCK_CTRL: u32 = 0xaead;

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

/// ioctl that returns the raw result or a Linux errno.
pub fn ioctl(fd: linux.fd_t, request: u32, arg: usize) error{Ioctl}!usize {
    const rc = linux.ioctl(fd, request, arg);
    if (linux.errno(rc) != .SUCCESS) {
        last_errno = linux.errno(rc);
        return error.Ioctl;
    }
    return rc;
}

/// errno of the last failed ioctl on this thread (for error messages).
pub threadlocal var last_errno: linux.E = .SUCCESS;
