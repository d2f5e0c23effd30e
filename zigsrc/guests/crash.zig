//! crash: every vCPU executes `ud2` straight away. With no IDT the #UD becomes a
//! triple fault, which the host reports as GuestCrashError. See
//! docs/guest-protocol.md.
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

fn main(_: u64) noreturn {
    asm volatile ("ud2");
    @trap();
}
