//! kvmlab build: the core shared library, the generated C header, the built-in
//! guest images, and the Zig unit tests.
//!
//!   zig build -Dcpu=baseline --release=safe   -> zig-out/lib/libkvmlab.so,
//!                                                zig-out/include/kvmlab.h,
//!                                                zig-out/guests/<name>.bin
//!   zig build test                             -> runs the unit tests
//!
//! The Python build hook (hatch_build.py) runs this and copies zig-out into
//! kvmlab/_native/.
const std = @import("std");

/// Built-in guests: each is zigsrc/guests/<name>.zig, linked at 1 MiB and
/// flattened to a raw image (see docs/guest-protocol.md).
const guest_names = [_][]const u8{ "hello", "counter", "memtouch", "spin", "crash", "service" };

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{ .preferred_optimize_mode = .ReleaseSafe });

    // --- core shared library -------------------------------------------------
    const core_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/capi.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .strip = optimize != .Debug,
        .pic = true,
    });
    const lib = b.addLibrary(.{ .name = "kvmlab", .linkage = .dynamic, .root_module = core_mod });
    b.installArtifact(lib);

    // --- header generated from the C ABI declarations --------------------------
    const gen_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/gen_header.zig"),
        .target = b.graph.host,
        .optimize = .Debug,
    });
    const gen = b.addExecutable(.{ .name = "gen_header", .root_module = gen_mod });
    const gen_run = b.addRunArtifact(gen);
    const header = gen_run.captureStdOut(.{});
    b.getInstallStep().dependOn(&b.addInstallFileWithDir(header, .header, "kvmlab.h").step);

    // --- guests ---------------------------------------------------------------
    const guest_target = b.resolveTargetQuery(.{
        .cpu_arch = .x86_64,
        .os_tag = .freestanding,
        .abi = .none,
        .cpu_model = .baseline,
    });
    for (guest_names) |name| {
        const gmod = b.createModule(.{
            .root_source_file = b.path(b.fmt("zigsrc/guests/{s}.zig", .{name})),
            .target = guest_target,
            .optimize = .ReleaseSmall,
            .strip = true,
            .red_zone = false,
            .code_model = .small,
            .pic = false,
            .single_threaded = true,
            .stack_check = false,
        });
        const exe = b.addExecutable(.{ .name = name, .root_module = gmod });
        exe.setLinkerScript(b.path("zigsrc/guests/guest.ld"));
        exe.entry = .{ .symbol_name = "_start" };
        const bin = b.addObjCopy(exe.getEmittedBin(), .{ .format = .bin });
        const inst = b.addInstallFileWithDir(bin.getOutput(), .{ .custom = "guests" }, b.fmt("{s}.bin", .{name}));
        b.getInstallStep().dependOn(&inst.step);
    }

    // --- unit tests -------------------------------------------------------------
    const test_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/capi.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    const tests = b.addTest(.{ .root_module = test_mod });
    const run_tests = b.addRunArtifact(tests);
    const test_step = b.step("test", "Run the Zig unit tests");
    test_step.dependOn(&run_tests.step);
    // The header generator must keep working: build it as part of `test`.
    test_step.dependOn(&gen_run.step);
}
