//! RestorePool: empty VM shells kept warm so a snapshot restores without
//! paying for VM, memory slot, irqchip and vCPU creation on the caller's path.
//!
//! What it fixes in the reference (mimobox-vm's RestorePool): a refill thread
//! keeps idle shells at `min_size` after takes *and* releases (bursts do not
//! drain the pool), reaper threads destroy released VMs off the caller's path
//! (~11 ms each on kvm_pvm; past a backlog of 64 the releasing caller
//! helps), records per-phase timings of every restore in a bounded ring, caps VMs in use (`max_in_use`), and checks a snapshot's shape against
//! the pool's before touching a shell.
//!
//! Invariants (asserted under the lock): idle + creating <= max_size;
//! in_use <= max_in_use when that is set; created - destroyed = idle + in_use
//! + dead + creating-completed-but-not-yet-pushed (checked as
//! created - destroyed == idle + in_use_shells + dead).
const std = @import("std");
const linux = std.os.linux;
const errors = @import("errors.zig");
const boot = @import("boot.zig");
const state = @import("state.zig");
const snapshot = @import("snapshot.zig");
const shell = @import("shell.zig");
const restore_mod = @import("restore.zig");
const machine = @import("machine.zig");
const prepared = @import("prepared.zig");
const fit = @import("fit.zig");

const allocator = std.heap.c_allocator;
const c = std.c;

pub const max_pool_size: u32 = 256;
/// Destroying a VM is mostly a wait in the kernel (~11 ms with an irqchip on
/// kvm_pvm), so several reapers overlap those waits.
pub const reaper_count = 4;
/// Beyond this many queued destroys, release() destroys in the caller:
/// bounded memory and descriptors instead of an unbounded backlog.
pub const max_dead_backlog: usize = 64;
pub const timing_capacity: usize = 4096;
/// The pool's threads need little stack. The test runner's static TLS is
/// large (fuzzing buffers) and glibc carves TLS out of the stack, so tests
/// give them more.
pub const thread_stack_bytes: usize = if (@import("builtin").is_test) 16 << 20 else 256 * 1024;

/// The C ABI's kvmlab_pool_config (aliased in capi): one record, no copy.
pub const Config = extern struct {
    memory_bytes: u64,
    vcpus: u32,
    min_size: u32,
    max_size: u32,
    /// 0 = unlimited.
    max_in_use: u32,
};

pub const Timing = extern struct {
    seq: u64,
    acquire_ns: u64,
    memory_ns: u64,
    vcpu_ns: u64,
    devices_ns: u64,
    total_ns: u64,
    /// 0 until the VM's first run() reports it.
    first_run_ns: u64,
    memory_bytes: u64,
    hit: u32,
    strategy: restore_mod.Strategy,
};

pub const Stats = extern struct {
    idle: u32,
    in_use: u32,
    max_size: u32,
    min_size: u32,
    max_in_use: u32,
    creating: u32,
    created: u64,
    destroyed: u64,
    hits: u64,
    misses: u64,
    failures: u64,
    restores: u64,
    releases: u64,
    pending_destroy: u64,
    /// Released VMs kept (reset) for reuse with the same snapshot.
    parked: u64,
    /// Restores served by a parked VM (no shell, no restore: a reset).
    reuses: u64,
    resets: u64,
    /// Parked VMs of snapshots with a prepare() target, ready to be taken.
    prepared: u64,
};

pub const max_targets = prepared.max_targets;
pub const Target = prepared.Target;

/// The pool of machines kvmlab uses.
pub const Pool = PoolOf(machine.Factory);

/// A pool over the items `F` makes: `F.Item`, `F.Source` (with strategy()),
/// create, destroy, restoreInto, resetForReuse, reopen, resetsTo, resettable,
/// prepareInto (restore from a snapshot, resettable), retainSnap/releaseSnap,
/// setIdentity.
/// Generic so the accounting is tested without KVM (see the tests).
pub fn PoolOf(comptime F: type) type {
    return struct {
        const Self = @This();
        pub const Factory = F;
        pub const deadlineIn = realtimeIn;
        const Vm = F.Item;

        cfg: Config,
        lock: c.pthread_mutex_t = .{},
        /// Wakes the refill thread (a shell was taken, or closing). Separate from
        /// `reap` so that a take wakes one thread, not all five: waking every
        /// thread right after a restore made them compete with the caller.
        refill_cv: c.pthread_cond_t = .{},
        /// Wakes one reaper per queued VM (or all, when closing).
        reap_cv: c.pthread_cond_t = .{},
        /// Wakes restores waiting for max_in_use room, and close() waiting for the worker.
        room: c.pthread_cond_t = .{},
        idle: [max_pool_size]*Vm = undefined,
        idle_len: u32 = 0,
        creating: u32 = 0,
        in_use: u32 = 0,
        dead: std.ArrayList(*Vm) = .empty,
        /// Released with park-on-release: the worker resets them, then parks them.
        to_reset: std.ArrayList(*Vm) = .empty,
        /// Taken off `to_reset` by a reaper and being reset right now.
        resetting: [reaper_count]*Vm = undefined,
        resetting_len: u32 = 0,
        parked: [max_pool_size]*Vm = undefined,
        parked_len: u32 = 0,
        reuses: u64 = 0,
        resets: u64 = 0,
        /// In use and to be parked (reset and kept) on release: the pool's own
        /// record of reset_on_release restores.
        parking: std.AutoHashMapUnmanaged(*Vm, void) = .empty,
        /// prepare() targets; their VMs are parked (ready) or out.
        targets: [max_targets]Target = undefined,
        targets_len: u32 = 0,
        /// Wakes a caller's warmer (waitPrepareNeed) when an external target
        /// is short (a prepared VM was taken, or closing).
        need_cv: c.pthread_cond_t = .{},
        /// Taken off `dead` by the reaper and being destroyed right now.
        destroying: u32 = 0,
        /// Tests only (holdReapers): the reapers leave `dead` alone until
        /// released or closing, so a backlog can be built deterministically.
        reapers_held: bool = false,
        closed: bool = false,
        /// Set by close() once it drained every shell; from then on a release
        /// destroys its VM inline.
        worker_done: bool = false,
        /// Set by releaseHandle (the caller's kvmlab_pool_free). The pool is
        /// freed by whichever comes last, releaseHandle or the last release
        /// (both decide under the lock, so exactly one frees). Until then a
        /// closed pool answers every call (pool_closed, or no take), so a
        /// caller may call it without a guard of its own racing close().
        handle_released: bool = false,
        /// The id the next prepare() target gets (never reused: a stale id
        /// finds nothing, see takePrepared).
        next_target_id: u64 = 1,
        /// `refill` creates shells up to min_size (~0.5 ms each); the reapers
        /// destroy released VMs (~11 ms each on kvm_pvm, mostly a wait) and reset
        /// parked ones. Separate, so a destroy backlog never delays the refill.
        refill: ?std.Thread = null,
        reapers: [reaper_count]?std.Thread = @splat(null),
        created: u64 = 0,
        destroyed: u64 = 0,
        hits: u64 = 0,
        misses: u64 = 0,
        failures: u64 = 0,
        restores: u64 = 0,
        releases: u64 = 0,
        /// Consecutive background creation failures (the worker backs off).
        create_errors: u32 = 0,
        timings: [timing_capacity]Timing = undefined,
        timings_len: usize = 0,
        next_seq: u64 = 0,
        /// nextIdentity's state, seeded from getrandom at create.
        identity_state: u64 = 0,
        /// What the latest restore wanted of its shell (fit.zig): new shells get it.
        fit_hint: fit.Hint = .{},

        pub fn checkConfig(cfg: Config) errors.Error!void {
            try boot.checkConfig(cfg.memory_bytes, cfg.vcpus);
            if (cfg.max_size == 0) return errors.fail(.pool_max_size, "PoolConfig max_size must be at least 1", .{});
            if (cfg.max_size > max_pool_size) return errors.fail(.pool_max_size, "PoolConfig max_size {d} is over the limit of {d}", .{ cfg.max_size, max_pool_size });
            if (cfg.min_size > cfg.max_size) return errors.fail(.pool_min_size, "PoolConfig min_size {d} is larger than max_size {d}", .{ cfg.min_size, cfg.max_size });
        }

        /// Creates the pool, warms `min_size` shells (in the caller, so errors
        /// surface here), and starts the worker.
        pub fn create(cfg: Config) errors.Error!*Self {
            try checkConfig(cfg);
            const p = allocator.create(Self) catch return error.OutOfMemory;
            p.* = .{ .cfg = cfg };
            _ = linux.getrandom(@ptrCast(&p.identity_state), @sizeOf(u64), 0);
            p.warm(cfg.min_size) catch |e| {
                p.destroyAll();
                allocator.destroy(p);
                return e;
            };
            for (&p.reapers) |*r| {
                r.* = std.Thread.spawn(.{ .stack_size = thread_stack_bytes, .allocator = allocator }, reaperLoop, .{p}) catch null;
            }
            p.refill = std.Thread.spawn(.{ .stack_size = thread_stack_bytes, .allocator = allocator }, refillLoop, .{p}) catch null;
            if (p.refill == null or p.reapers[0] == null) {
                p.releaseHandle();
                return errors.fail(.thread_spawn, "cannot start the pool's threads", .{});
            }
            return p;
        }

        pub fn lockIt(p: *Self) void {
            _ = c.pthread_mutex_lock(&p.lock);
        }
        pub fn unlockIt(p: *Self) void {
            p.assertInvariants();
            _ = c.pthread_mutex_unlock(&p.lock);
        }

        fn assertInvariants(p: *Self) void {
            std.debug.assert(p.idle_len + p.creating <= p.cfg.max_size or p.closed);
            std.debug.assert(p.cfg.max_in_use == 0 or p.in_use <= p.cfg.max_in_use);
            std.debug.assert(p.destroyed <= p.created);
        }

        /// Fills to at least min(target, max_size) idle shells, creating them on
        /// this thread. Returns the first creation error.
        pub fn warm(p: *Self, target: u32) errors.Error!void {
            const goal = @min(target, p.cfg.max_size);
            const stop = fit.stopFor(p); // Ctrl-C ends a warm() between shells, and a shell's populate
            p.lockIt();
            while (!p.closed and !stop.signalled() and p.idle_len < goal and p.idle_len + p.creating < p.cfg.max_size) {
                const vm = p.createUnlocked(stop) catch |e| {
                    p.unlockIt();
                    return e;
                };
                p.pushIdle(vm);
            }
            p.unlockIt();
            if (p.isClosed()) return errors.fail(.pool_closed, "the pool is closed", .{});
        }

        /// With the lock held (released while the shell is made: creation
        /// takes milliseconds): one new shell fit to the latest restore (fit.zig;
        /// its populate stops at `stop`), counted in `creating` meanwhile and
        /// in `created` once made.
        fn createUnlocked(p: *Self, stop: fit.Stop(*Self)) errors.Error!*Vm {
            p.creating += 1;
            const hint = p.fit_hint.pageMapCopy();
            const dirty_log = p.fit_hint.dirty_log;
            p.unlockIt();
            const made = F.create(p.cfg.memory_bytes, p.cfg.vcpus, dirty_log);
            if (hint) |map| {
                if (made) |vm| F.populate(vm, map, stop) else |_| {}
                allocator.free(map);
            }
            p.lockIt();
            p.creating -= 1;
            const vm = try made;
            p.created += 1;
            return vm;
        }

        pub fn isClosed(p: *Self) bool {
            p.lockIt();
            defer p.unlockIt();
            return p.closed;
        }

        /// With the lock held: keep a fresh shell idle, or queue it for the worker.
        fn pushIdle(p: *Self, vm: *Vm) void {
            if (!p.closed and p.idle_len < p.cfg.max_size) {
                p.idle[p.idle_len] = vm;
                p.idle_len += 1;
            } else {
                p.queueDead(vm);
            }
        }

        pub fn queueDead(p: *Self, vm: *Vm) void {
            if (p.worker_done) {
                // Closed and the worker is gone: destroy here (rare: a restore
                // that failed after close()).
                F.destroy(vm);
                p.destroyed += 1;
                return;
            }
            p.dead.append(allocator, vm) catch {
                // No memory for the queue: destroy here rather than leak.
                F.destroy(vm);
                p.destroyed += 1;
                return;
            };
            _ = c.pthread_cond_signal(&p.reap_cv);
        }

        pub fn idleCount(p: *Self) u32 {
            p.lockIt();
            defer p.unlockIt();
            return p.idle_len;
        }

        /// Benchmarks only: takes an idle shell as a restore would, without
        /// restoring into it (so the floor can be measured into a shell of the
        /// same age as a pooled restore gets). The caller releases it.
        pub fn takeIdle(p: *Self) errors.Error!*Vm {
            p.lockIt();
            defer p.unlockIt();
            if (p.closed) return errors.fail(.pool_closed, "the pool is closed", .{});
            if (p.idle_len == 0) return errors.fail(.pool_no_idle, "the pool has no idle shell; warm it first", .{});
            if (p.cfg.max_in_use != 0 and p.in_use >= p.cfg.max_in_use)
                return errors.fail(.pool_exhausted, "{d} VMs are in use (max_in_use={d})", .{ p.in_use, p.cfg.max_in_use });
            p.idle_len -= 1;
            p.in_use += 1;
            // No refill signal here: as in restore(), a refill woken now would
            // compete with the measured work; the release (endUse) wakes it.
            return p.idle[p.idle_len];
        }

        /// Takes an idle shell (or creates one) and restores into it. On any
        /// failure the accounting is rolled back and the shell is discarded.
        pub fn restore(p: *Self, parsed: *const state.Parsed, src: F.Source, resettable: bool, wait_ns: u64, times: *restore_mod.Times, acquire_ns: *u64, hit_out: *bool, seq_out: *u64) errors.Error!*Vm {
            if (parsed.memory_bytes != p.cfg.memory_bytes or parsed.vcpus != p.cfg.vcpus)
                return errors.fail(.shape, "snapshot is {d} MiB with {d} vCPU(s); this pool's VmConfig is {d} MiB with {d} vCPU(s)", .{ parsed.memory_bytes >> 20, parsed.vcpus, p.cfg.memory_bytes >> 20, p.cfg.vcpus });
            const t0 = shell.monotonicNs();
            p.lockIt();
            if (p.cfg.max_in_use != 0 and p.in_use >= p.cfg.max_in_use) {
                if (wait_ns == 0) {
                    p.unlockIt();
                    return errors.fail(.pool_exhausted, "{d} VMs are in use (max_in_use={d}): release one, or pass timeout_s to wait", .{ p.in_use, p.cfg.max_in_use });
                }
                const deadline = t0 + wait_ns;
                while (!p.closed and p.in_use >= p.cfg.max_in_use) {
                    const now = shell.monotonicNs();
                    if (now >= deadline) {
                        p.unlockIt();
                        return errors.fail(.pool_wait_timeout, "no VM was released within the timeout (max_in_use={d})", .{p.cfg.max_in_use});
                    }
                    var ts = realtimeIn(deadline - now);
                    _ = c.pthread_cond_timedwait(&p.room, &p.lock, &ts);
                }
            }
            if (p.closed) {
                p.unlockIt();
                return errors.fail(.pool_closed, "the pool is closed", .{});
            }
            var vm: ?*Vm = null;
            if (p.idle_len > 0) {
                p.idle_len -= 1;
                vm = p.idle[p.idle_len];
                p.hits += 1;
            } else {
                p.misses += 1;
            }
            p.in_use += 1;
            p.unlockIt();
            // The refill is woken once this restore is done (below): waking it
            // now makes it compete for the CPU with the restore itself.

            const item = vm orelse (F.create(p.cfg.memory_bytes, p.cfg.vcpus, resettable) catch |e| {
                p.lockIt();
                p.failures += 1;
                p.endUse();
                return e;
            });
            if (vm == null) {
                p.lockIt();
                p.created += 1;
                p.unlockIt();
            }
            const t1 = shell.monotonicNs();
            F.restoreInto(item, parsed, src, times) catch |e| {
                p.lockIt();
                p.failures += 1;
                p.queueDead(item);
                p.endUse();
                return e;
            };
            const t2 = shell.monotonicNs();
            acquire_ns.* = t1 - t0;
            hit_out.* = vm != null;
            p.lockIt();
            p.restores += 1;
            p.fit_hint.learn(src, resettable);
            const seq = p.next_seq;
            p.next_seq += 1;
            p.timings[seq % timing_capacity] = .{
                .seq = seq,
                .acquire_ns = t1 - t0,
                .memory_ns = times.memory_ns,
                .vcpu_ns = times.vcpu_ns,
                .devices_ns = times.devices_ns,
                .total_ns = t2 - t0,
                .first_run_ns = 0,
                .memory_bytes = p.cfg.memory_bytes,
                .hit = @intFromBool(vm != null),
                .strategy = src.strategy(),
            };
            p.timings_len = @min(p.timings_len + 1, timing_capacity);
            p.wakeRefillIfLow(); // refill after a take
            p.unlockIt();
            seq_out.* = seq;
            return item;
        }

        /// Parks `vm` (reset and kept for reuse) when it is released.
        pub fn parkOnRelease(p: *Self, vm: *Vm) errors.Error!void {
            p.lockIt();
            defer p.unlockIt();
            p.parking.put(allocator, vm, {}) catch return error.OutOfMemory;
        }

        /// The total_ns of restore `seq` (0 once timing_capacity newer ones
        /// replaced its record): a take reads its own time here rather than
        /// timing itself again (a clock read is a syscall here: no vDSO, ~0.25 us).
        pub fn totalNsOf(p: *Self, seq: u64) u64 {
            p.lockIt();
            defer p.unlockIt();
            const t = &p.timings[seq % timing_capacity];
            return if (seq < p.next_seq and t.seq == seq) t.total_ns else 0;
        }

        pub fn noteFirstRun(p: *Self, seq: u64, ns: u64) void {
            p.lockIt();
            defer p.unlockIt();
            const t = &p.timings[seq % timing_capacity];
            if (seq < p.next_seq and t.seq == seq and t.first_run_ns == 0) t.first_run_ns = ns;
        }

        /// Copies up to out.len of the newest timing records, oldest first.
        pub fn copyTimings(p: *Self, out: []Timing) usize {
            p.lockIt();
            defer p.unlockIt();
            const n = @min(out.len, p.timings_len);
            var k: usize = 0;
            while (k < n) : (k += 1) {
                const seq = p.next_seq - n + k;
                out[k] = p.timings[seq % timing_capacity];
            }
            return n;
        }

        pub fn stats(p: *Self) Stats {
            p.lockIt();
            defer p.unlockIt();
            return .{
                .idle = p.idle_len,
                .in_use = p.in_use,
                .max_size = p.cfg.max_size,
                .min_size = p.cfg.min_size,
                .max_in_use = p.cfg.max_in_use,
                .creating = p.creating,
                .created = p.created,
                .destroyed = p.destroyed,
                .hits = p.hits,
                .misses = p.misses,
                .failures = p.failures,
                .restores = p.restores,
                .releases = p.releases,
                .pending_destroy = p.dead.items.len + p.destroying,
                .parked = p.parked_len,
                .reuses = p.reuses,
                .resets = p.resets,
                .prepared = blk: {
                    var n: u64 = 0;
                    for (p.targets[0..p.targets_len]) |*t| n += p.readyFor(t.snap);
                    break :blk n;
                },
            };
        }

        /// Returns a VM to the pool's accounting; it is destroyed off this thread
        /// (or here, once the pool is closed). After close, the last release
        /// frees the pool itself.
        pub fn release(p: *Self, vm: *Vm) void {
            p.lockIt();
            p.releases += 1;
            // Parked on release: reset_on_release VMs, and every VM of a
            // prepared snapshot (it stays prepared).
            const park = p.parking.remove(vm) or p.targetOf(vm) != null;
            if (park and F.resettable(vm) and !p.closed and !p.worker_done) {
                p.to_reset.append(allocator, vm) catch {
                    p.queueDead(vm);
                    p.endUse();
                    return;
                };
                _ = c.pthread_cond_signal(&p.reap_cv);
            } else if (p.dead.items.len >= max_dead_backlog and !p.worker_done) {
                // Backpressure: the reapers are behind; this caller pays.
                p.destroyLocked(vm);
            } else {
                p.queueDead(vm);
            }
            p.endUse();
        }

        /// Takes a parked VM of `snap` (one call, one lock): a prepared one when
        /// `snap` has a prepare() target (timing strategy prepared), else, with
        /// `park`, one parked by an earlier reset_on_release (strategy reuse).
        /// Null when there is none ready: the caller restores into a shell.
        /// `took`: the strategy of the take (prepared or reuse).
        pub fn reuse(p: *Self, snap: *const snapshot.Snapshot, park: bool, seq_out: *u64, took: *restore_mod.Strategy) ?*Vm {
            p.lockIt();
            const target = p.findTarget(snap);
            if (target == null and !park) {
                p.unlockIt();
                return null;
            }
            return p.takeParkedUnlock(snap, target, seq_out, took);
        }

        /// The hot path of a prepared restore: a ready VM of the target with
        /// this id (prepared.targetId), or null (none ready, no such target
        /// any more, closed, at max_in_use: the caller falls back to reuse and
        /// a restore). An id never names another target, and the target holds
        /// its snapshot, so the caller needs no hold on the snapshot.
        pub fn takePrepared(p: *Self, target_id: u64, seq_out: *u64) ?*Vm {
            p.lockIt();
            const t = p.findTargetId(target_id) orelse {
                p.unlockIt();
                return null;
            };
            var took: restore_mod.Strategy = undefined;
            return p.takeParkedUnlock(t.snap, t, seq_out, &took);
        }

        /// Called with the lock held, returns with it released: takes a parked
        /// VM of `snap` for `target` (null: a reset_on_release reuse), records
        /// the take, and wakes the target's preparer after unlocking. Its
        /// acquire_ns is the take under the lock: the clock is read only once a
        /// VM is there.
        fn takeParkedUnlock(p: *Self, snap: *const snapshot.Snapshot, target: ?*prepared.Target, seq_out: *u64, took: *restore_mod.Strategy) ?*Vm {
            const vm = p.takeParkedLocked(snap, target, seq_out, took);
            const wake = if (vm != null and target != null) p.preparerToWake(target.?) else null;
            p.unlockIt();
            if (wake) |cv| _ = c.pthread_cond_signal(cv);
            return vm;
        }

        fn takeParkedLocked(p: *Self, snap: *const snapshot.Snapshot, target: ?*prepared.Target, seq_out: *u64, took: *restore_mod.Strategy) ?*Vm {
            if (p.closed or (p.cfg.max_in_use != 0 and p.in_use >= p.cfg.max_in_use)) return null;
            const i = p.findParked(snap) orelse return null;
            const t0 = shell.monotonicNs();
            const vm = p.parked[i];
            p.parked_len -= 1;
            p.parked[i] = p.parked[p.parked_len];
            F.reopen(vm);
            // A prepared VM goes back by its target; a reused one by parking.
            if (target == null) p.parking.put(allocator, vm, {}) catch {}; // no room: destroyed at release instead
            p.in_use += 1;
            p.reuses += 1;
            p.restores += 1;
            const seq = p.next_seq;
            p.next_seq += 1;
            const dt = shell.monotonicNs() - t0;
            p.timings[seq % timing_capacity] = .{
                .seq = seq,
                .acquire_ns = dt,
                .memory_ns = 0,
                .vcpu_ns = 0,
                .devices_ns = 0,
                .total_ns = dt,
                .first_run_ns = 0,
                .memory_bytes = p.cfg.memory_bytes,
                .hit = 1,
                .strategy = if (target != null) .prepared else .reuse,
            };
            took.* = p.timings[seq % timing_capacity].strategy;
            p.timings_len = @min(p.timings_len + 1, timing_capacity);
            seq_out.* = seq;
            // A fresh identity when the target asks for one, else none (a
            // take never hands on the identity of an earlier holder).
            F.setIdentity(vm, if (target != null and target.?.identity) p.nextIdentity() else 0);
            return vm;
        }

        pub const findTarget = prepared.findTarget;
        pub const findTargetId = prepared.findTargetId;
        pub const targetId = prepared.targetId;
        pub const findParked = prepared.findParked;
        pub const readyFor = prepared.readyFor;
        pub const heldFor = prepared.heldFor;
        pub const targetOf = prepared.targetOf;
        pub const wakePreparer = prepared.wakePreparer;
        pub const preparerToWake = prepared.preparerToWake;
        pub const preparedCount = prepared.preparedCount;
        pub const setTarget = prepared.setTarget;
        pub const prepareBegin = prepared.prepareBegin;
        pub const prepareEnd = prepared.prepareEnd;
        pub const prepareDone = prepared.prepareDone;
        pub const prepare = prepared.prepare;
        pub const nextIdentity = prepared.nextIdentity;
        pub const preparing = prepared.preparing;
        pub const waitPrepareNeed = prepared.waitPrepareNeed;
        pub const shortTarget = prepared.shortTarget;

        /// With the lock held: destroys `vm` without holding the lock during the
        /// (slow) destruction, counting it as pending meanwhile.
        fn destroyLocked(p: *Self, vm: *Vm) void {
            p.destroying += 1;
            p.unlockIt();
            F.destroy(vm);
            p.lockIt();
            p.destroying -= 1;
            p.destroyed += 1;
        }

        /// With the lock held: one VM fewer in use. Unlocks, and frees a closed
        /// pool when that was the last one.
        fn endUse(p: *Self) void {
            std.debug.assert(p.in_use > 0);
            p.in_use -= 1;
            _ = c.pthread_cond_signal(&p.room);
            p.wakeRefillIfLow(); // a failed restore took a shell, or a backoff may end
            const free_now = p.handle_released and p.in_use == 0;
            p.unlockIt();
            if (free_now) p.free();
        }

        /// With the lock held: wakes the refill thread only when it has work (a
        /// wake costs a context switch on a small machine, at every release).
        pub fn wakeRefillIfLow(p: *Self) void {
            if (p.idle_len + p.creating < p.cfg.min_size) _ = c.pthread_cond_signal(&p.refill_cv);
        }

        /// Background work yields to the threads doing restores: on a small
        /// machine the refill and reapers would otherwise compete with the
        /// caller right after each restore (nice 10; Linux nices threads).
        fn lowerPriority() void {
            _ = linux.syscall3(.setpriority, 0, @as(usize, @intCast(linux.gettid())), 10);
        }

        /// Keeps idle + creating at min_size, and the targets the pool
        /// prepares itself (no warmup) at theirs.
        fn refillLoop(p: *Self) void {
            lowerPriority();
            p.lockIt();
            while (!p.closed) {
                if (p.create_errors < 3) if (p.shortTarget()) |snap| {
                    p.unlockIt();
                    const made = p.prepareBegin(snap);
                    if (made) |vm| {
                        if (vm) |v| p.prepareDone(snap, v, true, false);
                    } else |_| {}
                    p.lockIt();
                    // failures are counted by prepareBegin; back off like creations.
                    if (made) |_| {} else |_| p.create_errors += 1;
                    continue;
                };
                if (p.idle_len + p.creating < p.cfg.min_size and p.create_errors < 3) {
                    if (p.createUnlocked(fit.stopFor(p))) |vm| {
                        p.create_errors = 0;
                        p.pushIdle(vm);
                    } else |_| {
                        // Resource limits: back off instead of spinning; a take,
                        // release or warm() wakes us and resets the counter.
                        p.create_errors += 1;
                        p.failures += 1;
                    }
                    continue;
                }
                var ts = realtimeIn(if (p.create_errors > 0) 200 * std.time.ns_per_ms else 5 * std.time.ns_per_s);
                _ = c.pthread_cond_timedwait(&p.refill_cv, &p.lock, &ts);
                p.create_errors = 0;
            }
            p.unlockIt();
        }

        /// Destroys released VMs and resets parked ones; drains everything on close.
        fn reaperLoop(p: *Self) void {
            lowerPriority();
            p.lockIt();
            while (true) {
                if (!p.reapers_held or p.closed) {
                    if (p.dead.pop()) |vm| {
                        p.destroyLocked(vm);
                        continue;
                    }
                }
                if (p.closed) break;
                if (p.to_reset.pop()) |vm| {
                    // Counted while it is reset (prepared targets count it).
                    p.resetting[p.resetting_len] = vm;
                    p.resetting_len += 1;
                    p.unlockIt();
                    const ok = if (F.resetForReuse(vm)) |_| true else |_| false;
                    p.lockIt();
                    const i = std.mem.indexOfScalar(*Vm, p.resetting[0..p.resetting_len], vm).?;
                    p.resetting_len -= 1;
                    p.resetting[i] = p.resetting[p.resetting_len];
                    p.resets += 1;
                    if (ok and !p.closed and p.parked_len < p.cfg.max_size) {
                        p.parked[p.parked_len] = vm;
                        p.parked_len += 1;
                    } else {
                        p.queueDead(vm);
                    }
                    continue;
                }
                var ts = realtimeIn(5 * std.time.ns_per_s);
                _ = c.pthread_cond_timedwait(&p.reap_cv, &p.lock, &ts);
            }
            p.unlockIt();
        }

        /// Tests only: holds the reapers off the destroy queue (a backlog that
        /// does not depend on how fast this host destroys VMs), or lets them go.
        /// close() ignores the hold.
        pub fn holdReapers(p: *Self, hold: bool) void {
            p.lockIt();
            defer p.unlockIt();
            p.reapers_held = hold;
            if (!hold) _ = c.pthread_cond_broadcast(&p.reap_cv);
        }

        /// Stops the threads and destroys idle, parked and queued shells; the pool
        /// itself stays allocated until releaseHandle (and the last release).
        /// Idempotent.
        pub fn close(p: *Self) void {
            p.lockIt();
            if (p.closed) {
                p.unlockIt();
                return;
            }
            p.closed = true;
            _ = c.pthread_cond_broadcast(&p.need_cv);
            _ = c.pthread_cond_broadcast(&p.refill_cv);
            _ = c.pthread_cond_broadcast(&p.reap_cv);
            _ = c.pthread_cond_broadcast(&p.room);
            p.unlockIt();
            if (p.refill) |t| t.join();
            for (p.reapers) |r| if (r) |t| t.join();
            // Drain what is left, and report done in the same critical section as
            // the last check: a concurrent release either queued before it (and
            // is destroyed here) or destroys inline after it (queueDead).
            p.lockIt();
            while (true) {
                const vm = if (p.idle_len > 0) blk: {
                    p.idle_len -= 1;
                    break :blk p.idle[p.idle_len];
                } else if (p.parked_len > 0) blk: {
                    p.parked_len -= 1;
                    break :blk p.parked[p.parked_len];
                } else p.dead.pop() orelse p.to_reset.pop() orelse break;
                p.destroyLocked(vm);
            }
            for (p.targets[0..p.targets_len]) |t| F.releaseSnap(t.snap);
            p.targets_len = 0;
            p.worker_done = true;
            _ = c.pthread_cond_broadcast(&p.room);
            p.unlockIt();
        }

        /// The owner lets go of the pool (closing it first): it is freed now if
        /// no VM is out, else by the last release. Nothing may call the pool
        /// after this but the releases of VMs still out.
        pub fn releaseHandle(p: *Self) void {
            p.close();
            p.lockIt();
            std.debug.assert(p.worker_done and !p.handle_released); // close() drained it
            p.handle_released = true;
            const free_now = p.in_use == 0;
            p.unlockIt();
            if (free_now) p.free();
        }

        fn destroyAll(p: *Self) void {
            while (p.idle_len > 0) {
                p.idle_len -= 1;
                F.destroy(p.idle[p.idle_len]);
            }
            for (p.dead.items) |vm| F.destroy(vm);
            p.dead.deinit(allocator);
            for (p.to_reset.items) |vm| F.destroy(vm);
            p.to_reset.deinit(allocator);
            while (p.parked_len > 0) {
                p.parked_len -= 1;
                F.destroy(p.parked[p.parked_len]);
            }
        }

        fn free(p: *Self) void {
            p.destroyAll();
            p.parking.deinit(allocator);
            p.fit_hint.deinit();
            allocator.destroy(p);
        }
    };
}

fn realtimeIn(ns: u64) c.timespec {
    const at_ns = shell.clockNs(.REALTIME) +| ns;
    return .{ .sec = @intCast(at_ns / std.time.ns_per_s), .nsec = @intCast(at_ns % std.time.ns_per_s) };
}
