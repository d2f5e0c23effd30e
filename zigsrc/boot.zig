//! Guest boot: lays out the tables a kvmlab guest starts with and loads its
//! image. Pure functions over a guest-memory slice (no KVM here), so they are
//! unit-tested without /dev/kvm. The layout is the contract in
//! docs/guest-protocol.md; change both together.
const std = @import("std");
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");

pub const gdt_gpa: u64 = 0x1000;
pub const tss_gpa: u64 = 0xA000;
pub const bootinfo_gpa: u64 = 0x3000;
pub const bootinfo_args_offset: u64 = 64;
pub const pml4_gpa: u64 = 0x10000;
pub const pdpt_gpa: u64 = 0x11000;
pub const pd_gpa: u64 = 0x12000;
pub const stack_top_gpa: u64 = 0x100000;
pub const stack_bytes: u64 = 0x10000;
pub const image_gpa: u64 = 0x100000;
pub const image_end_gpa: u64 = 0x400000;
pub const free_gpa: u64 = 0x400000;

pub const bootinfo_magic: u64 = 0x544f4f424c4d564b; // "KVMLBOOT"
pub const protocol_version: u32 = 1;

pub const page_bytes: u64 = 4096;
pub const huge_page_bytes: u64 = 2 << 20;
/// Limits (also enforced by VmConfig in Python, but the core is the owner).
pub const min_memory_bytes: u64 = 8 << 20;
pub const max_memory_bytes: u64 = 4 << 30;
pub const max_vcpus: u32 = 8;
pub const max_image_bytes: u64 = image_end_gpa - image_gpa;
pub const max_args_bytes: usize = 4096 - bootinfo_args_offset - 1;

const selector_kernel_code: u16 = 0x08;
const selector_kernel_data: u16 = 0x10;
const selector_user_code: u16 = 0x18 | 3;
const selector_user_data: u16 = 0x20 | 3;
const selector_tss: u16 = 0x28;
/// The TSS carries an I/O permission bitmap that allows every port (8 KiB of
/// zero bits, then the 0xff terminator byte), so any IN/OUT exits to the host,
/// which serves its ports and reports the others by number. On hardware KVM,
/// IOPL=3 already lets CPL3 code do port I/O; kvm_pvm strips IOPL from the
/// real RFLAGS and emulates a faulting IN/OUT only if the bitmap permits it.
const tss_iomap_offset: u32 = 104;
const tss_iomap_bytes: u32 = 8192;
const tss_limit: u32 = tss_iomap_offset + tss_iomap_bytes; // includes the terminator byte

pub const cr0_value: u64 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
pub const cr4_value: u64 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
pub const efer_value: u64 = 0x501; // LMA | LME | SCE
pub const rflags_value: u64 = 0x3002; // IOPL=3, IF=0, reserved bit 1

pub fn checkConfig(memory_bytes: u64, vcpus: u32) errors.Error!void {
    if (memory_bytes < min_memory_bytes or memory_bytes > max_memory_bytes)
        return errors.fail(.vm_memory_range, "memory size {d} MiB is out of range: kvmlab guests need 8 .. 4096 MiB", .{memory_bytes >> 20});
    if (memory_bytes % huge_page_bytes != 0)
        return errors.fail(.vm_memory_multiple, "memory size {d} bytes is not a multiple of 2 MiB", .{memory_bytes});
    if (vcpus < 1 or vcpus > max_vcpus)
        return errors.fail(.vm_vcpus_range, "vcpus={d} is out of range: 1 .. {d}", .{ vcpus, max_vcpus });
}

fn put64(mem: []u8, gpa: u64, v: u64) void {
    std.mem.writeInt(u64, mem[@intCast(gpa)..][0..8], v, .little);
}
fn put32(mem: []u8, gpa: u64, v: u32) void {
    std.mem.writeInt(u32, mem[@intCast(gpa)..][0..4], v, .little);
}

/// Writes GDT, TSS, page tables and boot info. `mem` is all of guest memory.
pub fn writeTables(mem: []u8, vcpus: u32, cpl: u32, args: []const u8) errors.Error!void {
    std.debug.assert(mem.len >= min_memory_bytes and mem.len % huge_page_bytes == 0);
    if (args.len > max_args_bytes)
        return errors.fail(.guest_args_size, "guest arguments are {d} bytes; the limit is {d}", .{ args.len, max_args_bytes });
    if (cpl != 0 and cpl != 3)
        return errors.fail(.cpl, "cpl={d}: kvmlab guests run at CPL 3 (default) or 0", .{cpl});

    // GDT: null, kernel code64, kernel data, user code64, user data, TSS (16 bytes).
    put64(mem, gdt_gpa + 0x00, 0);
    put64(mem, gdt_gpa + 0x08, 0x00AF_9A00_0000_FFFF);
    put64(mem, gdt_gpa + 0x10, 0x00CF_9200_0000_FFFF);
    put64(mem, gdt_gpa + 0x18, 0x00AF_FA00_0000_FFFF);
    put64(mem, gdt_gpa + 0x20, 0x00CF_F200_0000_FFFF);
    const base = tss_gpa;
    const tss_lo: u64 = (tss_limit & 0xFFFF) | ((base & 0xFF_FFFF) << 16) | (@as(u64, 0x89) << 40) |
        (@as(u64, (tss_limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    put64(mem, gdt_gpa + 0x28, tss_lo);
    put64(mem, gdt_gpa + 0x30, base >> 32);

    // TSS: rsp0 at the bottom of the stack area, then the I/O bitmap (all
    // allowed ports zero) and its 0xff terminator.
    @memset(mem[@intCast(tss_gpa)..][0 .. tss_limit + 1], 0);
    comptime std.debug.assert(tss_gpa + tss_limit + 1 <= pml4_gpa); // below the page tables
    put64(mem, tss_gpa + 4, 0x20000);
    std.mem.writeInt(u16, mem[@intCast(tss_gpa + 102)..][0..2], tss_iomap_offset, .little);
    mem[@intCast(tss_gpa + tss_limit)] = 0xff;

    // Identity map with 2 MiB pages, user-accessible at every level.
    const flags_table: u64 = 0x7; // P | RW | U
    const flags_huge: u64 = 0x87; // P | RW | U | PS
    @memset(mem[@intCast(pml4_gpa)..@intCast(pd_gpa + 4 * page_bytes)], 0);
    put64(mem, pml4_gpa, pdpt_gpa | flags_table);
    const huge_pages = mem.len / huge_page_bytes;
    const pds = (huge_pages + 511) / 512;
    std.debug.assert(pds <= 4);
    var d: u64 = 0;
    while (d < pds) : (d += 1) put64(mem, pdpt_gpa + d * 8, (pd_gpa + d * page_bytes) | flags_table);
    var p: u64 = 0;
    while (p < huge_pages) : (p += 1) put64(mem, pd_gpa + p * 8, (p * huge_page_bytes) | flags_huge);

    // Boot info.
    @memset(mem[@intCast(bootinfo_gpa)..][0..page_bytes], 0);
    put64(mem, bootinfo_gpa + 0, bootinfo_magic);
    put32(mem, bootinfo_gpa + 8, protocol_version);
    put32(mem, bootinfo_gpa + 12, vcpus);
    put64(mem, bootinfo_gpa + 16, mem.len);
    put32(mem, bootinfo_gpa + 24, cpl);
    put32(mem, bootinfo_gpa + 28, @intCast(args.len));
    put64(mem, bootinfo_gpa + 32, free_gpa);
    @memcpy(mem[@intCast(bootinfo_gpa + bootinfo_args_offset)..][0..args.len], args);
}

/// Loads a flat binary (at 1 MiB) or a static x86_64 ELF into guest memory and
/// returns the entry address. Every field read from the image is bounded before use.
pub fn loadImage(mem: []u8, image: []const u8) errors.Error!u64 {
    if (image.len == 0) return errors.fail(.image_empty, "guest image is empty", .{});
    if (image.len >= 4 and std.mem.eql(u8, image[0..4], "\x7fELF")) return loadElf(mem, image);
    if (image.len > max_image_bytes)
        return errors.fail(.image_size, "flat guest image is {d} bytes; at most {d} fit at 1 MiB", .{ image.len, max_image_bytes });
    @memcpy(mem[@intCast(image_gpa)..][0..image.len], image);
    return image_gpa;
}

fn loadElf(mem: []u8, image: []const u8) errors.Error!u64 {
    const ehdr_bytes = 64;
    const phdr_bytes = 56;
    if (image.len < ehdr_bytes) return errors.fail(.elf_truncated, "ELF image truncated: {d} bytes, header needs 64", .{image.len});
    if (image[4] != 2 or image[5] != 1)
        return errors.fail(.elf_class, "ELF image is not 64-bit little-endian", .{});
    const e_type = std.mem.readInt(u16, image[16..18], .little);
    const e_machine = std.mem.readInt(u16, image[18..20], .little);
    if (e_machine != 62) return errors.fail(.elf_machine, "ELF machine {d} is not x86_64 (62)", .{e_machine});
    if (e_type != 2) return errors.fail(.elf_type, "ELF type {d} is not a static executable (ET_EXEC=2)", .{e_type});
    const entry = std.mem.readInt(u64, image[24..32], .little);
    const phoff = std.mem.readInt(u64, image[32..40], .little);
    const phentsize = std.mem.readInt(u16, image[54..56], .little);
    const phnum = std.mem.readInt(u16, image[56..58], .little);
    if (phentsize != phdr_bytes) return errors.fail(.elf_phentsize, "ELF program header size {d}, expected 56", .{phentsize});
    if (phnum == 0 or phnum > 64) return errors.fail(.elf_phnum, "ELF has {d} program headers (1 .. 64 allowed)", .{phnum});
    if (phoff > image.len or image.len - phoff < @as(u64, phnum) * phdr_bytes)
        return errors.fail(.elf_phdrs_bounds, "ELF program headers lie outside the file", .{});
    var loaded: usize = 0;
    var i: usize = 0;
    while (i < phnum) : (i += 1) {
        const ph = image[@intCast(phoff + i * phdr_bytes)..][0..phdr_bytes];
        if (std.mem.readInt(u32, ph[0..4], .little) != 1) continue; // PT_LOAD only
        const offset = std.mem.readInt(u64, ph[8..16], .little);
        const vaddr = std.mem.readInt(u64, ph[16..24], .little);
        const filesz = std.mem.readInt(u64, ph[32..40], .little);
        const memsz = std.mem.readInt(u64, ph[40..48], .little);
        if (filesz > memsz) return errors.fail(.elf_segment_size, "ELF segment {d}: file size > memory size", .{i});
        if (offset > image.len or image.len - offset < filesz)
            return errors.fail(.elf_segment_bounds, "ELF segment {d} lies outside the file", .{i});
        if (vaddr < image_gpa or vaddr > image_end_gpa or image_end_gpa - vaddr < memsz)
            return errors.fail(.elf_segment_address, "ELF segment {d} at 0x{x} (+{d} bytes) is outside the image area [0x100000, 0x400000)", .{ i, vaddr, memsz });
        @memcpy(mem[@intCast(vaddr)..][0..@intCast(filesz)], image[@intCast(offset)..][0..@intCast(filesz)]);
        @memset(mem[@intCast(vaddr + filesz)..][0..@intCast(memsz - filesz)], 0);
        loaded += 1;
    }
    if (loaded == 0) return errors.fail(.elf_no_load, "ELF image has no PT_LOAD segment", .{});
    if (entry < image_gpa or entry >= image_end_gpa)
        return errors.fail(.elf_entry, "ELF entry 0x{x} is outside the image area", .{entry});
    return entry;
}

fn segment(selector: u16, code: bool, dpl: u8) kvm.Segment {
    return .{
        .base = 0,
        .limit = 0xFFFF_FFFF,
        .selector = selector,
        .type = if (code) 11 else 3,
        .present = 1,
        .dpl = dpl,
        .db = if (code) 0 else 1,
        .s = 1,
        .l = if (code) 1 else 0,
        .g = 1,
    };
}

/// The special registers every vCPU starts with (64-bit mode, paging on).
pub fn entrySregs(base_sregs: kvm.Sregs, cpl: u32) kvm.Sregs {
    var s = base_sregs;
    const dpl: u8 = @intCast(cpl);
    const code = segment(if (cpl == 3) selector_user_code else selector_kernel_code, true, dpl);
    const data = segment(if (cpl == 3) selector_user_data else selector_kernel_data, false, dpl);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = .{ .base = tss_gpa, .limit = tss_limit, .selector = selector_tss, .type = 11, .present = 1 };
    s.ldt = .{ .type = 2, .present = 1, .unusable = 1 };
    s.gdt = .{ .base = gdt_gpa, .limit = 0x37 };
    s.idt = .{ .base = 0, .limit = 0 };
    s.cr0 = cr0_value;
    s.cr3 = pml4_gpa;
    s.cr4 = cr4_value;
    s.efer = efer_value;
    return s;
}

pub fn entryRegs(entry: u64, vcpu: u32) kvm.Regs {
    return .{
        .rip = entry,
        .rsp = stack_top_gpa - @as(u64, vcpu) * stack_bytes,
        .rdi = vcpu,
        .rsi = bootinfo_gpa,
        .rflags = rflags_value,
    };
}

test "tables: identity map covers memory and boot info is readable" {
    const mem = try std.testing.allocator.alignedAlloc(u8, .fromByteUnits(4096), 16 << 20);
    defer std.testing.allocator.free(mem);
    @memset(mem, 0);
    try writeTables(mem, 2, 3, "steps=5");
    try std.testing.expectEqual(bootinfo_magic, std.mem.readInt(u64, mem[0x3000..][0..8], .little));
    try std.testing.expectEqual(@as(u64, pdpt_gpa | 7), std.mem.readInt(u64, mem[0x10000..][0..8], .little));
    // 16 MiB = 8 huge pages; the 8th maps 14 MiB, the 9th is absent.
    try std.testing.expectEqual(@as(u64, (7 * huge_page_bytes) | 0x87), std.mem.readInt(u64, mem[0x12000 + 7 * 8 ..][0..8], .little));
    try std.testing.expectEqual(@as(u64, 0), std.mem.readInt(u64, mem[0x12000 + 8 * 8 ..][0..8], .little));
    try std.testing.expectEqualStrings("steps=5", mem[0x3040..][0..7]);
    try std.testing.expectError(error.Config, writeTables(mem, 1, 1, ""));
}

test "ELF loader rejects hostile headers" {
    const mem = try std.testing.allocator.alignedAlloc(u8, .fromByteUnits(4096), 8 << 20);
    defer std.testing.allocator.free(mem);
    var img: [64]u8 = @splat(0);
    @memcpy(img[0..4], "\x7fELF");
    img[4] = 2;
    img[5] = 1;
    std.mem.writeInt(u16, img[16..18], 2, .little);
    std.mem.writeInt(u16, img[18..20], 62, .little);
    std.mem.writeInt(u16, img[54..56], 56, .little);
    std.mem.writeInt(u16, img[56..58], 60000, .little); // huge count
    try std.testing.expectError(error.Guest, loadImage(mem, &img));
    std.mem.writeInt(u16, img[56..58], 1, .little);
    std.mem.writeInt(u64, img[32..40], 0xFFFF_FFFF_FFFF_FFF0, .little); // phoff overflow
    try std.testing.expectError(error.Guest, loadImage(mem, &img));
    try std.testing.expectError(error.Guest, loadImage(mem, ""));
    try std.testing.expectEqual(image_gpa, try loadImage(mem, "\xeb\xfe"));
}
