//! Tiny runtime shared by the kvmlab built-in guests (freestanding x86_64).
//!
//! The contract with the host is docs/guest-protocol.md: the guest is entered in
//! 64-bit mode at CPL3 (IOPL=3) or CPL0 with rsp = its stack top (16-byte aligned),
//! rdi = vCPU index, rsi = 0x3000 (boot info). It talks to the host only through
//! `out` on the ports below. Nothing here uses a privileged instruction, so the
//! same code runs at CPL3 and at CPL0.
//!
//! A guest file looks like:
//!
//!     const rt = @import("rt.zig");
//!     pub const panic = rt.panic;
//!     comptime { rt.exportEntry(main); }
//!     fn main(vcpu: u64) noreturn { ... rt.exit(0); }
//!
//! Exit codes used by the runtime: 0xdead = Zig panic (only reachable in safe
//! builds or via an explicit @panic), 0xbad0 = the boot info at 0x3000 has a wrong
//! magic or protocol version.

const std = @import("std");

// --- protocol constants ---------------------------------------------------------

pub const page_size: u64 = 4096;
pub const boot_info_addr: u64 = 0x3000;
pub const boot_magic: u64 = 0x544f4f424c4d564b; // "KVMLBOOT"
pub const protocol_version: u32 = 1;
/// First byte of guest memory free for the guest (zero at boot).
pub const free_start: u64 = 0x400000;
/// Longest argument text (without the NUL).
pub const max_args_len: usize = 4031;
/// Most bytes the host copies for one console-write descriptor.
pub const max_write_len: usize = 65536;

pub const port_console: u16 = 0x00e9;
pub const port_exit: u16 = 0x0500;
pub const port_checkpoint: u16 = 0x0501;
pub const port_write: u16 = 0x0502;

pub const exit_panic: u32 = 0xdead;
pub const exit_bad_boot_info: u32 = 0xbad0;

// --- port I/O and CPU hints ---------------------------------------------------------

/// `out dx, al`. The memory clobber makes every store the compiler has pending
/// visible to the host before the exit, and stops it from caching memory in
/// registers across the exit (the host may read or write guest memory while the
/// vCPU is stopped there).
pub inline fn outb(port: u16, value: u8) void {
    asm volatile ("outb %[value], %[port]"
        :
        : [value] "{al}" (value),
          [port] "{dx}" (port),
        : .{ .memory = true });
}

/// `out dx, eax`; see `outb` for the memory clobber.
pub inline fn outl(port: u16, value: u32) void {
    asm volatile ("outl %[value], %[port]"
        :
        : [value] "{eax}" (value),
          [port] "{dx}" (port),
        : .{ .memory = true });
}

/// `in eax, dx`: the memory clobber keeps it ordered with guest memory accesses.
pub inline fn inl(port: u16) u32 {
    return asm volatile ("inl %[port], %[value]"
        : [value] "={eax}" (-> u32),
        : [port] "{dx}" (port),
        : .{ .memory = true });
}

/// This clone's identity (docs/guest-protocol.md, "Per-clone identity"):
/// distinct per VM when the host gave one, else 0. Read it after every resume
/// point that may be a restore (e.g. right after a checkpoint) before
/// drawing random numbers.
pub fn identity() u64 {
    return @as(u64, inl(0x0504)) << 32 | inl(0x0503);
}

/// Spin-wait hint (`pause`); also a compiler barrier, so a volatile flag polled
/// in a loop around it is re-read every iteration.
pub inline fn pause() void {
    asm volatile ("pause" ::: .{ .memory = true });
}

/// Stops this vCPU for good with exit code `code` (port 0x500).
pub fn exit(code: u32) noreturn {
    outl(port_exit, code);
    // The host never resumes a vCPU after an exit; if it does anyway, fault
    // loudly (triple fault -> GuestCrashError) instead of running on.
    @trap();
}

/// Pauses this vCPU at a checkpoint with tag `tag` (port 0x501); returns when the
/// host resumes it with the next `run()`.
pub inline fn checkpoint(tag: u32) void {
    outl(port_checkpoint, tag);
}

// --- console ---------------------------------------------------------------------

/// One byte to the console (port 0xe9): one VM exit per byte.
pub inline fn putc(c: u8) void {
    outb(port_console, c);
}

/// Writes `s` to the console with the 0x502 descriptor port: one VM exit per
/// 64 KiB. The 16-byte descriptor lives on the stack, which is below 1 MiB, so its
/// address fits in eax.
pub fn write(s: []const u8) void {
    var rest = s;
    while (rest.len > 0) {
        const n = @min(rest.len, max_write_len);
        var desc: [2]u64 align(16) = .{ @intFromPtr(rest.ptr), n };
        outl(port_write, @truncate(@intFromPtr(&desc)));
        rest = rest[n..];
    }
}

/// Decimal digits of `v` at the end of `buf`; returns the slice holding them.
pub fn fmtDec(buf: *[20]u8, v: u64) []const u8 {
    var i: usize = buf.len;
    var x = v;
    while (true) {
        i -= 1;
        buf[i] = '0' + @as(u8, @intCast(x % 10));
        x /= 10;
        if (x == 0) break;
    }
    return buf[i..];
}

/// Exactly `digits` (1..16) lower-case hex digits of `v` (the low bits), zero-padded.
pub fn fmtHex(buf: *[16]u8, v: u64, digits: u5) []const u8 {
    const n: usize = @min(@max(digits, 1), 16);
    var x = v;
    var i: usize = n;
    while (i > 0) {
        i -= 1;
        buf[i] = "0123456789abcdef"[@as(usize, @intCast(x & 0xf))];
        x >>= 4;
    }
    return buf[0..n];
}

/// A line assembled on the stack and written with a single console exit:
///
///     var l: rt.Line = .{};
///     l.str("step "); l.dec(n); l.str(" checksum 0x"); l.hex(sum, 16); l.str("\n");
///     l.flush();
///
/// If the buffer fills up it is flushed early, so long lines still come out whole
/// (just in several exits).
pub const Line = struct {
    buf: [256]u8 = undefined,
    len: usize = 0,

    pub fn byte(self: *Line, c: u8) void {
        if (self.len == self.buf.len) self.flush();
        self.buf[self.len] = c;
        self.len += 1;
    }

    pub fn str(self: *Line, s: []const u8) void {
        for (s) |c| self.byte(c);
    }

    pub fn dec(self: *Line, v: u64) void {
        var tmp: [20]u8 = undefined;
        self.str(fmtDec(&tmp, v));
    }

    /// `digits` (1..16) zero-padded lower-case hex digits, no `0x` prefix.
    pub fn hex(self: *Line, v: u64, digits: u5) void {
        var tmp: [16]u8 = undefined;
        self.str(fmtHex(&tmp, v, digits));
    }

    pub fn flush(self: *Line) void {
        write(self.buf[0..self.len]);
        self.len = 0;
    }
};

// --- boot info and arguments ---------------------------------------------------------

/// The boot info page at 0x3000 (little-endian; written by the host before entry).
pub const BootInfo = extern struct {
    magic: u64,
    version: u32,
    vcpus: u32,
    mem_size: u64,
    cpl: u32,
    args_len: u32,
    first_free: u64,
    reserved: [3]u64,
    /// `key=value` pairs separated by single spaces, NUL-terminated.
    args: [4032]u8,
};

comptime {
    std.debug.assert(@offsetOf(BootInfo, "args") == 64);
    std.debug.assert(@sizeOf(BootInfo) == 4096);
}

pub inline fn bootInfo() *const BootInfo {
    return @ptrFromInt(boot_info_addr);
}

/// Number of vCPUs in the VM (boot info), at least 1.
pub fn vcpuCount() u32 {
    return @max(bootInfo().vcpus, 1);
}

/// Guest memory size in bytes (boot info).
pub fn memSize() u64 {
    return bootInfo().mem_size;
}

/// The argument text: at most `args_len` (clamped to 4031) bytes, cut at the
/// first NUL.
pub fn args() []const u8 {
    const info = bootInfo();
    const len: usize = @min(info.args_len, max_args_len);
    const text = info.args[0..len];
    for (text, 0..) |c, i| {
        if (c == 0) return text[0..i];
    }
    return text;
}

/// The value of argument `name` as an unsigned integer: decimal (or `0x` hex).
/// Returns `default` if the key is absent or its value is not a number that fits
/// in a u64. Tokens are separated by one or more spaces; the first match wins.
pub fn argU64(name: []const u8, default: u64) u64 {
    const v = argValue(name) orelse return default;
    return parseU64(v) orelse default;
}

/// The raw value text of argument `name`, or null if absent.
pub fn argValue(name: []const u8) ?[]const u8 {
    const text = args();
    var i: usize = 0;
    while (i < text.len) {
        while (i < text.len and text[i] == ' ') i += 1;
        const start = i;
        while (i < text.len and text[i] != ' ') i += 1;
        const tok = text[start..i];
        if (tok.len > name.len and tok[name.len] == '=' and std.mem.eql(u8, tok[0..name.len], name))
            return tok[name.len + 1 ..];
    }
    return null;
}

/// Parses a decimal (or `0x`/`0X` hex) unsigned integer; null if empty, not a
/// number, or too big for a u64.
pub fn parseU64(s: []const u8) ?u64 {
    var digits = s;
    var base: u64 = 10;
    if (s.len > 2 and s[0] == '0' and (s[1] == 'x' or s[1] == 'X')) {
        base = 16;
        digits = s[2..];
    }
    if (digits.len == 0) return null;
    var v: u64 = 0;
    for (digits) |c| {
        const d: u64 = switch (c) {
            '0'...'9' => c - '0',
            'a'...'f' => c - 'a' + 10,
            'A'...'F' => c - 'A' + 10,
            else => return null,
        };
        if (d >= base) return null;
        const mul = @mulWithOverflow(v, base);
        if (mul[1] != 0) return null;
        const add = @addWithOverflow(mul[0], d);
        if (add[1] != 0) return null;
        v = add[0];
    }
    return v;
}

// --- entry ---------------------------------------------------------------------

/// Exports `_start` in section `.text.start` (placed first by guest.ld, so it is
/// at 0x100000 = offset 0 of the flat image). The naked stub clears rbp and
/// `call`s a SysV function, so the stack is aligned as the ABI expects (rsp is
/// 16-byte aligned at entry, hence 8 mod 16 after the call pushes the return
/// address); rdi (vCPU index) and rsi (boot info) pass through untouched. The
/// boot info is checked before `main(vcpu)` runs.
pub fn exportEntry(comptime main: fn (vcpu: u64) noreturn) void {
    const S = struct {
        fn start() linksection(".text.start") callconv(.naked) noreturn {
            asm volatile (
                \\ xorl %%ebp, %%ebp
                \\ callq %[enter:P]
                \\ ud2
                :
                : [enter] "X" (&enter),
            );
        }

        fn enter(vcpu: u64, info_addr: u64) callconv(.c) noreturn {
            const info = bootInfo();
            if (info_addr != boot_info_addr or info.magic != boot_magic or info.version != protocol_version)
                exit(exit_bad_boot_info);
            main(vcpu);
        }
    };
    // linksection above rather than ExportOptions.section, which the self-hosted
    // x86_64 backend does not implement. (Debug builds must still use LLVM and LLD,
    // use_llvm/use_lld = true: the self-hosted linker ignores guest.ld.)
    @export(&S.start, .{ .name = "_start" });
    @export(&image_tag, .{ .name = "kvmlab_image_tag" });
}

/// "KVMLGST1", placed at the start of .data by guest.ld. Its real job is to be an
/// initialized (PROGBITS) input section there, so that .bss, which guest.ld folds
/// into .data, is written into the flat image as zeros.
var image_tag: [8]u8 linksection(".data.kvmlab") = "KVMLGST1".*;

// --- hashing -----------------------------------------------------------------------

pub const fnv_offset_basis: u64 = 0xcbf29ce484222325;
pub const fnv_prime: u64 = 0x100000001b3;

/// FNV-1a 64 state update with `bytes`; start from `fnv_offset_basis`.
pub fn fnv1a64Update(h: u64, bytes: []const u8) u64 {
    var x = h;
    for (bytes) |b| {
        x ^= b;
        x *%= fnv_prime;
    }
    return x;
}

/// FNV-1a 64 state update with the 8 little-endian bytes of `w`.
pub fn fnv1a64Word(h: u64, w: u64) u64 {
    var x = h;
    var v = w;
    for (0..8) |_| {
        x ^= v & 0xff;
        x *%= fnv_prime;
        v >>= 8;
    }
    return x;
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: []const u8) u64 {
    return fnv1a64Update(fnv_offset_basis, bytes);
}

const crc32c_poly: u32 = 0x82f63b78; // Castagnoli, reflected

const crc32c_table: [256]u32 = blk: {
    @setEvalBranchQuota(20000);
    var t: [256]u32 = undefined;
    for (0..256) |i| {
        var c: u32 = i;
        for (0..8) |_| c = if (c & 1 != 0) (c >> 1) ^ crc32c_poly else c >> 1;
        t[i] = c;
    }
    break :blk t;
};

/// Raw CRC32C state update (no pre/post inversion); start from 0xffffffff and
/// invert the result.
pub fn crc32cUpdate(state: u32, bytes: []const u8) u32 {
    var c = state;
    for (bytes) |b| c = crc32c_table[@as(u8, @truncate(c)) ^ b] ^ (c >> 8);
    return c;
}

/// CRC32C (iSCSI / Castagnoli) of `bytes`; crc32c("123456789") == 0xe3069283.
pub fn crc32c(bytes: []const u8) u32 {
    return ~crc32cUpdate(0xffffffff, bytes);
}

/// splitmix64 finalizer: a cheap, good 64-bit mixing function.
pub fn mix64(x: u64) u64 {
    var z = x;
    z = (z ^ (z >> 30)) *% 0xbf58476d1ce4e5b9;
    z = (z ^ (z >> 27)) *% 0x94d049bb133111eb;
    return z ^ (z >> 31);
}

// --- panic -----------------------------------------------------------------------

/// Panic handler namespace for freestanding guests: every panic exits this vCPU
/// with code 0xdead. Use as `pub const panic = rt.panic;` in the guest root file.
/// (Same shape as std.debug.no_panic, so no formatting code is pulled in.)
pub const panic = struct {
    fn die() noreturn {
        @branchHint(.cold);
        exit(exit_panic);
    }
    pub fn call(_: []const u8, _: ?usize) noreturn {
        die();
    }
    pub fn sentinelMismatch(_: anytype, _: anytype) noreturn {
        die();
    }
    pub fn unwrapError(_: anyerror) noreturn {
        die();
    }
    pub fn outOfBounds(_: usize, _: usize) noreturn {
        die();
    }
    pub fn startGreaterThanEnd(_: usize, _: usize) noreturn {
        die();
    }
    pub fn inactiveUnionField(_: anytype, _: anytype) noreturn {
        die();
    }
    pub fn sliceCastLenRemainder(_: usize) noreturn {
        die();
    }
    pub fn reachedUnreachable() noreturn {
        die();
    }
    pub fn unwrapNull() noreturn {
        die();
    }
    pub fn castToNull() noreturn {
        die();
    }
    pub fn incorrectAlignment() noreturn {
        die();
    }
    pub fn invalidErrorCode() noreturn {
        die();
    }
    pub fn unexpectedErrorCode(_: anyerror) noreturn {
        die();
    }
    pub fn integerOutOfBounds() noreturn {
        die();
    }
    pub fn integerOverflow() noreturn {
        die();
    }
    pub fn shlOverflow() noreturn {
        die();
    }
    pub fn shrOverflow() noreturn {
        die();
    }
    pub fn divideByZero() noreturn {
        die();
    }
    pub fn exactDivisionRemainder() noreturn {
        die();
    }
    pub fn integerPartOutOfBounds() noreturn {
        die();
    }
    pub fn corruptSwitch() noreturn {
        die();
    }
    pub fn shiftRhsTooBig() noreturn {
        die();
    }
    pub fn invalidEnumValue() noreturn {
        die();
    }
    pub fn forLenMismatch() noreturn {
        die();
    }
    pub fn copyLenMismatch() noreturn {
        die();
    }
    pub fn memcpyAlias() noreturn {
        die();
    }
    pub fn noreturnReturned() noreturn {
        die();
    }
    pub fn loadUninstantiableType() noreturn {
        die();
    }
};
