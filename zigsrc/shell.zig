//! The shell layer: a KVM virtual machine's VM fd, guest memory, memory slot,
//! irqchip, PIT and vCPUs, the KVM_RUN loop that serves the guest's I/O ports,
//! and the bare memory operations the layers above build on (map a file over
//! guest memory, drop private pages, read the dirty log). It knows nothing of
//! snapshots, restore, reset or pools (those layers import this one).
//!
//! Threading: `run` executes vCPU 0 on the calling thread and vCPUs 1.. on
//! threads spawned for that call; it returns when every vCPU has stopped at
//! exit, checkpoint, crash or the deadline. A deadline is honoured with a
//! per-thread POSIX timer that sends the kick (signals.zig) to the vCPU thread; the
//! signal handler sets `immediate_exit` so KVM_RUN returns EINTR (no thread
//! ever spins waiting). One `run` at a time per VM (`error.Busy` otherwise).
const std = @import("std");
const linux = std.os.linux;
const kvm = @import("kvm.zig");
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const host = @import("host.zig");
const fault = @import("fault.zig");
const sigbus = @import("sigbus.zig");
const safe = @import("safe.zig");
const signals = @import("signals.zig");
pub const ForeignSignals = signals.ForeignSignals;

const allocator = std.heap.c_allocator;

/// Console bytes kept per VM until taken; the rest are counted as dropped.
pub const console_capacity_bytes: usize = 1 << 20;
/// Longest single console write through the descriptor port.
pub const console_write_max_bytes: u64 = 65536;

pub const port_console_putc: u16 = 0x00E9;
pub const port_exit: u16 = 0x0500;
pub const port_checkpoint: u16 = 0x0501;
pub const port_console_write: u16 = 0x0502;
/// Reads (`in`) give the low / high 32 bits of the VM's identity: a value the
/// host gives each clone that asks for one (fork_many, prepare), 0 otherwise.
pub const port_identity_lo: u16 = 0x0503;
pub const port_identity_hi: u16 = 0x0504;

/// Where the KVM TSS lives (Intel needs it for real mode; outside guest RAM).
pub const tss_addr: u64 = 0xFFFB_D000;

pub const VcpuStatus = enum(u8) { ready, checkpoint, exited, halted, crashed, interrupted };

/// `interrupted`: a signal other than kvmlab's own kick (e.g. SIGINT from
/// Ctrl-C) interrupted KVM_RUN; the caller handles it and calls run again.
pub const Reason = enum(c_int) { exit = 0, checkpoint = 1, halt = 2, timeout = 3, interrupted = 4 };

pub const Vcpu = struct {
    fd: kvm.VcpuFd = .{ .fd = -1 },
    run: ?*kvm.Run = null,
    status: VcpuStatus = .ready,
    exit_code: u32 = 0,
    checkpoint_tag: u32 = 0,
    /// Kernel thread id while this vCPU is inside `vcpuLoop`, else 0.
    tid: std.atomic.Value(i32) = .init(0),
    /// The signal mask last given to KVM for this vCPU's KVM_RUN (see
    /// ForeignSignals), so it is set again only when the caller's differs.
    kvm_sigmask: ?linux.sigset_t = null,
};

pub const RunOutcome = struct {
    reason: Reason,
    exit_code: u32,
    checkpoint_tag: u32,
    elapsed_ns: u64,
};

/// The file behind guest memory after mapFile (the fd is borrowed: whoever
/// mapped it keeps it open for the shell's lifetime).
pub const Backing = struct { fd: linux.fd_t, offset: u64 };

pub const Vm = struct {
    vm_fd: kvm.VmFd = .{ .fd = -1 },
    mem: []align(4096) u8 = &.{},
    vcpu_count: u32 = 0,
    vcpus: [boot.max_vcpus]Vcpu = @splat(.{}),
    run_bytes: usize = 0,
    booted: bool = false,
    /// The slot logs dirty pages (reset needs it); an in-kernel PIT exists.
    dirty_logging: bool = false,
    has_pit: bool = false,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on: clearDirtyLog re-protects.
    manual_protect: bool = false,
    running: std.atomic.Value(bool) = .init(false),
    /// Stops the vCPUs of the run in progress (a crash, a foreign signal,
    /// a failed spawn, interrupt()); cleared when a run starts.
    stop: std.atomic.Value(bool) = .init(false),
    /// interrupt() calls so far. An operation (run, reset loop) notes the
    /// count when it begins (`interrupts_seen`) and stops once it moves: a
    /// request made after the operation began is never lost, even when it
    /// lands before the vCPUs run or between two runs of a loop, and one made
    /// while the VM is idle affects nothing.
    interrupts: std.atomic.Value(u64) = .init(0),
    interrupts_seen: u64 = 0,
    /// Set by pinOperation(): a caller's operation spanning several runs or
    /// loops (a Python call) noted `interrupts_seen` at its own start.
    op_pinned: bool = false,
    /// signals.caughtCount() when the run or loop began: a stop signal
    /// (Ctrl-C) caught on any thread since stops it (see signals.zig).
    signals_seen: u64 = 0,
    /// Latched by beginClose() and never cleared (except when a pool hands
    /// the VM out again): no run starts any more, and a run in progress stops
    /// at its next exit to the host. close() cannot lose it to a run that had
    /// not reached KVM_RUN yet.
    closing: std.atomic.Value(bool) = .init(false),
    /// Set when a foreign signal interrupted this run (see Reason.interrupted).
    signalled: std.atomic.Value(bool) = .init(false),
    deadline_ns: u64 = 0,
    /// Guards console, crash message and kicks (a kick must not target a
    /// thread id after its vCPU loop ended).
    lock: std.c.pthread_mutex_t = .{},
    console: []u8 = &.{},
    console_len: usize = 0,
    console_dropped: u64 = 0,
    crash_len: usize = 0,
    crash_msg: [900]u8 = undefined,
    /// The id of the first crash (errors.Check, a guest_crash id).
    crash_check: errors.Check = .guest_crash,
    /// The built-in or user guest's name (for snapshots and messages).
    guest_name: [32]u8 = @splat(0),
    /// Set by mapFile: guest memory is a private mapping of this file.
    backing: ?Backing = null,
    /// A host read of the file-backed guest memory faulted (see sigbus.zig).
    mem_damaged: std.atomic.Value(bool) = .init(false),
    /// Read by the guest at ports 0x503/0x504; host state, 0 unless given.
    identity: std.atomic.Value(u64) = .init(0),
    sigbus_slot: ?usize = null,

    /// Creates an empty shell with everything (dirty logging, PIT).
    pub fn create(memory_bytes: u64, vcpu_count: u32) errors.Error!*Vm {
        return createWith(memory_bytes, vcpu_count, .{});
    }
    /// `dirty_log` false: no dirty bitmap (enableDirtyLog later: see fit.zig). `pit` false: no PIT
    /// (~0.7 ms, 16 KiB kernel stack; state.zig makes one for a snapshot that used it).
    /// `vm_fd`: made before (fork.zig). `file`: memory is this file's private map from the start.
    pub const Options = struct { dirty_log: bool = true, pit: bool = true, vm_fd: ?kvm.VmFd = null, file: ?Backing = null };

    /// A VM fd (KVM_CREATE_VM and its TSS address): the first step of every shell.
    pub fn createVmFd(h: *const host.Host) errors.Error!kvm.VmFd {
        try fault.check(.create_vm);
        const fd = h.system.createVm() catch return errors.ioctlFailed("KVM_CREATE_VM");
        fd.setTssAddr(tss_addr) catch {};
        return fd;
    }

    /// Creates an empty shell. The memory slot is registered before the
    /// irqchip: the other order costs an ~11 ms wait on kvm_pvm.
    /// A given `opts.vm_fd` is the shell's from the start: closed on every failure.
    pub fn createWith(memory_bytes: u64, vcpu_count: u32, opts: Options) errors.Error!*Vm {
        const vm = allocator.create(Vm) catch {
            if (opts.vm_fd) |fd| _ = linux.close(fd.fd);
            return error.OutOfMemory;
        };
        vm.* = .{ .vm_fd = opts.vm_fd orelse .{ .fd = -1 } };
        errdefer vm.destroy();
        try boot.checkConfig(memory_bytes, vcpu_count);
        const h = try host.get();
        signals.installKickHandler();
        if (opts.vm_fd == null) vm.vm_fd = try createVmFd(h);

        try fault.check(.memory);
        const addr = linux.mmap(null, memory_bytes, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .ANONYMOUS = opts.file == null, .NORESERVE = true }, if (opts.file) |b| b.fd else -1, if (opts.file) |b| @intCast(b.offset) else 0);
        if (linux.errno(addr) != .SUCCESS)
            return errors.fail(.guest_memory_map, "cannot map {d} MiB of guest memory: E{s}", .{ memory_bytes >> 20, @tagName(linux.errno(addr)) });
        vm.mem = @as([*]align(4096) u8, @ptrFromInt(addr))[0..memory_bytes];
        vm.backing = opts.file; // mapFile then only registers it for SIGBUS (no MMU-notifier sweep)
        if (opts.file) |b| try vm.mapFile(b.fd, b.offset);
        try fault.check(.slot); // dirty logging from the start: free until first read; later it stalls ~11 ms
        try vm.setMemorySlot(if (opts.dirty_log) kvm.MEM_LOG_DIRTY_PAGES else 0);
        vm.dirty_logging = opts.dirty_log;

        try fault.check(.irqchip);
        vm.vm_fd.createIrqchip() catch return errors.ioctlFailed("KVM_CREATE_IRQCHIP");
        if (opts.pit) try vm.createPit();

        vm.run_bytes = h.vcpu_mmap_bytes;
        var i: u32 = 0;
        while (i < vcpu_count) : (i += 1) {
            const v = &vm.vcpus[i];
            try fault.check(.vcpu);
            v.fd = vm.vm_fd.createVcpu(i) catch return errors.ioctlFailed("KVM_CREATE_VCPU");
            vm.vcpu_count = i + 1;
            try fault.check(.vcpu_mmap);
            const r = linux.mmap(null, vm.run_bytes, .{ .READ = true, .WRITE = true }, .{ .TYPE = .SHARED }, v.fd.fd, 0);
            if (linux.errno(r) != .SUCCESS) return errors.fail(.vcpu_mmap, "mmap of kvm_run failed: E{s}", .{@tagName(linux.errno(r))});
            v.run = @ptrFromInt(r);
            try fault.check(.cpuid);
            try host.setVcpuCpuid(v.fd, i);
        }
        return vm;
    }

    /// The in-kernel PIT for a shell made without it (see Options).
    pub fn createPit(vm: *Vm) errors.Error!void {
        try fault.check(.pit);
        vm.vm_fd.createPit2(&.{}) catch return errors.ioctlFailed("KVM_CREATE_PIT2");
        vm.has_pit = true;
    }

    /// Dirty logging for a shell made without it (see Options). Idempotent.
    pub fn enableDirtyLog(vm: *Vm) errors.Error!void {
        if (vm.dirty_logging) return;
        try vm.setMemorySlot(kvm.MEM_LOG_DIRTY_PAGES);
        vm.dirty_logging = true;
    }

    pub fn setMemorySlot(vm: *Vm, flags: u32) errors.Error!void {
        vm.vm_fd.setUserMemoryRegion(&.{
            .slot = 0,
            .flags = flags,
            .guest_phys_addr = 0,
            .memory_size = vm.mem.len,
            .userspace_addr = @intFromPtr(vm.mem.ptr),
        }) catch return errors.ioctlFailed("KVM_SET_USER_MEMORY_REGION");
    }

    /// Frees everything; safe on a partly built VM.
    pub fn destroy(vm: *Vm) void {
        std.debug.assert(!vm.running.load(.acquire));
        for (vm.vcpus[0..vm.vcpu_count]) |*v| {
            if (v.run) |r| _ = linux.munmap(@ptrCast(r), vm.run_bytes);
            if (v.fd.fd >= 0) _ = linux.close(v.fd.fd);
        }
        if (vm.vm_fd.fd >= 0) _ = linux.close(vm.vm_fd.fd);
        // Out of the SIGBUS table before the range is unmapped (it may be reused).
        sigbus.unregister(vm.sigbus_slot);
        if (vm.mem.len > 0) _ = linux.munmap(vm.mem.ptr, vm.mem.len);
        if (vm.console.len > 0) allocator.free(vm.console);
        allocator.destroy(vm);
    }

    /// Loads a guest image and puts every vCPU at its entry point.
    pub fn bootGuest(vm: *Vm, image: []const u8, args: []const u8, cpl: u32, name: []const u8) errors.Error!void {
        if (vm.booted) return errors.fail(.vm_has_guest, "this VM already has a guest", .{});
        if (vm.running.load(.acquire)) return errors.fail(.vm_running, "the VM is running", .{});
        const entry = try boot.loadImage(vm.mem, image);
        try boot.writeTables(vm.mem, vm.vcpu_count, cpl, args);
        for (vm.vcpus[0..vm.vcpu_count], 0..) |*v, i| {
            var sregs: kvm.Sregs = undefined;
            v.fd.getSregs(&sregs) catch return errors.ioctlFailed("KVM_GET_SREGS");
            v.fd.setSregs(&boot.entrySregs(sregs, cpl)) catch return errors.ioctlFailed("KVM_SET_SREGS");
            v.fd.setRegs(&boot.entryRegs(entry, @intCast(i))) catch return errors.ioctlFailed("KVM_SET_REGS");
            if (i > 0) {
                // With an in-kernel irqchip, application processors wait for
                // INIT/SIPI; kvmlab starts every vCPU at the entry directly.
                v.fd.setMpState(kvm.MP_STATE_RUNNABLE) catch return errors.ioctlFailed("KVM_SET_MP_STATE");
            }
            v.status = .ready;
        }
        const n = @min(name.len, vm.guest_name.len);
        @memcpy(vm.guest_name[0..n], name[0..n]);
        vm.booted = true;
    }

    /// Which vCPUs a run resumes. A vCPU waiting at a checkpoint resumes only
    /// once no other vCPU is still on its way (ready, interrupted, halted):
    /// after a timeout, the next run() first brings the others to a stop.
    fn resumes(vm: *Vm, index: u32) bool {
        var pending = false;
        for (vm.vcpus[0..vm.vcpu_count]) |*v| switch (v.status) {
            .ready, .interrupted, .halted => pending = true,
            else => {},
        };
        return switch (vm.vcpus[index].status) {
            .ready, .interrupted, .halted => true,
            .checkpoint => !pending,
            .exited, .crashed => false,
        };
    }

    /// Runs every runnable vCPU until all stop. `timeout_ns == 0`: no deadline.
    /// One caller operation: interrupt() calls from now on stop it.
    pub fn run(vm: *Vm, timeout_ns: u64) errors.Error!RunOutcome {
        vm.beginOperation();
        return vm.runStep(timeout_ns);
    }

    /// Notes where interrupt() requests stand when a caller's operation (a
    /// run, a whole reset loop) begins; later ones stop it (see `interrupts`).
    pub fn beginOperation(vm: *Vm) void {
        if (!vm.op_pinned) vm.interrupts_seen = vm.interrupts.load(.seq_cst);
        vm.signals_seen = signals.caughtCount();
    }

    /// interrupt() calls so far: a caller notes it when its operation begins
    /// (before it waits for the VM, or for its turn) and passes it to
    /// pinOperation.
    pub fn interruptCount(vm: *const Vm) u64 {
        return vm.interrupts.load(.seq_cst);
    }

    /// Until unpinOperation(), the runs and loops on this VM are one
    /// operation that began when interruptCount() was `since`: an interrupt()
    /// after that stops them, even one that came before this call or between
    /// two of them. Signals are still noted per run or loop (a caller whose
    /// signal handler returned runs again). One caller at a time.
    pub fn pinOperation(vm: *Vm, since: u64) void {
        std.debug.assert(!vm.running.load(.acquire));
        vm.interrupts_seen = @min(since, vm.interrupts.load(.seq_cst));
        vm.op_pinned = true;
    }

    pub fn unpinOperation(vm: *Vm) void {
        vm.op_pinned = false;
    }

    /// Whether the caller's operation must end: the VM is closing, or
    /// interrupt() was called since the operation began.
    pub fn stopRequested(vm: *const Vm) bool {
        return vm.closing.load(.seq_cst) or vm.interrupts.load(.seq_cst) != vm.interrupts_seen;
    }

    /// interrupt(): stops the operation in progress (no-op when idle).
    pub fn interrupt(vm: *Vm) void {
        _ = vm.interrupts.fetchAdd(1, .seq_cst);
        if (vm.running.load(.seq_cst)) vm.kickAll();
    }

    /// close() begins: from now on no run starts and one in progress stops
    /// at its next exit to the host. Irreversible (see `closing`).
    pub fn beginClose(vm: *Vm) void {
        vm.closing.store(true, .seq_cst);
        if (vm.running.load(.seq_cst)) vm.kickAll();
    }

    fn closedError() errors.Error {
        return errors.fail(.vm_closed, "the VM is being closed", .{});
    }

    /// One run inside an operation begun with beginOperation().
    pub fn runStep(vm: *Vm, timeout_ns: u64) errors.Error!RunOutcome {
        if (!vm.booted) return errors.fail(.vm_no_guest, "the VM has no guest: boot or restore one first", .{});
        if (vm.running.swap(true, .seq_cst)) return errors.fail(.vm_running, "the VM is already running in another thread", .{});
        defer vm.running.store(false, .release);
        // After `running` is set: a beginClose() from now on kicks or is seen
        // by the vCPU loops; one before is seen here.
        if (vm.closing.load(.seq_cst)) return closedError();
        if (vm.crash_len > 0) return vm.crashOrTruncated();

        const start = monotonicNs();
        vm.deadline_ns = if (timeout_ns == 0) 0 else start +| timeout_ns;
        vm.stop.store(false, .release);
        vm.signalled.store(false, .release);
        const guard = ForeignSignals.block();
        defer guard.unblock(); // a signal that came meanwhile is handled here

        var run_mask: [boot.max_vcpus]bool = @splat(false);
        for (0..vm.vcpu_count) |k| run_mask[k] = vm.resumes(@intCast(k));
        var threads: [boot.max_vcpus]?std.Thread = @splat(null);
        var spawn_failed = false;
        var i: u32 = 1;
        while (i < vm.vcpu_count) : (i += 1) {
            if (!run_mask[i]) continue;
            threads[i] = std.Thread.spawn(.{ .stack_size = 256 * 1024, .allocator = allocator }, vcpuLoop, .{ vm, i, guard.outer }) catch {
                spawn_failed = true;
                vm.kickAll();
                break;
            };
        }
        if (!spawn_failed and run_mask[0]) vcpuLoop(vm, 0, guard.outer);
        for (&threads) |*t| if (t.*) |th| th.join();
        const elapsed = monotonicNs() - start;
        if (spawn_failed) return errors.fail(.thread_spawn, "cannot start a host thread for a vCPU", .{});
        if (vm.crash_len > 0) return vm.crashOrTruncated();
        // A host read of file-backed guest memory (e.g. a console write) hit
        // a page lost to truncation and got zeros from the SIGBUS handler.
        if (vm.mem_damaged.load(.acquire)) return safe.truncated();
        return vm.outcome(elapsed);
    }

    fn outcome(vm: *Vm, elapsed: u64) errors.Error!RunOutcome {
        var out = RunOutcome{ .reason = .exit, .exit_code = vm.vcpus[0].exit_code, .checkpoint_tag = 0, .elapsed_ns = elapsed };
        var interrupted = false;
        var all_interrupted_halted = true;
        var checkpoint = false;
        var halted = false;
        for (vm.vcpus[0..vm.vcpu_count]) |*v| switch (v.status) {
            .interrupted => {
                interrupted = true;
                const mp = v.fd.getMpState() catch 0;
                if (mp != kvm.MP_STATE_HALTED) all_interrupted_halted = false;
            },
            .checkpoint => if (!checkpoint) {
                checkpoint = true;
                out.checkpoint_tag = v.checkpoint_tag;
            },
            .halted => halted = true,
            else => {},
        };
        if (vm.signalled.load(.acquire)) {
            out.reason = .interrupted;
        } else if (interrupted) {
            out.reason = if (all_interrupted_halted) .halt else .timeout;
        } else if (checkpoint) {
            out.reason = .checkpoint;
        } else if (halted) {
            out.reason = .halt;
        }
        return out;
    }

    fn crashError(vm: *Vm) errors.Error {
        return errors.fail(vm.crash_check, "{s}", .{vm.crash_msg[0..vm.crash_len]});
    }

    /// A crash of a map-restored VM whose file lost pages (truncated under
    /// the mapping) is reported as that (SnapshotError), not as the triple
    /// fault or EFAULT it shows up as: a page the guest touched (its page
    /// tables, its stack) may have read as zeros or not at all.
    fn crashOrTruncated(vm: *Vm) errors.Error {
        if (vm.mem_damaged.load(.acquire) or vm.mappedFileTruncated()) return @import("safe.zig").truncated();
        return vm.crashError();
    }

    /// Stops every vCPU thread at its next exit (or now, if in KVM_RUN).
    pub fn kickAll(vm: *Vm) void {
        vm.stop.store(true, .seq_cst);
        _ = std.c.pthread_mutex_lock(&vm.lock);
        defer _ = std.c.pthread_mutex_unlock(&vm.lock);
        const self_tid = linux.gettid();
        for (vm.vcpus[0..vm.vcpu_count]) |*v| {
            const tid = v.tid.load(.seq_cst);
            if (tid != 0 and tid != self_tid) signals.kick(tid);
        }
    }

    /// `outer`: the caller's signal mask, which KVM installs for KVM_RUN.
    fn vcpuLoop(vm: *Vm, index: u32, outer: linux.sigset_t) void {
        const v = &vm.vcpus[index];
        const r = v.run.?;
        if (!setKvmSigmask(v, outer)) ForeignSignals.unblockHere(outer);
        signals.current_run = r;
        signals.kicked = false;
        // seq_cst with the flag loads below and the stores in kickAll (and
        // the stop handler's): either this loop sees a stop flag or the
        // kicker sees this tid (never neither).
        v.tid.store(linux.gettid(), .seq_cst);
        const kick_slot = signals.enterRun();
        defer signals.leaveRun(kick_slot);
        var timer: ?i32 = null;
        if (vm.deadline_ns != 0) timer = armTimer(vm.deadline_ns);
        defer {
            if (timer) |t| _ = linux.syscall1(.timer_delete, @as(usize, @intCast(t)));
            _ = std.c.pthread_mutex_lock(&vm.lock);
            v.tid.store(0, .release);
            _ = std.c.pthread_mutex_unlock(&vm.lock);
            signals.current_run = null;
            r.immediate_exit = 0;
        }
        // A deadline that could not be armed is still honoured between exits.
        while (true) {
            // On entry and after every exit to the host.
            if (vm.stop.load(.seq_cst) or vm.stopRequested()) {
                v.status = .interrupted;
                return;
            }
            // Ctrl-C whose handler ran on another thread (signals.zig).
            if (signals.caughtSince(vm.signals_seen)) return vm.stopForSignal(v);
            switch (v.fd.run()) {
                .SUCCESS => {},
                .INTR, .AGAIN => {
                    r.immediate_exit = 0;
                    const ours = signals.kicked;
                    signals.kicked = false;
                    // A foreign signal (SIGINT...) landed here.
                    if (!ours and !vm.stop.load(.seq_cst) and !vm.stopRequested()) return vm.stopForSignal(v);
                    if (vm.deadline_ns != 0 and monotonicNs() >= vm.deadline_ns) {
                        v.status = .interrupted;
                        return;
                    }
                    continue;
                },
                .FAULT => return vm.crash(index, .run_efault, "KVM_RUN failed: guest memory could not be accessed (EFAULT); if the VM was restored with strategy 'map', its snapshot file was probably truncated or replaced while mapped", .{}),
                else => |e| return vm.crash(index, .run_failed, "KVM_RUN failed: E{s}", .{@tagName(e)}),
            }
            switch (r.exit_reason) {
                kvm.EXIT_IO => if (!vm.handleIo(index, r)) return,
                kvm.EXIT_HLT => {
                    v.status = .halted;
                    return;
                },
                kvm.EXIT_INTR => continue,
                kvm.EXIT_SHUTDOWN => return vm.crash(index, .triple_fault, "guest shut down (triple fault: an exception with no usable IDT, KVM_EXIT_SHUTDOWN)", .{}),
                kvm.EXIT_INTERNAL_ERROR => return vm.crash(index, .emulation_failed, "KVM internal error, suberror {d} (KVM could not emulate a guest instruction)", .{r.exit.internal.suberror}),
                kvm.EXIT_FAIL_ENTRY => return vm.crash(index, .entry_failed, "VM entry failed, hardware reason 0x{x}", .{r.exit.fail_entry.hardware_entry_failure_reason}),
                kvm.EXIT_MMIO => return vm.crash(index, .mmio_outside, "guest {s} {d} bytes at 0x{x}, outside its {d} MiB of memory (MMIO exit)", .{
                    if (r.exit.mmio.is_write != 0) "wrote" else "read", r.exit.mmio.len, r.exit.mmio.phys_addr, vm.mem.len >> 20,
                }),
                else => |reason| return vm.crash(index, .unexpected_exit, "unexpected KVM exit reason {d}", .{reason}),
            }
        }
    }

    /// A signal stops every vCPU so the caller can handle it (reason
    /// `interrupted`); the next run() resumes.
    fn stopForSignal(vm: *Vm, v: *Vcpu) void {
        v.status = .interrupted;
        vm.signalled.store(true, .release);
        vm.kickAll();
    }

    /// Gives KVM the mask to install while this vCPU is in KVM_RUN (only
    /// when it changed). False if KVM refused: then foreign signals must not
    /// stay blocked on this thread (KVM_RUN would never see them).
    fn setKvmSigmask(v: *Vcpu, outer: linux.sigset_t) bool {
        if (v.kvm_sigmask) |m| if (std.meta.eql(m, outer)) return true;
        v.fd.setSignalMask(outer) catch return false;
        v.kvm_sigmask = outer;
        return true;
    }

    /// Serves one port I/O exit. Returns false when the vCPU must stop.
    fn handleIo(vm: *Vm, index: u32, r: *kvm.Run) bool {
        const v = &vm.vcpus[index];
        const io = r.exit.io;
        const len = @as(u64, io.size) * io.count;
        if (io.data_offset > vm.run_bytes or vm.run_bytes - io.data_offset < len) {
            vm.crash(index, .io_data_outside, "KVM reported port I/O data outside kvm_run", .{});
            return false;
        }
        const data = @as([*]u8, @ptrCast(r))[@intCast(io.data_offset)..][0..@intCast(len)];
        if (io.direction == kvm.EXIT_IO_IN) {
            switch (io.port) {
                port_console_putc, port_exit, port_checkpoint, port_console_write => @memset(data, 0),
                port_identity_lo, port_identity_hi => {
                    const id = vm.identity.load(.acquire);
                    var word: [4]u8 = undefined;
                    std.mem.writeInt(u32, &word, @truncate(if (io.port == port_identity_lo) id else id >> 32), .little);
                    const size: usize = io.size; // 1, 2 or 4 from KVM
                    if (size == 0 or size > 4) {
                        vm.crash(index, .port_read_size, "KVM reported a {d}-byte port read", .{size});
                        return false;
                    }
                    var k: usize = 0;
                    while (k < data.len) : (k += size) @memcpy(data[k..][0..size], word[0..size]);
                },
                else => {
                    vm.crash(index, .unknown_port_read, "guest read unknown I/O port 0x{x} ({d} bytes); kvmlab serves ports 0xe9, 0x500-0x504", .{ io.port, io.size });
                    return false;
                },
            }
            return true;
        }
        const value: u32 = switch (io.size) {
            1 => data[0],
            2 => std.mem.readInt(u16, data[0..2], .little),
            else => std.mem.readInt(u32, data[0..4], .little),
        };
        switch (io.port) {
            port_console_putc => vm.consoleAppend(data),
            port_exit => {
                v.exit_code = value;
                v.status = .exited;
                return false;
            },
            port_checkpoint => {
                v.checkpoint_tag = value;
                v.status = .checkpoint;
                return false;
            },
            port_console_write => {
                const desc = vm.guestSlice(value, 16) catch {
                    vm.crash(index, .console_descriptor, "console write descriptor at 0x{x} is outside guest memory", .{value});
                    return false;
                };
                const addr = std.mem.readInt(u64, desc[0..8], .little);
                const n = std.mem.readInt(u64, desc[8..16], .little);
                const bytes = if (n > console_write_max_bytes) null else (vm.guestSlice(addr, n) catch null);
                if (bytes) |b| vm.consoleAppend(b) else {
                    vm.crash(index, .console_write, "console write of {d} bytes at 0x{x} is outside guest memory or over {d} bytes", .{ n, addr, console_write_max_bytes });
                    return false;
                }
            },
            else => {
                vm.crash(index, .unknown_port_write, "guest wrote 0x{x} to unknown I/O port 0x{x} ({d} bytes); kvmlab serves ports 0xe9, 0x500-0x502", .{ value, io.port, io.size });
                return false;
            },
        }
        return true;
    }

    /// A bounds-checked view of guest memory.
    pub fn guestSlice(vm: *Vm, gpa: u64, len: u64) errors.Error![]u8 {
        if (gpa > vm.mem.len or vm.mem.len - gpa < len)
            return errors.fail(.gpa_out_of_range, "guest range 0x{x}+{d} is outside guest memory (0x0..0x{x})", .{ gpa, len, vm.mem.len });
        return vm.mem[@intCast(gpa)..][0..@intCast(len)];
    }

    pub fn consoleAppend(vm: *Vm, bytes: []const u8) void {
        _ = std.c.pthread_mutex_lock(&vm.lock);
        defer _ = std.c.pthread_mutex_unlock(&vm.lock);
        if (vm.console.len == 0) {
            vm.console = allocator.alloc(u8, console_capacity_bytes) catch {
                vm.console_dropped += bytes.len;
                return;
            };
        }
        const room = vm.console.len - vm.console_len;
        const n = @min(room, bytes.len);
        @memcpy(vm.console[vm.console_len..][0..n], bytes[0..n]);
        vm.console_len += n;
        vm.console_dropped += bytes.len - n;
    }

    /// Copies up to `out.len` console bytes out and removes them.
    pub fn consoleTake(vm: *Vm, out: []u8) usize {
        _ = std.c.pthread_mutex_lock(&vm.lock);
        defer _ = std.c.pthread_mutex_unlock(&vm.lock);
        const n = @min(out.len, vm.console_len);
        @memcpy(out[0..n], vm.console[0..n]);
        std.mem.copyForwards(u8, vm.console[0 .. vm.console_len - n], vm.console[n..vm.console_len]);
        vm.console_len -= n;
        if (vm.console_len == 0) vm.console_dropped = 0;
        return n;
    }

    /// Marks a vCPU crashed, records the first crash message with the vCPU's
    /// registers, and stops the other vCPUs.
    fn crash(vm: *Vm, index: u32, check: errors.Check, comptime fmt: []const u8, args: anytype) void {
        const v = &vm.vcpus[index];
        v.status = .crashed;
        var regs: kvm.Regs = .{};
        var sregs: kvm.Sregs = .{};
        const have_regs = if (v.fd.getRegs(&regs)) |_| true else |_| false;
        v.fd.getSregs(&sregs) catch {};
        _ = std.c.pthread_mutex_lock(&vm.lock);
        if (vm.crash_len == 0) {
            vm.crash_check = check;
            var w = std.Io.Writer.fixed(&vm.crash_msg);
            w.print(fmt, args) catch {};
            w.print(" on vCPU {d}", .{index}) catch {};
            if (have_regs) w.print(
                "; rip=0x{x} rsp=0x{x} rflags=0x{x} rax=0x{x} rbx=0x{x} rcx=0x{x} rdx=0x{x} rsi=0x{x} rdi=0x{x} cs=0x{x} cpl={d} cr0=0x{x} cr2=0x{x} cr3=0x{x} cr4=0x{x} efer=0x{x}",
                .{ regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, sregs.cs.selector, sregs.cs.dpl, sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer },
            ) catch {};
            // Hints for the common causes of a triple fault.
            if (have_regs and sregs.cr2 >= vm.mem.len)
                w.print(" (hint: the last page fault, cr2=0x{x}, is outside the {d} MiB of guest memory)", .{ sregs.cr2, vm.mem.len >> 20 }) catch {};
            if (vm.mappedFileTruncated())
                w.print(" (hint: the snapshot file mapped as this VM's memory was truncated or replaced)", .{}) catch {};
            vm.crash_len = w.end;
        }
        _ = std.c.pthread_mutex_unlock(&vm.lock);
        vm.kickAll();
    }

    /// After an I/O exit, KVM finishes the instruction (advances RIP) only on
    /// the next KVM_RUN. Entering once with immediate_exit set completes it
    /// without running guest code, so captured registers are consistent.
    pub fn completePendingIo(vm: *Vm) errors.Error!void {
        for (vm.vcpus[0..vm.vcpu_count]) |*v| {
            const r = v.run.?;
            r.immediate_exit = 1;
            const rc = v.fd.run();
            r.immediate_exit = 0;
            switch (rc) {
                .INTR, .AGAIN, .SUCCESS => {},
                else => |e| return errors.fail(.pending_io, "completing pending I/O failed: E{s}", .{@tagName(e)}),
            }
        }
    }

    /// For map-restored VMs: whether the file behind guest memory is now
    /// shorter than the mapping (pages past its end cannot be read).
    pub fn mappedFileTruncated(vm: *Vm) bool {
        const b = vm.backing orelse return false;
        var st: linux.Statx = undefined;
        if (linux.errno(linux.statx(b.fd, "", linux.AT.EMPTY_PATH, .{ .SIZE = true }, &st)) != .SUCCESS) return false;
        return st.size < b.offset + vm.mem.len;
    }

    /// Guest memory is a private mapping of a file (see mapFile).
    pub fn mapped(vm: *const Vm) bool {
        return vm.backing != null;
    }

    /// How host copies of guest memory stay safe (safe.copyGuarded): null for
    /// anonymous memory; for a mapped snapshot file, fast while kvmlab's
    /// SIGBUS handler covers the mapping.
    pub fn memoryGuard(vm: *const Vm) ?safe.Guard {
        if (!vm.mapped()) return null;
        return safe.Guard.init(&vm.mem_damaged, vm.sigbus_slot != null);
    }

    /// Maps `fd` at `offset` copy-on-write over all of guest memory: O(1) in
    /// memory size (KVM's MMU notifier drops stale translations of the old
    /// pages). `fd` must stay open while the shell lives.
    pub fn mapFile(vm: *Vm, fd: linux.fd_t, offset: u64) errors.Error!void {
        const fresh = if (vm.backing) |b| b.fd == fd and b.offset == offset and !vm.booted else false; // Options.file
        const addr = if (fresh) @intFromPtr(vm.mem.ptr) else linux.mmap(vm.mem.ptr, vm.mem.len, .{ .READ = true, .WRITE = true }, .{ .TYPE = .PRIVATE, .FIXED = true, .NORESERVE = true }, fd, @intCast(offset));
        if (linux.errno(addr) != .SUCCESS) return errors.fail(.snapshot_mapping, "mapping the snapshot over guest memory failed: E{s}", .{@tagName(linux.errno(addr))});
        vm.backing = .{ .fd = fd, .offset = offset };
        if (vm.sigbus_slot == null) vm.sigbus_slot = sigbus.register(@intFromPtr(vm.mem.ptr), vm.mem.len, &vm.mem_damaged) orelse return sigbus.unprotected(); // an uncovered mapping would let a truncation kill the process
    }

    /// Discards the private copies of `pages` pages from page `first` on
    /// (MADV_DONTNEED): a mapped file's pages show through again.
    pub fn dropPages(vm: *Vm, first: u64, pages: u64) void {
        if (pages == 0) return;
        _ = linux.madvise(vm.mem[@intCast(first * boot.page_bytes)..].ptr, @intCast(pages * boot.page_bytes), linux.MADV.DONTNEED);
    }

    /// Words of a dirty-page bitmap of this VM's memory (one bit per page).
    pub fn dirtyWords(vm: *const Vm) usize {
        return dirtyWordsFor(vm.mem.len);
    }
    pub fn dirtyWordsFor(memory_bytes: u64) usize {
        return @intCast((memory_bytes / boot.page_bytes + 63) / 64);
    }

    /// Reads KVM's dirty log into `bitmap` (and clears it, but for manual protect).
    pub fn readDirtyLog(vm: *Vm, bitmap: []u64) errors.Error!void {
        std.debug.assert(bitmap.len == vm.dirtyWords());
        @memset(bitmap, 0);
        vm.vm_fd.getDirtyLog(&.{ .slot = 0, .bitmap = @intFromPtr(bitmap.ptr) }) catch return errors.ioctlFailed("KVM_GET_DIRTY_LOG");
    }

    /// From now on the caller clears the dirty log page by page. Idempotent.
    pub fn enableManualProtect(vm: *Vm) errors.Error!void {
        if (vm.manual_protect) return;
        vm.vm_fd.enableCap(&.{ .cap = kvm.CAP_MANUAL_DIRTY_LOG_PROTECT2, .args = .{ kvm.MANUAL_PROTECT_ENABLE, 0, 0, 0 } }) catch return errors.ioctlFailed("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
        vm.manual_protect = true;
    }

    /// Manual protect: clears (write-protects) the pages set in `bitmap`.
    pub fn clearDirtyLog(vm: *Vm, bitmap: []const u64) errors.Error!void {
        std.debug.assert(vm.manual_protect and bitmap.len == vm.dirtyWords());
        const pages: u32 = @intCast(vm.mem.len / boot.page_bytes);
        vm.vm_fd.clearDirtyLog(&.{ .slot = 0, .num_pages = pages, .first_page = 0, .bitmap = @intFromPtr(bitmap.ptr) }) catch return errors.ioctlFailed("KVM_CLEAR_DIRTY_LOG");
    }

    pub fn getRegs(vm: *Vm, index: u32, regs: *kvm.Regs, sregs: *kvm.Sregs) errors.Error!void {
        if (index >= vm.vcpu_count) return errors.fail(.vcpu_index, "vCPU {d} does not exist (the VM has {d})", .{ index, vm.vcpu_count });
        if (vm.running.load(.acquire)) return errors.fail(.vm_running, "the VM is running", .{});
        const fd = vm.vcpus[index].fd;
        fd.getRegs(regs) catch return errors.ioctlFailed("KVM_GET_REGS");
        fd.getSregs(sregs) catch return errors.ioctlFailed("KVM_GET_SREGS");
    }
};

pub fn monotonicNs() u64 {
    return clockNs(.MONOTONIC);
}

/// A clock in nanoseconds, read through libc: its vDSO lookup works in a
/// shared library, where std.os.linux's needs the auxv that only Zig's own
/// start code records, so it fell back to a syscall (~0.25 us on kvm_pvm,
/// three per prepared take).
pub fn clockNs(clock: std.c.clockid_t) u64 {
    var ts: std.c.timespec = undefined;
    const rc = std.c.clock_gettime(clock, &ts);
    std.debug.assert(rc == 0); // MONOTONIC and REALTIME always exist
    return @as(u64, @intCast(ts.sec)) * std.time.ns_per_s + @as(u64, @intCast(ts.nsec));
}

const SigEvent = extern struct {
    value: usize = 0,
    signo: i32,
    notify: i32,
    tid: i32,
    pad: [11]i32 = @splat(0),
};
const SIGEV_THREAD_ID: i32 = 4;
const TIMER_ABSTIME: usize = 1;

/// A one-shot CLOCK_MONOTONIC timer that sends the kick to this thread at
/// `deadline_ns`. Null if the kernel refuses (the loop still checks the deadline).
fn armTimer(deadline_ns: u64) ?i32 {
    var sev = SigEvent{ .signo = signals.kick_signal, .notify = SIGEV_THREAD_ID, .tid = linux.gettid() };
    var id: i32 = 0;
    const rc = linux.syscall3(.timer_create, @intFromEnum(linux.CLOCK.MONOTONIC), @intFromPtr(&sev), @intFromPtr(&id));
    if (linux.errno(rc) != .SUCCESS) return null;
    const spec = linux.itimerspec{
        .it_interval = .{ .sec = 0, .nsec = 0 },
        .it_value = .{ .sec = @intCast(deadline_ns / std.time.ns_per_s), .nsec = @intCast(deadline_ns % std.time.ns_per_s) },
    };
    _ = linux.syscall4(.timer_settime, @as(usize, @intCast(id)), TIMER_ABSTIME, @intFromPtr(&spec), 0);
    return id;
}

test "an operation pinned where the caller began stops for every interrupt() after that, across its runs" {
    var vm: Vm = .{};
    vm.interrupt(); // idle: kept by no one
    vm.beginOperation();
    try std.testing.expect(!vm.stopRequested());
    const since = vm.interruptCount(); // the caller begins...
    vm.interrupt(); // ...and is interrupted before its first run
    vm.pinOperation(since);
    vm.beginOperation(); // its first run
    try std.testing.expect(vm.stopRequested());
    vm.beginOperation(); // a second run (a retry after a signal) keeps it
    try std.testing.expect(vm.stopRequested());
    vm.unpinOperation();
    vm.beginOperation(); // a later, unrelated run is not stopped
    try std.testing.expect(!vm.stopRequested());
    vm.pinOperation(vm.interruptCount() + 5); // a count from the future is clamped
    try std.testing.expect(!vm.stopRequested());
}
