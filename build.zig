//! kvmlab build: the core shared library, the generated C header, the built-in
//! guest images, and the Zig unit tests. Needs Zig 0.17.1 (`python -m ziglang`).
//!
//!   zig build -Dcpu=baseline --release=safe   -> zig-out/lib/libkvmlab.so,
//!                                                zig-out/include/kvmlab.h,
//!                                                zig-out/guests/<name>.bin
//!   zig build test                             -> runs the unit tests, and
//!                                                checks kvmlab.h against Zig's
//!                                                struct layouts with a C compile
//!
//!   zig build native -Dcpu=baseline --release=safe
//!                                           -> the same into kvmlab/_native/ of
//!                                              the source tree (editable installs)
//!
//! Options: -Dguests=false skips the guest images (library + header only).
//! -Dtesting=false leaves the testing export group (benchmark floors, fault
//! injection: kvmlab_testing.h) out of the library; `nm -D` then shows only
//! the product ABI of kvmlab.h. Default on: `kvmlab bench` ships in the wheel.
//! The CPU defaults to `baseline` (portable artifacts); -Dcpu=native opts in.
//! Wheels are built with -Dtarget=x86_64-linux-gnu.2.28 (hatch_build.py): the
//! library then needs no glibc symbol newer than 2.28 (manylinux_2_28).
//! Only x86_64 Linux targets are accepted: the core is x86_64 KVM code.
//!
//! The Python build hook (hatch_build.py) runs this and copies zig-out into
//! kvmlab/_native/.
const std = @import("std");

/// Built-in guests: each is zigsrc/guests/<name>.zig, linked at 1 MiB and
/// flattened to a raw image (see docs/guest-protocol.md).
const guest_names = [_][]const u8{ "hello", "counter", "memtouch", "spin", "crash", "service", "parser" };

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{ .default_target = .{ .cpu_model = .baseline } });
    // KVM ioctl numbers and register layouts in zigsrc/ are x86_64's: refuse
    // other targets (including the default one on a non-x86_64 machine).
    if (target.result.cpu.arch != .x86_64 or target.result.os.tag != .linux) std.process.fatal(
        "kvmlab: the core is x86_64 Linux KVM code; target {s}-{s} is not supported (build on an x86_64 Linux machine)",
        .{ @tagName(target.result.cpu.arch), @tagName(target.result.os.tag) },
    );
    const optimize = b.standardOptimizeOption(.{ .preferred_optimize_mode = .safe });
    const with_guests = b.option(bool, "guests", "Build the guest images (default: true)") orelse true;
    const with_testing = b.option(bool, "testing", "Export the testing group: benchmark floors, fault injection (default: true)") orelse true;

    // --- core shared library -------------------------------------------------
    const core_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/capi.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .strip = optimize != .debug,
        .pic = true,
    });
    const options = b.addOptions();
    options.addOption(bool, "testing", with_testing);
    core_mod.addOptions("build_options", options);
    const lib = b.addLibrary(.{ .name = "kvmlab", .linkage = .dynamic, .root_module = core_mod });
    b.installArtifact(lib);

    // --- headers generated from the C ABI declarations -------------------------
    // gen_header.zig imports capi/*.zig and reflects over their pub decls, so
    // it is compiled (for the build host) with the same libc setting as the core.
    const gen_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/gen_header.zig"),
        .target = b.graph.host,
        .optimize = .debug,
        .link_libc = true,
    });
    const gen = b.addExecutable(.{ .name = "gen_header", .root_module = gen_mod });
    const gen_run = b.addRunArtifact(gen);
    gen_run.expectExitCode(0);
    const header = gen_run.captureStdOut(.{});
    b.getInstallStep().dependOn(&b.addInstallFileWithDir(header, .header, "kvmlab.h").step);
    const gen_testing = b.addRunArtifact(gen);
    gen_testing.addArg("--group=testing");
    gen_testing.expectExitCode(0);
    const testing_header = gen_testing.captureStdOut(.{});
    b.getInstallStep().dependOn(&b.addInstallFileWithDir(testing_header, .header, "kvmlab_testing.h").step);

    // --- guests ---------------------------------------------------------------
    // No SSE in guests: kvm_pvm emulates CPL0 code, and its emulator stops
    // with an internal error on SSE instructions (guests must run at CPL0 too).
    const guest_target = b.resolveTargetQuery(.{
        .cpu_arch = .x86_64,
        .os_tag = .freestanding,
        .abi = .none,
        .cpu_model = .baseline,
        .cpu_features_sub = std.Target.x86.featureSet(&.{ .mmx, .sse, .sse2 }),
        .cpu_features_add = std.Target.x86.featureSet(&.{.soft_float}),
    });
    // `zig build native`: refresh kvmlab/_native/ in the source tree in place,
    // the quick loop for an editable install (same layout as hatch_build.py).
    const native = b.addUpdateSourceFiles();
    native.addCopyFileToSource(lib.getEmittedBin(), "kvmlab/_native/libkvmlab.so");
    native.addCopyFileToSource(header, "kvmlab/_native/kvmlab.h");
    native.addCopyFileToSource(testing_header, "kvmlab/_native/kvmlab_testing.h");
    if (with_guests) for (guest_names) |name| {
        const gmod = b.createModule(.{
            .root_source_file = b.path(b.fmt("zigsrc/guests/{s}.zig", .{name})),
            .target = guest_target,
            .optimize = .small,
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
        const bin = b.addObjCopy(exe.getEmittedBin(), .{ .format = .binary });
        const inst = b.addInstallFileWithDir(bin.getOutput(), .{ .custom = "guests" }, b.fmt("{s}.bin", .{name}));
        b.getInstallStep().dependOn(&inst.step);
        native.addCopyFileToSource(bin.getOutput(), b.fmt("kvmlab/_native/guests/{s}.bin", .{name}));
    };
    const native_step = b.step("native", "Copy the artifacts into kvmlab/_native/ (editable installs)");
    native_step.dependOn(&native.step);

    // --- unit tests -------------------------------------------------------------
    const test_step = b.step("test", "Run the Zig unit tests and check kvmlab.h");

    const test_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/capi.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    test_mod.addOptions("build_options", options);
    // LLVM: `zig build test --fuzz=N` needs its coverage instrumentation
    // (the self-hosted backend emits none: "pcs_len was zero").
    const tests = b.addTest(.{ .name = "core-tests", .root_module = test_mod, .use_llvm = true });
    test_step.dependOn(&b.addRunArtifact(tests).step);

    // The header generator's own tests (type mapping, rendering). The filter
    // keeps capi.zig's tests (reachable through its import) out of this binary.
    const gen_tests = b.addTest(.{
        .name = "gen-header-tests",
        .root_module = gen_mod,
        .filters = &.{"gen_header:"},
    });
    test_step.dependOn(&b.addRunArtifact(gen_tests).step);

    // Both headers must compile as C11 and agree with Zig on every struct
    // size, field offset and enum value: gen_header --check-c emits _Static_asserts.
    const check_dir = b.addWriteFiles();
    _ = check_dir.addCopyFile(header, "kvmlab.h");
    _ = check_dir.addCopyFile(testing_header, "kvmlab_testing.h");
    const check_mod = b.createModule(.{
        .target = target,
        .optimize = .debug,
        .link_libc = true,
    });
    for ([_][]const u8{ "product", "testing" }) |group| {
        const check_run = b.addRunArtifact(gen);
        check_run.addArg(b.fmt("--group={s}", .{group}));
        check_run.addArg("--check-c");
        check_run.expectExitCode(0);
        const check_c = check_dir.addCopyFile(check_run.captureStdOut(.{}), b.fmt("header_check_{s}.c", .{group}));
        check_mod.addCSourceFile(.{
            .file = check_c,
            .flags = &.{ "-std=c11", "-Wall", "-Wextra", "-Werror" },
        });
    }
    const check_obj = b.addObject(.{ .name = "header_check", .root_module = check_mod });
    test_step.dependOn(&check_obj.step);

    // With -Dtesting=false the library exports exactly the product header's
    // functions: check_exports.zig compares its dynamic symbols with kvmlab.h.
    const product_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/capi.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .strip = true,
        .pic = true,
    });
    const product_options = b.addOptions();
    product_options.addOption(bool, "testing", false);
    product_mod.addOptions("build_options", product_options);
    const product_lib = b.addLibrary(.{ .name = "kvmlab-product", .linkage = .dynamic, .root_module = product_mod });
    const exports_mod = b.createModule(.{
        .root_source_file = b.path("zigsrc/check_exports.zig"),
        .target = b.graph.host,
        .optimize = .debug,
    });
    const exports_run = b.addRunArtifact(b.addExecutable(.{ .name = "check_exports", .root_module = exports_mod }));
    exports_run.addFileArg(product_lib.getEmittedBin());
    exports_run.addFileArg(header);
    exports_run.expectExitCode(0);
    test_step.dependOn(&exports_run.step);

    // Only the header (no library, no guests): `zig build header`.
    const header_step = b.step("header", "Generate zig-out/include/kvmlab.h and kvmlab_testing.h only");
    header_step.dependOn(&b.addInstallFileWithDir(header, .header, "kvmlab.h").step);
    header_step.dependOn(&b.addInstallFileWithDir(testing_header, .header, "kvmlab_testing.h").step);
}
