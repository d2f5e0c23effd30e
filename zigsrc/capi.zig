//! The root of libkvmlab: every exported symbol comes from capi/*.zig, one
//! file per handle kind (common, vm, snapshot, pool, fork). The testing group
//! (capi/testing.zig: benchmark floors, fault injection) is compiled in only
//! with `-Dtesting=true`; gen_header.zig renders kvmlab.h from the product
//! files and kvmlab_testing.h from the testing file.
const build_options = @import("build_options");

pub const product = .{
    @import("capi/common.zig"),
    @import("capi/vm.zig"),
    @import("capi/snapshot.zig"),
    @import("capi/pool.zig"),
    @import("capi/fork.zig"),
};

comptime {
    for (product) |m| _ = m;
    if (build_options.testing) _ = @import("capi/testing.zig");
}

test {
    _ = @import("capi/testing.zig");
    _ = @import("fuzz.zig");
    _ = @import("kvm.zig");
    _ = @import("errors.zig");
    _ = @import("boot.zig");
    _ = @import("safe.zig");
    _ = @import("shell.zig");
    _ = @import("signals.zig");
    _ = @import("state.zig");
    _ = @import("state_test.zig");
    _ = @import("snapshot_test.zig");
    _ = @import("snapshot.zig");
    _ = @import("restore.zig");
    _ = @import("reset.zig");
    _ = @import("fit.zig");
    _ = @import("machine.zig");
    _ = @import("pool.zig");
    _ = @import("pool_test.zig");
    _ = @import("fork.zig");
    inline for (product) |m| _ = m;
}
