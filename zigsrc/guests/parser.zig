//! parser: a record parser with two planted bugs, the target of campaigns
//! (kvmlab.distributed). See docs/guest-protocol.md ("Input protocol" and
//! "`parser` details").
//!
//! vCPU 0 prints `parser ready\n` and checkpoints with tag 0x5e5e0002: the
//! snapshot point. Resumed, it reads the input the host wrote at `input_gpa`
//! (a u32 LE length, then the bytes), parses records `[type u8][len u8][len
//! bytes]` until the input ends or a record does not fit, and exits with the
//! number of complete records mod 256. Everything runs at the guest's CPL.
//!
//! Planted bugs (on purpose, for fuzzing demos and tests):
//! - type 0x7F copies its payload into a 32-byte name buffer without checking
//!   the length. The buffer is the last 32 bytes of guest memory (like a heap
//!   block in front of a guard page), so the first byte past it, at the memory
//!   size, is unmapped: len > 32 is a page fault there, a triple fault, a crash.
//! - type 0x3C walks a 64-byte window in steps of len bytes: len == 0 never
//!   advances (a hang).
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

pub const wait_tag: u32 = 0x5e5e0002;
pub const default_input_gpa: u64 = rt.free_start;
pub const type_name: u8 = 0x7f;
pub const type_window: u8 = 0x3c;
pub const name_buf_bytes: u64 = 32;
pub const window_bytes: usize = 64;

const exit_no_room: u32 = 2;

fn main(vcpu: u64) noreturn {
    if (vcpu != 0) rt.exit(0);
    const input_gpa = rt.argU64("input_gpa", default_input_gpa);
    const name_gpa = rt.memSize() - name_buf_bytes;
    // The length word and at least the input's header must lie between the
    // free area and the name buffer.
    if (input_gpa < rt.free_start or input_gpa > name_gpa - 4) rt.exit(exit_no_room);
    rt.write("parser ready\n");
    rt.checkpoint(wait_tag);

    const len_word: *const volatile u32 = @ptrFromInt(input_gpa);
    // A length the host got wrong cannot make the parser read past the input
    // area (the host's limit, max_input_bytes, is far lower).
    const len: usize = @min(len_word.*, name_gpa - (input_gpa + 4));
    const data: [*]const volatile u8 = @ptrFromInt(input_gpa + 4);
    const name: [*]volatile u8 = @ptrFromInt(name_gpa);
    rt.exit(parse(data, len, name) & 0xff);
}

/// Complete records in `data[0..len]`; a record that does not fit ends the parse.
fn parse(data: [*]const volatile u8, len: usize, name: [*]volatile u8) u32 {
    var count: u32 = 0;
    var pos: usize = 0;
    while (len - pos >= 2) {
        const kind = data[pos];
        const n: usize = data[pos + 1];
        if (len - pos - 2 < n) break;
        const payload = data + pos + 2;
        switch (kind) {
            type_name => storeName(name, payload, n),
            type_window => _ = walkWindow(data + pos, n),
            else => {},
        }
        count +%= 1;
        pos += 2 + n;
    }
    return count;
}

/// BUG (planted): no check that `n` <= 32, the size of `name`.
noinline fn storeName(name: [*]volatile u8, payload: [*]const volatile u8, n: usize) void {
    for (0..n) |i| name[i] = payload[i];
}

/// BUG (planted): steps of `step` bytes through a 64-byte window; 0 never ends.
/// (The volatile read of the record's length byte keeps the loop as written.)
noinline fn walkWindow(record: [*]const volatile u8, step: usize) u8 {
    var acc: u8 = 0;
    var i: usize = 0;
    while (i < window_bytes) : (i += step) acc +%= record[1];
    return acc;
}
