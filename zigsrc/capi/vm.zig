//! The C ABI of libkvmlab: VM handles (kvmlab_vm, a machine.Machine).
const std = @import("std");
const errors = @import("../errors.zig");
const kvm = @import("../kvm.zig");
const shell = @import("../shell.zig");
const restore = @import("../restore.zig");
const reset = @import("../reset.zig");
const machine = @import("../machine.zig");
const service = @import("../service.zig");
const common = @import("common.zig");

/// Creates an empty VM shell: VM, memory, slot, irqchip, PIT, vCPUs.
pub export fn kvmlab_vm_new(opts: ?*const common.kvmlab_vm_config, out: ?*?*common.kvmlab_vm) callconv(.c) common.kvmlab_result {
    return common.call(vmNew, .{ opts, out });
}
fn vmNew(opts: ?*const common.kvmlab_vm_config, out: ?*?*common.kvmlab_vm) errors.Error!void {
    const o = try common.outPtr(?*common.kvmlab_vm, out);
    o.* = null;
    const c = opts orelse return errors.fail(.null_argument, "config is NULL", .{});
    o.* = @ptrCast(try machine.Machine.create(c.memory_bytes, c.vcpus));
}

/// Frees a VM; NULL is fine. Must not race with other calls on the same VM.
pub export fn kvmlab_vm_free(h: ?*common.kvmlab_vm) callconv(.c) void {
    const m = common.asVm(h) catch return;
    m.destroy();
}

pub export fn kvmlab_vm_boot(h: ?*common.kvmlab_vm, opts: ?*const common.kvmlab_boot_options) callconv(.c) common.kvmlab_result {
    return common.call(vmBoot, .{ h, opts });
}
fn vmBoot(h: ?*common.kvmlab_vm, opts: ?*const common.kvmlab_boot_options) errors.Error!void {
    const m = try common.asVm(h);
    const o = opts orelse return errors.fail(.null_argument, "boot options are NULL", .{});
    const image = try common.bytesOf(o.image, o.image_bytes);
    const args = try common.bytesOf(o.args, o.args_bytes);
    try m.shell.bootGuest(image, args, o.cpl, try common.bytesOf(o.name, o.name_bytes));
}

/// Runs the guest until every vCPU stopped, or `timeout_ns` passed (0 = none).
pub export fn kvmlab_vm_run(h: ?*common.kvmlab_vm, timeout_ns: u64, out: ?*common.kvmlab_run_result) callconv(.c) common.kvmlab_result {
    return common.call(vmRun, .{ h, timeout_ns, out });
}
fn vmRun(h: ?*common.kvmlab_vm, timeout_ns: u64, out: ?*common.kvmlab_run_result) errors.Error!void {
    const m = try common.asVm(h);
    const o = try common.outPtr(common.kvmlab_run_result, out);
    _ = try runInto(m, timeout_ns, o);
}

/// vm.call() in one native call: writes a service request (`op`, `payload`)
/// into the guest, runs it as kvmlab_vm_run does (`timeout_ns`, `run_out`)
/// and, when the run stopped at the service checkpoint, copies the answer
/// into `answer_buf` (at most `answer_capacity` bytes) and says so in
/// `answer`. With `resume_run` nonzero nothing is written: the run goes on with
/// the request of `answer->seq` (after a run a signal interrupted).
/// `since`: kvmlab_vm_interrupt_count where the caller's call began; the run
/// is an operation pinned there (kvmlab_vm_begin_operation), so an interrupt
/// made since stops it, also one made before a resume. Pinning here saves a
/// caller two native calls around it, each measured microseconds after a run;
/// so do not call it inside a kvmlab_vm_begin_operation bracket (it ends it).
pub export fn kvmlab_vm_call(h: ?*common.kvmlab_vm, since: u64, op: common.kvmlab_service_op, payload: ?[*]const u8, payload_bytes: usize, resume_run: u32, timeout_ns: u64, run_out: ?*common.kvmlab_run_result, answer_buf: ?[*]u8, answer_capacity: usize, answer: ?*common.kvmlab_service_answer) callconv(.c) common.kvmlab_result {
    return common.call(vmCall, .{ h, since, op, payload, payload_bytes, resume_run, timeout_ns, run_out, answer_buf, answer_capacity, answer });
}
fn vmCall(h: ?*common.kvmlab_vm, since: u64, op: common.kvmlab_service_op, payload: ?[*]const u8, payload_bytes: usize, resume_run: u32, timeout_ns: u64, run_out: ?*common.kvmlab_run_result, answer_buf: ?[*]u8, answer_capacity: usize, answer: ?*common.kvmlab_service_answer) errors.Error!void {
    const m = try common.asVm(h);
    const o = try common.outPtr(common.kvmlab_run_result, run_out);
    const a = try common.outPtr(common.kvmlab_service_answer, answer);
    const buf: []u8 = if (answer_capacity == 0) &.{} else (answer_buf orelse return errors.fail(.null_argument, "NULL answer buffer", .{}))[0..answer_capacity];
    if (resume_run == 0) {
        const bytes = try common.bytesOf(payload, payload_bytes);
        if (bytes.len > service.protocol.max_bytes) return errors.fail(.service_payload, "a service payload of {d} bytes is over the limit of {d}", .{ bytes.len, service.protocol.max_bytes });
        a.seq = try service.send(m, @bitCast(@intFromEnum(op)), bytes);
    }
    a.bytes = 0;
    a.status = 0;
    a.outcome = .no_answer;
    m.shell.pinOperation(since);
    defer m.shell.unpinOperation();
    const r = try runInto(m, timeout_ns, o);
    if (r.reason != .checkpoint or r.checkpoint_tag != service.protocol.wait_tag) return;
    const got = try service.receive(m, a.seq, buf);
    a.* = .{ .seq = a.seq, .bytes = got.bytes, .status = got.status, .outcome = if (got.in_sequence) .answered else .out_of_protocol };
}

/// Runs `m` and fills `o` as kvmlab_vm_run reports a run.
fn runInto(m: *machine.Machine, timeout_ns: u64, o: *common.kvmlab_run_result) errors.Error!shell.RunOutcome {
    const vm = m.shell;
    const r = try vm.run(timeout_ns);
    m.noteRun(r.elapsed_ns); // a pooled VM's first run, into its restore's timing record
    o.* = .{
        .reason = r.reason,
        .exit_code = r.exit_code,
        .checkpoint_tag = r.checkpoint_tag,
        .reserved = 0,
        .elapsed_ns = r.elapsed_ns,
        .console_bytes = vm.console_len,
        .console_dropped_bytes = vm.console_dropped,
    };
    return r;
}

/// Stops a run() in progress on another thread at the vCPUs' next exit (it
/// returns reason timeout; the next run resumes), or a whole reset loop.
/// A request made once the call began (or, with kvmlab_vm_begin_operation,
/// once the caller's operation began) is never lost, even before its vCPUs
/// entered the guest. Thread-safe; no effect on later calls when idle.
pub export fn kvmlab_vm_interrupt(h: ?*common.kvmlab_vm) callconv(.c) void {
    const vm = (common.asVm(h) catch return).shell;
    vm.interrupt();
}

/// kvmlab_vm_interrupt calls on this VM so far (0 for NULL). Thread-safe. A
/// caller whose operation spans several runs or reset loops (or may wait for
/// the VM first) notes it when the operation begins, for
/// kvmlab_vm_begin_operation.
pub export fn kvmlab_vm_interrupt_count(h: ?*common.kvmlab_vm) callconv(.c) u64 {
    const vm = (common.asVm(h) catch return 0).shell;
    return vm.interruptCount();
}

/// Until kvmlab_vm_end_operation, the runs and reset loops on this VM are one
/// operation that began when kvmlab_vm_interrupt_count returned `since`: a
/// kvmlab_vm_interrupt made after that stops each of them at once, even one
/// made before this call or between two of them. Call it (and end) where you
/// would call kvmlab_vm_run: not while a run is in progress.
pub export fn kvmlab_vm_begin_operation(h: ?*common.kvmlab_vm, since: u64) callconv(.c) void {
    const vm = (common.asVm(h) catch return).shell;
    vm.pinOperation(since);
}

/// Ends what kvmlab_vm_begin_operation began: each run or loop is its own
/// operation again.
pub export fn kvmlab_vm_end_operation(h: ?*common.kvmlab_vm) callconv(.c) void {
    const vm = (common.asVm(h) catch return).shell;
    vm.unpinOperation();
}

/// Begins closing a VM (call it before kvmlab_vm_free when a run or reset
/// loop may be in progress on another thread): latched, so a run in progress
/// stops at its next exit to the host and every later run or reset loop fails
/// with KVMLAB_CLOSED at once. Thread-safe; irreversible.
pub export fn kvmlab_vm_begin_close(h: ?*common.kvmlab_vm) callconv(.c) void {
    const vm = (common.asVm(h) catch return).shell;
    vm.beginClose();
}

/// Moves up to `capacity` console bytes into `buf`; *out_bytes = how many.
pub export fn kvmlab_vm_console_take(h: ?*common.kvmlab_vm, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) callconv(.c) common.kvmlab_result {
    return common.call(consoleTake, .{ h, buf, capacity, out_bytes });
}
fn consoleTake(h: ?*common.kvmlab_vm, buf: ?[*]u8, capacity: usize, out_bytes: ?*usize) errors.Error!void {
    const vm = (try common.asVm(h)).shell;
    const o = try common.outPtr(usize, out_bytes);
    const b: []u8 = if (capacity == 0) &.{} else (buf orelse return errors.fail(.null_argument, "NULL buffer", .{}))[0..capacity];
    o.* = vm.consoleTake(b);
}

pub export fn kvmlab_vm_read_memory(h: ?*common.kvmlab_vm, gpa: u64, buf: ?[*]u8, len: usize) callconv(.c) common.kvmlab_result {
    return common.call(readMemory, .{ h, gpa, buf, len });
}
fn readMemory(h: ?*common.kvmlab_vm, gpa: u64, buf: ?[*]u8, len: usize) errors.Error!void {
    const m = try common.asVm(h);
    _ = try m.shell.guestSlice(gpa, len);
    if (len == 0) return;
    const dst = buf orelse return errors.fail(.null_argument, "NULL buffer", .{});
    try m.readMemory(gpa, dst[0..len]);
}

pub export fn kvmlab_vm_write_memory(h: ?*common.kvmlab_vm, gpa: u64, buf: ?[*]const u8, len: usize) callconv(.c) common.kvmlab_result {
    return common.call(writeMemory, .{ h, gpa, buf, len });
}
fn writeMemory(h: ?*common.kvmlab_vm, gpa: u64, buf: ?[*]const u8, len: usize) errors.Error!void {
    const m = try common.asVm(h);
    _ = try m.shell.guestSlice(gpa, len);
    try m.writeMemory(gpa, try common.bytesOf(buf, len));
}

/// Sets the identity the guest reads through ports 0x503 (low 32 bits) and
/// 0x504 (high); 0, the default, is "no identity".
pub export fn kvmlab_vm_set_identity(h: ?*common.kvmlab_vm, identity: u64) callconv(.c) common.kvmlab_result {
    return common.call(setIdentity, .{ h, identity });
}
fn setIdentity(h: ?*common.kvmlab_vm, identity: u64) errors.Error!void {
    (try common.asVm(h)).shell.identity.store(identity, .release);
}

/// The VM's identity (see kvmlab_vm_set_identity); 0 for NULL. Never fails.
pub export fn kvmlab_vm_get_identity(h: ?*common.kvmlab_vm) callconv(.c) u64 {
    const m = common.asVm(h) catch return 0;
    return m.shell.identity.load(.acquire);
}

pub export fn kvmlab_vm_get_regs(h: ?*common.kvmlab_vm, vcpu: u32, out: ?*common.kvmlab_regs) callconv(.c) common.kvmlab_result {
    return common.call(getRegs, .{ h, vcpu, out });
}
fn getRegs(h: ?*common.kvmlab_vm, vcpu: u32, out: ?*common.kvmlab_regs) errors.Error!void {
    const vm = (try common.asVm(h)).shell;
    const o = try common.outPtr(common.kvmlab_regs, out);
    var r: kvm.Regs = undefined;
    var s: kvm.Sregs = undefined;
    try vm.getRegs(vcpu, &r, &s);
    o.* = .{
        .rax = r.rax, .rbx = r.rbx, .rcx = r.rcx, .rdx = r.rdx, .rsi = r.rsi, .rdi = r.rdi, .rsp = r.rsp, .rbp = r.rbp,
        .r8 = r.r8, .r9 = r.r9, .r10 = r.r10, .r11 = r.r11, .r12 = r.r12, .r13 = r.r13, .r14 = r.r14, .r15 = r.r15,
        .rip = r.rip, .rflags = r.rflags,
        .cr0 = s.cr0, .cr2 = s.cr2, .cr3 = s.cr3, .cr4 = s.cr4, .efer = s.efer,
        .cs = s.cs.selector, .ss = s.ss.selector, .cpl = s.cs.dpl, .reserved = 0,
    };
}

/// Builds a new VM from a snapshot (a fresh shell, then restore).
/// `flags`: kvmlab_restore_flags bits; without resettable the shell has no
/// dirty log (less kernel memory; kvmlab_vm_enable_reset turns it on later).
pub export fn kvmlab_vm_restore(h: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, flags: u32, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) callconv(.c) common.kvmlab_result {
    return common.call(vmRestore, .{ h, strategy, flags, out, times });
}
fn vmRestore(h: ?*const common.kvmlab_snapshot, strategy: common.kvmlab_strategy, flags: u32, out: ?*?*common.kvmlab_vm, times: ?*common.kvmlab_restore_times) errors.Error!void {
    const o = try common.outPtr(?*common.kvmlab_vm, out);
    o.* = null;
    const s = try common.asSnap(h);
    try s.checkIntact();
    const src = try restore.MemorySource.forSnapshot(s, try common.strategyOf(strategy));
    const t0 = shell.monotonicNs();
    const resettable = flags & (@intFromEnum(common.kvmlab_restore_flags.resettable) | @intFromEnum(common.kvmlab_restore_flags.reset_on_release)) != 0;
    const m = try machine.Machine.createWith(s.parsed.memory_bytes, s.parsed.vcpus, .{ .dirty_log = resettable, .pit = false });
    errdefer m.destroy();
    const t1 = shell.monotonicNs();
    var rt: restore.Times = .{};
    try m.restoreFrom(&s.parsed, src, &rt);
    if (times) |t| t.* = common.restoreTimes(rt, t1 - t0, shell.monotonicNs() - t0, m.shell.mapped(), false, 0, src.strategy());
    o.* = @ptrCast(m);
}

/// Makes a VM restored from `snap` resettable to it (the VM keeps `snap`
/// alive). Call right after the restore.
pub export fn kvmlab_vm_enable_reset(h: ?*common.kvmlab_vm, snap: ?*const common.kvmlab_snapshot) callconv(.c) common.kvmlab_result {
    return common.call(enableReset, .{ h, snap });
}
fn enableReset(h: ?*common.kvmlab_vm, snap: ?*const common.kvmlab_snapshot) errors.Error!void {
    try (try common.asVm(h)).enableReset(try common.asSnap(snap));
}

/// Puts the VM back to its snapshot: dirty pages, vCPUs, devices.
pub export fn kvmlab_vm_reset(h: ?*common.kvmlab_vm, mode: common.kvmlab_reset_mode, out: ?*common.kvmlab_reset_times) callconv(.c) common.kvmlab_result {
    return common.call(vmReset, .{ h, mode, out });
}
fn vmReset(h: ?*common.kvmlab_vm, mode: common.kvmlab_reset_mode, out: ?*common.kvmlab_reset_times) errors.Error!void {
    const m = try common.asVm(h);
    var t: reset.Times = .{};
    try m.resetTo(try resetMode(mode), &t);
    if (out) |o| o.* = t;
}

/// For each of `count` inputs (`input_bytes` each, packed in `inputs`):
/// write it at `input_gpa`, run (deadline `timeout_ns`, 0 = none), record,
/// reset. Results go to `out[count]`; *out_done = how many inputs were done
/// (fewer than `count` when kvmlab_vm_interrupt or a signal such as SIGINT
/// stopped the whole loop: the last result's reason is then timeout or
/// interrupted; the VM is reset either way). Fails with KVMLAB_CLOSED when
/// the VM began closing.
pub export fn kvmlab_vm_reset_loop(h: ?*common.kvmlab_vm, inputs: ?[*]const u8, input_bytes: usize, count: usize, input_gpa: u64, timeout_ns: u64, mode: common.kvmlab_reset_mode, out: ?[*]common.kvmlab_loop_result, out_done: ?*usize) callconv(.c) common.kvmlab_result {
    return common.call(resetLoop, .{ h, inputs, input_bytes, count, input_gpa, timeout_ns, mode, out, out_done });
}
fn resetLoop(h: ?*common.kvmlab_vm, inputs: ?[*]const u8, input_bytes: usize, count: usize, input_gpa: u64, timeout_ns: u64, mode: common.kvmlab_reset_mode, out: ?[*]common.kvmlab_loop_result, out_done: ?*usize) errors.Error!void {
    const m = try common.asVm(h);
    const d = out_done orelse return errors.fail(.null_argument, "out_done is NULL", .{});
    d.* = 0;
    if (count == 0) return;
    if (count > 1 << 24 or input_bytes > 1 << 20) return errors.fail(.loop_limit, "reset_loop takes at most 2^24 inputs of at most 1 MiB", .{});
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    d.* = try m.resetLoop(try common.bytesOf(inputs, input_bytes * count), input_bytes, input_gpa, timeout_ns, try resetMode(mode), o[0..count]);
}

/// kvmlab_vm_reset_loop for inputs of different lengths: input i is
/// inputs[offsets[i] .. offsets[i+1]] (`count` + 1 offsets, never decreasing;
/// each input at most 1 MiB). Each is written as its length (u32 LE) at
/// `input_gpa` and its bytes right after (docs/guest-protocol.md, input
/// protocol), then run, recorded and reset. With `console_stride` > 0 (at most
/// 1 MiB), the first `console_stride` bytes of run i's console output go to
/// console[i * console_stride ..]; out[i].console_bytes is how many it wrote.
/// *out_done = how many inputs were done.
pub export fn kvmlab_vm_reset_loop_var(h: ?*common.kvmlab_vm, inputs: ?[*]const u8, offsets: ?[*]const u64, count: usize, input_gpa: u64, timeout_ns: u64, mode: common.kvmlab_reset_mode, out: ?[*]common.kvmlab_loop_result, console: ?[*]u8, console_stride: usize, out_done: ?*usize) callconv(.c) common.kvmlab_result {
    return common.call(resetLoopVar, .{ h, inputs, offsets, count, input_gpa, timeout_ns, mode, out, console, console_stride, out_done });
}
fn resetLoopVar(h: ?*common.kvmlab_vm, inputs: ?[*]const u8, offsets: ?[*]const u64, count: usize, input_gpa: u64, timeout_ns: u64, mode: common.kvmlab_reset_mode, out: ?[*]common.kvmlab_loop_result, console: ?[*]u8, console_stride: usize, out_done: ?*usize) errors.Error!void {
    const m = try common.asVm(h);
    const d = out_done orelse return errors.fail(.null_argument, "out_done is NULL", .{});
    d.* = 0;
    if (count == 0) return;
    if (count > 1 << 24 or console_stride > shell.console_capacity_bytes)
        return errors.fail(.loop_limit, "reset_loop_var takes at most 2^24 inputs and a console_stride of at most 1 MiB", .{});
    const o = out orelse return errors.fail(.null_argument, "out is NULL", .{});
    const offs = (offsets orelse return errors.fail(.null_argument, "offsets is NULL", .{}))[0 .. count + 1];
    if (offs[count] > 1 << 32) return errors.fail(.loop_limit, "reset_loop_var takes at most 4 GiB of inputs", .{});
    const con: []u8 = if (console_stride == 0) &.{} else (console orelse return errors.fail(.null_argument, "console is NULL", .{}))[0 .. count * console_stride];
    d.* = try m.resetLoopVar(try common.bytesOf(inputs, @intCast(offs[count])), offs, input_gpa, timeout_ns, try resetMode(mode), o[0..count], con, console_stride);
}

/// A reset mode from C, which may hold any int.
fn resetMode(mode: common.kvmlab_reset_mode) errors.Error!reset.Mode {
    return std.enums.fromInt(reset.Mode, @intFromEnum(mode)) orelse errors.fail(.unknown_reset_mode, "unknown reset mode {d}", .{@intFromEnum(mode)});
}
