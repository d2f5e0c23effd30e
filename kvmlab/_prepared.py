"""RestorePool.prepare and what belongs to it (issue 14): prepared VMs per
snapshot, kept by the core's pool (zigsrc/prepared.zig); a warmup runs on the
caller's thread at first and then on a warmer thread of this module, since
the core's refill thread cannot run Python. :class:`_PrepareOps` is mixed into
:class:`~kvmlab.pool.RestorePool` (it uses the pool's call guard and handle)."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable

from . import _ffi
from .config import bad_argument, check_int, check_type
from .errors import ClosedError, KvmlabError, PrepareError, SnapshotError
from .snapshot import Snapshot, strategy_code
from .vm import _VmHandle

if TYPE_CHECKING:
    from .config import VmConfig
    from .pool import PoolConfig

ffi = _ffi.ffi
lib = _ffi.lib

#: A restore waiting for room under ``max_in_use``, and the warmer waiting for
#: a prepared snapshot to run short, wait in the core for at most this long at
#: a time, so close() on another thread is never held up longer.
_WAIT_SLICE_NS = 50_000_000

#: The warmer's pause after a failed background preparation (the core counts it
#: in ``failures``) before it tries again.
_WARMER_BACKOFF_S = 0.2


def _keep_handle(_h: Any) -> None:
    """The free function of the VM a warmup sees: the pool keeps the VM."""


class _PrepareOps:
    """RestorePool's prepared-VM methods (see the module doc)."""

    if TYPE_CHECKING:  # provided by kvmlab.pool.RestorePool
        vm_config: VmConfig
        pool_config: PoolConfig
        _lock: threading.Lock
        _warmups: dict[int, tuple[Snapshot, Any, Callable[[Any], object]]]
        _targets: dict[Snapshot, tuple[int, int, str]]
        _warmer: threading.Thread | None
        _warming: set[_VmHandle]
        _handle: Any
        _native: Any

        def _enter(self) -> Any: ...

        def _exit(self) -> None: ...

        def _if_open(self) -> AbstractContextManager[Any]: ...

    def prepare(
        self, snap: Snapshot, n: int, *, warmup: Callable[[Any], object] | None = None, strategy: str = "auto",
        identity: bool = False,
    ) -> None:
        """Keeps ``n`` VMs of ``snap`` *prepared*: restored into shells and, with
        ``warmup``, run through ``warmup(vm)`` and reset to ``snap`` again, so
        their guest-visible state is the snapshot's, bit for bit, while host and
        KVM mappings are hot. Returns once ``n`` are ready.

        Afterwards the pool's workers keep ``n`` ready (as ``min_size`` does for
        shells); :meth:`restore_snapshot` of ``snap`` takes one when ready
        (``restore_timing["strategy"] == "prepared"``), and releasing a VM of
        ``snap`` resets it and keeps it prepared. ``prepare(snap, 0)`` gives
        them up. The targets of all snapshots together stay within ``max_size``.
        A call with a ``warmup`` first gives up the VMs prepared before, so
        every prepared VM ran that warmup. A released VM is reset off your
        thread, so it is ready again shortly after the release, not at once.

        Args:
            snap: the snapshot (its shape must be the pool's).
            n: prepared VMs to keep (0 .. ``max_size``).
            warmup: called with each VM before it is reset (e.g.
                ``lambda vm: vm.call(b"ping")``); the VM is the pool's afterwards.
            strategy: ``"copy"``, ``"map"`` or ``"auto"`` (map a file-backed snapshot).
            identity: every take gives the VM a fresh, distinct identity
                (``vm.identity``), which the guest reads through ports 0x503/0x504
                (docs/guest-protocol.md); without it the guest reads 0.

        Raises:
            PrepareError: ``warmup`` raised or crashed the guest (``check ==
                "warmup"``); nothing stays prepared for ``snap``.
            PoolExhaustedError: the targets would exceed ``max_size``.
            IncompatibleError: ``snap`` does not fit this pool or host.
            ConfigError: a bad ``n``, ``warmup`` or ``strategy``.
            ClosedError: the pool or the snapshot is closed.
        """
        if not isinstance(snap, Snapshot):
            raise SnapshotError(f"prepare takes a Snapshot, got {type(snap).__name__}", check="argument_type")
        check_int("prepare n", n, 0, self.pool_config.max_size)
        if warmup is not None and not callable(warmup):
            bad_argument("argument_type", "warmup", f"warmup must be callable (it gets the VM), got {type(warmup).__name__}")
        code = strategy_code(strategy)
        check_type("identity", identity, bool)
        flags = _ffi.enum_values("kvmlab_prepare_flags")["identity"] if identity else 0  # bits, named by the header
        with snap._use() as sh:
            key = int(ffi.cast("uintptr_t", sh))
            h = self._enter()
            try:
                if warmup is None or n == 0:
                    # The core keeps the old target when this fails: so does Python.
                    _ffi.check(lib.kvmlab_pool_prepare(h, sh, n, code, flags))
                    self._warmups.pop(key, None)
                    self._targets.pop(snap, None)
                    if n:
                        self._targets[snap] = (n, int(lib.kvmlab_pool_target_id(h, sh)), snap.guest)
                    return
                # Every VM runs this warmup: those prepared before are given up.
                _ffi.check(lib.kvmlab_pool_prepare(h, sh, 0, code, 0))
                self._warmups.pop(key, None)
                self._targets.pop(snap, None)
                _ffi.check(lib.kvmlab_pool_prepare_target(h, sh, n, code, flags))
            finally:
                self._exit()
            try:
                while self._prepare_one(sh, snap.guest, warmup):
                    pass
            except BaseException:
                self._give_up(sh)
                raise
            self._warmups[key] = (snap, sh, warmup)
            self._targets[snap] = (n, int(lib.kvmlab_pool_target_id(self._native, sh)), snap.guest)
        self._start_warmer()

    def _warmup_of(self, snap: Snapshot) -> Callable[[Any], object] | None:
        """The warmup ``snap`` was prepared with (None: without one)."""
        return next((w for s, _sh, w in list(self._warmups.values()) if s is snap), None)

    def prepared_count(self, snap: Snapshot) -> int:
        """Prepared VMs of ``snap`` ready now (0 when it is not prepared, or
        the pool or snapshot is closed). Raises only for a non-Snapshot."""
        if not isinstance(snap, Snapshot):
            raise SnapshotError(f"prepared_count takes a Snapshot, got {type(snap).__name__}", check="argument_type")
        with self._if_open() as h:
            if h is None:
                return 0
            try:
                with snap._use() as sh:
                    return int(lib.kvmlab_pool_prepared_count(h, sh))
            except ClosedError:  # the snapshot was closed
                return 0

    def prepared_targets(self) -> dict[Snapshot, int]:
        """Every snapshot prepared in this pool, with its target ``n``
        (:meth:`prepared_count` says how many are ready now)."""
        return {snap: target[0] for snap, target in list(self._targets.items())}

    def _give_up(self, sh: Any) -> None:
        """prepare(snap, 0) after a failure (nothing half-prepared)."""
        with self._if_open() as h:
            if h is not None:
                lib.kvmlab_pool_prepare(h, sh, 0, 0, 0)

    def _prepare_one(self, sh: Any, guest: str, warmup: Callable[[Any], object]) -> bool:
        """Prepares one VM of the snapshot ``sh`` with ``warmup`` if its target
        is short (True), else returns False. The pool stays in use meanwhile:
        close() stops the warmup's VM runs and waits for it to return."""
        h = self._enter()
        try:
            out = ffi.new("kvmlab_vm **")
            _ffi.check(lib.kvmlab_pool_prepare_begin(h, sh, out))
            if out[0] == ffi.NULL:
                return False
            vm = _VmHandle(out[0], self.vm_config, guest, _keep_handle)
            with self._lock:  # a close() from now on stops the warmup's runs
                self._warming.add(vm)
                closing = self._handle is None
            failure: BaseException | None = None
            try:
                if closing:  # close() came between _enter and here: no warmup
                    raise ClosedError("the pool was closed before the warmup began", check="pool_closed")
                warmup(vm)
            except BaseException as e:  # noqa: BLE001 - handed on below, after the VM went back
                failure = e
            with self._lock:
                self._warming.discard(vm)
            with vm._lock:  # the warmup may have kept it: it is the pool's now
                vm._handle = None
            rc = lib.kvmlab_pool_prepare_end(h, sh, out[0], 1, int(failure is None))
            if failure is None and rc:
                failure = _ffi.error_for(rc)  # the reset after the warmup failed
            if isinstance(failure, Exception) and self._handle is None:
                raise ClosedError("the pool was closed while a warmup ran; nothing more is prepared",
                                  check="pool_closed") from failure
            if isinstance(failure, Exception):
                raise PrepareError(
                    f"prepare: the warmup of {guest} failed ({type(failure).__name__}: {failure}); nothing is "
                    "prepared for this snapshot: fix the warmup and prepare again",
                    check="warmup",
                ) from failure
            if failure is not None:
                raise failure  # KeyboardInterrupt and the like, as they are
            return True
        finally:
            self._exit()

    def _start_warmer(self) -> None:
        with self._lock:
            if self._warmer is not None and self._warmer.is_alive():
                return
            self._warmer = threading.Thread(target=self._warmer_loop, name="kvmlab-pool-warmer", daemon=True)
            self._warmer.start()

    def _warmer_loop(self) -> None:
        """Keeps the targets of snapshots prepared with a warmup (the core's
        refill thread cannot run Python): waits in the core until one is short,
        then prepares on this thread. Ends when the pool closes or no snapshot
        has a warmup."""
        need = ffi.new("uint32_t *")
        while self._warmups:
            with self._if_open() as h:
                if h is None:
                    return
                rc = lib.kvmlab_pool_prepare_wait(h, _WAIT_SLICE_NS, need)
            if rc:
                return  # closed
            if not need[0]:
                continue
            for key, (snap, sh, warmup) in list(self._warmups.items()):
                try:
                    while self._warmups.get(key, (None, None, None))[1] is sh and self._prepare_one(sh, snap.guest, warmup):
                        pass
                except ClosedError:
                    return
                except KvmlabError:  # a warmup's own error arrives as PrepareError
                    time.sleep(_WARMER_BACKOFF_S)  # counted in stats().failures; try again later
