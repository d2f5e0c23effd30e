//! spin: every vCPU loops forever (for timeout tests). See docs/guest-protocol.md.
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

fn main(_: u64) noreturn {
    // An asm loop the optimizer cannot remove; `pause` is unprivileged.
    asm volatile (
        \\1:
        \\ pause
        \\ jmp 1b
    );
    @trap();
}
