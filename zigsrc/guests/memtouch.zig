//! memtouch: dirties a known number of pages per round (dirty-page / restore-cost
//! experiments). See docs/guest-protocol.md ("memtouch guest").
//!
//! Args: pages (default 16), rounds (default 1). Only vCPU 0 works; any other vCPU
//! exits 0 at once.
//!
//! Round R (1..rounds) updates the u64 at offset 0 of each page p (0..pages-1)
//! starting at 0x400000:
//!
//!     w = w *% 0x5851f42d4c957f2d +% ((R << 32) | p)
//!
//! (the word depends on round, page and the previous content), then prints
//! `round R pages P sum 0x<16 hex>` where sum is the wrapping u64 sum of the new
//! words, read back from memory. Between rounds (not after the last) it
//! checkpoints with tag = R. Finally it prints `done` and exits 0.
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

const exit_bad_args: u32 = 2;

fn main(vcpu: u64) noreturn {
    if (vcpu != 0) rt.exit(0);
    const pages = rt.argU64("pages", 16);
    const rounds = rt.argU64("rounds", 1);

    const bytes = @mulWithOverflow(pages, rt.page_size);
    if (bytes[1] != 0 or bytes[0] > rt.memSize() -| rt.free_start) {
        rt.write("memtouch: pages does not fit in guest memory\n");
        rt.exit(exit_bad_args);
    }

    var round: u64 = 1;
    while (round <= rounds) : (round += 1) {
        var sum: u64 = 0;
        var p: u64 = 0;
        while (p < pages) : (p += 1) {
            const w: *volatile u64 = @ptrFromInt(rt.free_start + p * rt.page_size);
            w.* = w.* *% 0x5851f42d4c957f2d +% ((round << 32) | p);
            sum +%= w.*;
        }
        var l: rt.Line = .{};
        l.str("round ");
        l.dec(round);
        l.str(" pages ");
        l.dec(pages);
        l.str(" sum 0x");
        l.hex(sum, 16);
        l.str("\n");
        l.flush();
        if (round < rounds) rt.checkpoint(@truncate(round));
    }
    rt.write("done\n");
    rt.exit(0);
}
