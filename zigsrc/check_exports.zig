//! `zig build test` helper: checks that a libkvmlab built with
//! -Dtesting=false exports exactly the functions of kvmlab.h (the product
//! ABI) and nothing of the testing group.
//!
//!   check_exports <libkvmlab.so> <kvmlab.h>
const std = @import("std");
const elf = std.elf;

pub fn main(init: std.process.Init) !void {
    const arena = init.arena.allocator();
    const args = try init.minimal.args.toSlice(arena);
    if (args.len != 3) {
        std.debug.print("usage: check_exports <lib.so> <kvmlab.h>\n", .{});
        std.process.exit(2);
    }
    const cwd = std.Io.Dir.cwd();
    const lib = try cwd.readFileAlloc(init.io, args[1], arena, .unlimited);
    const header = try cwd.readFileAlloc(init.io, args[2], arena, .unlimited);
    const exported = try dynamicFunctions(arena, lib);
    const declared = try headerFunctions(arena, header);
    var bad = false;
    for (exported.keys()) |name| if (!declared.contains(name)) {
        std.debug.print("check_exports: {s} is exported but not in kvmlab.h\n", .{name});
        bad = true;
    };
    for (declared.keys()) |name| if (!exported.contains(name)) {
        std.debug.print("check_exports: {s} is in kvmlab.h but not exported\n", .{name});
        bad = true;
    };
    if (bad) std.process.exit(1);
}

/// Defined kvmlab_* functions in the ELF file's .dynsym.
fn dynamicFunctions(arena: std.mem.Allocator, file: []const u8) !std.StringArrayHashMapUnmanaged(void) {
    var out: std.StringArrayHashMapUnmanaged(void) = .empty;
    const eh = std.mem.bytesToValue(elf.Elf64_Ehdr, file[0..@sizeOf(elf.Elf64_Ehdr)]);
    const shdrs = file[@intCast(eh.e_shoff)..];
    var i: usize = 0;
    while (i < eh.e_shnum) : (i += 1) {
        const sh = std.mem.bytesToValue(elf.Elf64_Shdr, shdrs[i * eh.e_shentsize ..][0..@sizeOf(elf.Elf64_Shdr)]);
        if (sh.sh_type != elf.SHT_DYNSYM) continue;
        const strtab_sh = std.mem.bytesToValue(elf.Elf64_Shdr, shdrs[sh.sh_link * eh.e_shentsize ..][0..@sizeOf(elf.Elf64_Shdr)]);
        const strtab = file[@intCast(strtab_sh.sh_offset)..][0..@intCast(strtab_sh.sh_size)];
        const syms = file[@intCast(sh.sh_offset)..][0..@intCast(sh.sh_size)];
        var k: usize = 0;
        while (k + @sizeOf(elf.Elf64_Sym) <= syms.len) : (k += @sizeOf(elf.Elf64_Sym)) {
            const sym = std.mem.bytesToValue(elf.Elf64_Sym, syms[k..][0..@sizeOf(elf.Elf64_Sym)]);
            if (sym.st_shndx == elf.SHN_UNDEF or (sym.st_info & 0xf) != elf.STT_FUNC) continue;
            const name = std.mem.sliceTo(strtab[sym.st_name..], 0);
            if (std.mem.startsWith(u8, name, "kvmlab_")) try out.put(arena, name, {});
        }
    }
    return out;
}

/// Names of the functions a generated header declares (`kvmlab_x(`).
fn headerFunctions(arena: std.mem.Allocator, text: []const u8) !std.StringArrayHashMapUnmanaged(void) {
    var out: std.StringArrayHashMapUnmanaged(void) = .empty;
    var at: usize = 0;
    while (std.mem.indexOfPos(u8, text, at, "kvmlab_")) |start| {
        var end = start;
        while (end < text.len and (std.ascii.isAlphanumeric(text[end]) or text[end] == '_')) end += 1;
        if (end < text.len and text[end] == '(') try out.put(arena, text[start..end], {});
        at = end;
    }
    return out;
}
