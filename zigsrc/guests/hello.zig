//! hello: vCPU 0 prints `hello from kvmlab guest\n` and exits 0; any other vCPU
//! exits 0 silently. See docs/guest-protocol.md.
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

fn main(vcpu: u64) noreturn {
    if (vcpu == 0) rt.write("hello from kvmlab guest\n");
    rt.exit(0);
}
