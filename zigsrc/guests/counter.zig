//! counter: deterministic, stateful work for checkpoint/restore experiments.
//! See docs/guest-protocol.md ("counter guest") for the exact definition.
//!
//! Args: steps (default 10), checkpoint_at (default 0 = never), region_pages
//! (default 4).
//!
//! vCPU v owns the region of region_pages pages at 0x400000 + v * region_pages * 4096.
//! Step s (1..steps) updates 8 words in every page of the region (the u64 at page
//! offsets 0, 512, ..., 3584):
//!
//!     w = mix64((w ^ (s << 32) ^ (page << 8) ^ (v << 4) ^ j) +% 0x9e3779b97f4a7c15)
//!
//! where j = 0..7 is the word's index in the page and mix64 the splitmix64
//! finalizer. Each new value depends on the old one, so the region's content
//! depends on the whole history. The checksum is FNV-1a 64 over those 8 words of
//! every page, read back from memory in ascending address order, each as 8
//! little-endian bytes (the rest of the region is never written).
//!
//! vCPU 0 prints `step N checksum 0x<16 hex>` after each step; at step ==
//! checkpoint_at every vCPU checkpoints with tag = step (after the step's line).
//! At the end every vCPU v stores {done = 1, checksum} in its slot at 0x8000 + 16*v;
//! vCPU 0 waits for every slot, prints `done vcpu K checksum 0x<16 hex>` for each
//! K, and everyone exits 0.
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

/// Per-vCPU result slots: {u64 done (0 -> 1), u64 final checksum} at 0x8000 + 16*v.
const slot_base: u64 = 0x8000;
const max_vcpus: u64 = 8;
const words_per_page: u64 = 8;
const word_stride: u64 = 512;

/// Exit code for arguments that do not fit (regions beyond the end of memory).
const exit_bad_args: u32 = 2;

fn slot(v: u64) *volatile [2]u64 {
    return @ptrFromInt(slot_base + 16 * v);
}

fn mutate(base: u64, pages: u64, step: u64, vcpu: u64) void {
    var p: u64 = 0;
    while (p < pages) : (p += 1) {
        const page: [*]volatile u64 = @ptrFromInt(base + p * rt.page_size);
        var j: u64 = 0;
        while (j < words_per_page) : (j += 1) {
            const idx = j * (word_stride / 8);
            const old = page[idx];
            page[idx] = rt.mix64((old ^ (step << 32) ^ (p << 8) ^ (vcpu << 4) ^ j) +% 0x9e3779b97f4a7c15);
        }
    }
}

fn checksum(base: u64, pages: u64) u64 {
    var h = rt.fnv_offset_basis;
    var p: u64 = 0;
    while (p < pages) : (p += 1) {
        const page: [*]volatile const u64 = @ptrFromInt(base + p * rt.page_size);
        var j: u64 = 0;
        while (j < words_per_page) : (j += 1) h = rt.fnv1a64Word(h, page[j * (word_stride / 8)]);
    }
    return h;
}

fn printChecksumLine(prefix: []const u8, n: u64, sum: u64) void {
    var l: rt.Line = .{};
    l.str(prefix);
    l.dec(n);
    l.str(" checksum 0x");
    l.hex(sum, 16);
    l.str("\n");
    l.flush();
}

fn main(vcpu: u64) noreturn {
    const steps = rt.argU64("steps", 10);
    const checkpoint_at = rt.argU64("checkpoint_at", 0);
    const pages = rt.argU64("region_pages", 4);
    const nvcpus: u64 = rt.vcpuCount();

    // Every region must lie inside guest memory, and the slots cover 8 vCPUs.
    const region_bytes = @mulWithOverflow(pages, rt.page_size);
    const all_bytes = @mulWithOverflow(region_bytes[0], nvcpus);
    if (nvcpus > max_vcpus or vcpu >= nvcpus or region_bytes[1] != 0 or all_bytes[1] != 0 or
        all_bytes[0] > rt.memSize() -| rt.free_start)
    {
        if (vcpu == 0) rt.write("counter: region_pages * vcpus does not fit in guest memory\n");
        rt.exit(exit_bad_args);
    }
    const base = rt.free_start + vcpu * region_bytes[0];

    var step: u64 = 1;
    while (step <= steps) : (step += 1) {
        mutate(base, pages, step, vcpu);
        if (vcpu == 0) printChecksumLine("step ", step, checksum(base, pages));
        if (step == checkpoint_at) rt.checkpoint(@truncate(step));
    }

    const own = slot(vcpu);
    own[1] = checksum(base, pages);
    own[0] = 1; // volatile stores stay in order, and x86 keeps stores ordered
    if (vcpu != 0) rt.exit(0);

    var k: u64 = 1;
    while (k < nvcpus) : (k += 1) {
        while (slot(k)[0] == 0) rt.pause();
    }
    k = 0;
    while (k < nvcpus) : (k += 1) printChecksumLine("done vcpu ", k, slot(k)[1]);
    rt.exit(0);
}
