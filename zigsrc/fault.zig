//! Test-only fault injection: makes one step of shell creation fail, so tests
//! can prove that every failure path frees what it built and rolls back
//! accounting. Disarmed unless kvmlab_fault_inject() is called; one atomic
//! load per step otherwise.
const std = @import("std");
const errors = @import("errors.zig");

pub const Site = enum(c_int) {
    none = 0,
    create_vm = 1,
    memory = 2,
    slot = 3,
    irqchip = 4,
    pit = 5,
    vcpu = 6,
    vcpu_mmap = 7,
    cpuid = 8,
};

var armed = std.atomic.Value(u32).init(0);
var passes = std.atomic.Value(u32).init(0);

/// Fails the step `site` after it has passed `after` more times. `site` 0 disarms.
pub fn arm(site: c_int, after: u32) errors.Error!void {
    if (std.enums.fromInt(Site, site) == null) return errors.fail(.unknown_fault_site, "unknown fault site {d} (1 .. 8)", .{site});
    passes.store(after, .release);
    armed.store(@intCast(site), .release);
}

pub fn check(site: Site) errors.Error!void {
    if (armed.load(.acquire) != @as(u32, @intCast(@intFromEnum(site)))) return;
    while (true) {
        const left = passes.load(.acquire);
        if (left == 0) {
            if (armed.cmpxchgStrong(@intCast(@intFromEnum(site)), 0, .acq_rel, .acquire) == null)
                return errors.fail(.fault_injected, "injected fault at shell step '{s}' (test switch kvmlab_fault_inject)", .{@tagName(site)});
            return;
        }
        if (passes.cmpxchgWeak(left, left - 1, .acq_rel, .acquire) == null) return;
    }
}
