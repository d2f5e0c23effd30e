"""Snapshots: capture a stopped VM, save/load/encode it, restore it.

    >>> vm = kvmlab.Vm.boot("counter", args={"steps": 20, "checkpoint_at": 10})
    >>> vm.run()                         # stops at the checkpoint
    >>> snap = kvmlab.snapshot(vm)       # or vm.snapshot()
    >>> snap.save("counter.kvmsnap")
    >>> vm2 = kvmlab.Vm.restore(kvmlab.Snapshot.load("counter.kvmsnap"))
    >>> vm2.run()                        # continues exactly where vm was

The format is owned by the Zig core (``zigsrc/snapshot.zig`` draws it): a
checked header, a STATE section (``snap.vcpu_state``: everything but memory)
and a MEMORY section, each with a CRC32C, all-zero pages not stored.
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from . import _ffi
from ._closing import Closing
from .config import VmConfig, check_choice, check_path
from .errors import ClosedError, ConfigError, SnapshotError

__all__ = ["Snapshot", "STRATEGIES"]

ffi = _ffi.ffi
lib = _ffi.lib

#: Memory strategies of a restore, name -> ``kvmlab_strategy`` (read from the
#: header; ``reuse`` and ``prepared`` are chosen by a pool, and the core refuses
#: them from callers).
STRATEGIES = _ffi.enum_values("kvmlab_strategy")


def strategy_code(strategy: str) -> int:
    return check_choice("strategy", strategy, STRATEGIES)


class _NativeOwner:
    """Owns one native ``kvmlab_snapshot``: it is freed when the last
    reference is dropped. The :class:`Snapshot` holds one (dropped by
    ``close()`` or when it is garbage-collected) and every buffer handed out by
    :attr:`Snapshot.memory` holds one until the last view or slice of it is
    gone, so no buffer can outlive the memory it points into."""

    __slots__ = ("_handle", "_refs", "_lock")

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._refs = 1
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._handle is None:
                raise ClosedError("this snapshot is closed", check="snapshot_closed")
            self._refs += 1

    def release(self, _cdata: Any = None) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs > 0 or self._handle is None:
                return
            h, self._handle = self._handle, None
        lib.kvmlab_snapshot_free(h)


class _InUse:
    """``with snap._use() as handle:`` (a class of its own: restore is a hot path)."""

    __slots__ = ("snap",)

    def __init__(self, snap: "Snapshot") -> None:
        self.snap = snap

    def __enter__(self) -> Any:
        snap = self.snap
        with snap._lock:
            h = snap._live()
            snap._active += 1
            return h

    def __exit__(self, *exc: object) -> None:
        snap = self.snap
        with snap._lock:
            snap._active -= 1
            if snap._active == 0 and snap._handle is None:
                snap._idle.notify_all()  # close() is waiting


def _header_fact(key: str, doc: str) -> Any:
    """A read-only property: the header fact ``key``, read once when the
    snapshot was made (``Snapshot._info``)."""
    return property(lambda self: self._info[key], doc=doc)


class Snapshot(Closing):
    """A captured VM: guest memory plus all vCPU, device and host-side state.

    Get one from :meth:`Vm.snapshot` (in memory), :meth:`Snapshot.load` (a
    file, mapped, memory not read into the heap) or :meth:`Snapshot.from_bytes`.
    ``close()`` frees it (also a context manager). Views from :attr:`memory`
    are released then; slices or exports taken from them keep the memory
    valid until they are gone.
    """

    def __init__(self, handle: Any, path: Path | None = None) -> None:
        self._handle = handle
        self._path = path
        self._lock = threading.Lock()
        # Native calls in flight (restores from other threads): close() waits.
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._views: list[weakref.ref[memoryview]] = []
        self._owner = _NativeOwner(handle)
        self._finalizer = weakref.finalize(self, self._owner.release)
        info = ffi.new("kvmlab_snapshot_info *")
        _ffi.check(lib.kvmlab_snapshot_get_info(handle, info))
        self._info = {
            "memory_bytes": int(info.memory_bytes),
            "vcpus": int(info.vcpus),
            "file_backed": bool(info.file_backed),
            "present_pages": int(info.present_pages),
            "stored_bytes": int(info.stored_bytes),
            "created_unix_ns": int(info.created_unix_ns),
            "state_bytes": int(info.state_bytes),
            "version": f"{info.version_major}.{info.version_minor}",
            "guest": ffi.string(info.guest_name).decode("utf-8", "replace"),
        }

    # -- constructors -----------------------------------------------------------

    @classmethod
    def _capture(cls, vm_handle: Any) -> "Snapshot":
        out = ffi.new("kvmlab_snapshot **")
        _ffi.check(lib.kvmlab_snapshot_capture(vm_handle, out))
        return cls(out[0])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Snapshot":
        """Checks and copies an encoded snapshot (from :meth:`to_bytes` or a file's bytes).

        Args:
            data: the encoded snapshot, one contiguous bytes-like buffer.

        Returns:
            A new in-memory :class:`Snapshot` (not file-backed).

        Raises:
            SnapshotError: ``data`` is not bytes-like, or not a valid snapshot
                (bad header, section or checksum; the message says which).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SnapshotError(f"snapshot data must be bytes-like, got {type(data).__name__}", check="argument_type")
        out = ffi.new("kvmlab_snapshot **")
        # Every view of `data` is released before returning (or raising), so
        # the caller can close an mmap it passed in.
        with memoryview(data) as base:
            try:
                view = base.cast("B")
            except TypeError as e:  # e.g. a non-contiguous slice
                raise SnapshotError(f"snapshot data must be one contiguous buffer: {e}", check="argument_buffer") from None
            with view, ffi.from_buffer("uint8_t[]", view) as buf:
                rc = lib.kvmlab_snapshot_from_bytes(buf, len(view), out)
        _ffi.check(rc)
        return cls(out[0])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Snapshot":
        """Maps a snapshot file and checks it (header, sections, checksums).

        The memory is used in place, so a ``map`` restore shares the file's
        pages copy-on-write; the file is never written.

        Args:
            path: a file written by :meth:`save`.

        Returns:
            A file-backed :class:`Snapshot` (restores can use ``strategy="map"``).

        Raises:
            SnapshotError: the file cannot be opened, is not a regular file, or
                is not a valid snapshot (the message names the file and the check).
            ConfigError: ``path`` is not a path.
        """
        p = Path(check_path("path", path))
        # Refuse anything but a regular file before the core opens it (opening
        # a FIFO would block; a device or directory is never a snapshot).
        try:
            st = p.stat()
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SnapshotError(f"cannot open snapshot {p}: {why}", check="file") from None
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{p} is not a regular file; a snapshot is a file written by Snapshot.save", check="file")
        out = ffi.new("kvmlab_snapshot **")
        try:
            _ffi.check(lib.kvmlab_snapshot_load(os.fsencode(p), out))
        except SnapshotError as e:
            # The core's message says what is wrong; add which file, once.
            msg = str(e)
            if str(p) not in msg:
                raise SnapshotError(f"{p}: {msg}", check=e.check) from None
            raise
        return cls(out[0], path=p)

    # -- encoding -----------------------------------------------------------------

    def _live(self) -> Any:
        if self._handle is None:
            raise ClosedError("this snapshot is closed", check="snapshot_closed")
        return self._handle

    def _use(self) -> "_InUse":
        """Context manager: the live handle, kept valid until the block ends
        (several threads may use it at once; close() waits for them)."""
        return _InUse(self)

    def to_bytes(self) -> bytes:
        """The packed encoding (only non-zero pages), accepted by :meth:`from_bytes`.

        Returns:
            The encoded snapshot.

        Raises:
            ClosedError: the snapshot is closed.
        """
        return self._sized_copy(lib.kvmlab_snapshot_to_bytes)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the snapshot to ``path`` atomically (temp file, fsync, rename),
        mode 0600, zero pages as holes. Missing parent directories are created 0700.

        Args:
            path: the file to write (replaced if it exists).

        Returns:
            ``path`` as a :class:`~pathlib.Path` (load it with :meth:`load`).

        Raises:
            SnapshotError: ``path`` exists and is not a regular file, or writing failed.
            ConfigError: a missing parent directory cannot be created.
            ClosedError: the snapshot is closed.
        """
        p = Path(check_path("path", path))
        with self._lock:
            self._live()  # a closed snapshot creates nothing
        if p.exists() and not p.is_file():
            raise SnapshotError(f"{p} exists and is not a regular file", check="save_create")
        try:
            # Every missing directory is created 0700 (Path.mkdir(parents=True)
            # would give the intermediate ones the default mode).
            for d in reversed([p.parent, *p.parent.parents]):
                if not d.exists():
                    d.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            # Same class as the core's own "cannot create" errors.
            raise ConfigError(f"cannot create the directory of {p}: {e.strerror or e}", check="save_create") from None
        with self._lock:
            _ffi.check(lib.kvmlab_snapshot_save(self._live(), os.fsencode(p)))
        return p

    # -- the two parts the restore pool takes --------------------------------------

    @property
    def memory(self) -> memoryview:
        """Guest memory as a read-only buffer (``memory_bytes`` long, no copy).

        ``close()`` releases the view returned here; the memory itself stays
        valid while a slice or export of it is alive (the native snapshot is
        freed after the last one is gone), so it can never dangle.
        """
        with self._lock:
            h = self._live()
            ptr = ffi.new("uint8_t **")
            n = ffi.new("uint64_t *")
            _ffi.check(lib.kvmlab_snapshot_memory(h, ptr, n))
            self._owner.acquire()
            try:
                # The buffer keeps `keeper` alive; collecting it (after the last
                # view, slice or export of the buffer) drops the reference.
                keeper = ffi.gc(ffi.cast("uint8_t *", ptr[0]), self._owner.release)
            except BaseException:
                self._owner.release()
                raise
            view = memoryview(ffi.buffer(keeper, n[0])).toreadonly()
            self._views = [r for r in self._views if r() is not None]
            self._views.append(weakref.ref(view))
            return view

    @property
    def vcpu_state(self) -> bytes:
        """Everything but memory (vCPUs, irqchip, PIT, clock, host devices, page map)."""
        return self._sized_copy(lib.kvmlab_snapshot_state)

    def _sized_copy(self, get: Callable[..., int]) -> bytes:
        """What a native `get(handle, buf, capacity, out_bytes)` copies out:
        asked once for the size (buf NULL), then into a buffer of that size."""
        with self._lock:
            h = self._live()
            n = ffi.new("size_t *")
            _ffi.check(get(h, ffi.NULL, 0, n))
            buf = bytearray(n[0])
            _ffi.check(get(h, ffi.from_buffer("uint8_t[]", buf), len(buf), n))
        return bytes(buf)

    # -- metadata ---------------------------------------------------------------------

    memory_bytes: int = _header_fact("memory_bytes", "Guest memory in bytes.")
    vcpus: int = _header_fact("vcpus", "vCPUs of the captured VM.")
    guest: str = _header_fact("guest", "The name of the guest that was captured.")
    stored_bytes: int = _header_fact("stored_bytes", "Bytes it takes where it is stored (disk blocks for a file).")
    present_pages: int = _header_fact("present_pages", "4 KiB pages that are not all zero (the others are not stored).")
    file_backed: bool = _header_fact("file_backed", "True when loaded from a file (restores can map it).")

    @property
    def config(self) -> VmConfig:
        """A VmConfig of this snapshot's shape (what a pool must be created with)."""
        return VmConfig(memory_mib=self.memory_bytes >> 20, vcpus=self.vcpus)

    @property
    def created_at(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self._info["created_unix_ns"] / 1e9, tz=_dt.timezone.utc)

    @property
    def damaged(self) -> bool:
        """True when the file behind this loaded snapshot was truncated or
        rewritten in place since it was loaded (asking checks the file now:
        its header, size and mtime), or a read past a truncated end gave
        zeros instead of crashing the process (SIGBUS). kvmlab then refuses to
        use the snapshot; load the file again. A file renamed over the path
        does not count: the snapshot keeps the file it loaded.
        (docs/security.md: the trust boundary.)"""
        with self._lock:
            info = ffi.new("kvmlab_snapshot_info *")
            _ffi.check(lib.kvmlab_snapshot_get_info(self._live(), info))
            return bool(info.damaged)

    @property
    def path(self) -> Path | None:
        return self._path

    def info(self) -> dict[str, Any]:
        """Header facts as a dict (what ``kvmlab snapshot info`` prints)."""
        d = dict(self._info)
        d["path"] = str(self._path) if self._path else None
        d["created_at"] = self.created_at.isoformat()
        return d

    # -- lifetime ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Frees the snapshot. Idempotent; waits for restores from other threads.

        The views returned by :attr:`memory` are released (using one raises
        ``ValueError``). Slices or other exports of them that are still alive
        keep the snapshot's memory mapped until they are gone."""
        with self._lock:
            if self._handle is None:
                return
            self._handle = None  # new users get ClosedError from here on
            while self._active:
                self._idle.wait()
            for ref in self._views:
                v = ref()
                if v is None:
                    continue
                try:
                    v.release()
                except BufferError:
                    pass  # exported (e.g. to numpy): the owner keeps the memory alive
            self._views.clear()
            self._finalizer()

    def __repr__(self) -> str:
        where = f" path={str(self._path)!r}" if self._path else ""
        return (
            f"<Snapshot guest={self.guest!r} memory_mib={self.memory_bytes >> 20} vcpus={self.vcpus} "
            f"present_pages={self.present_pages} stored_bytes={self.stored_bytes}{where}"
            f"{' closed' if self.closed else ''}>"
        )

    def _repr_html_(self) -> str:
        from . import _html
        from .units import fmt_size

        pages = self.memory_bytes // 4096
        rows = [
            ("guest", self.guest or "(unnamed)"),
            ("memory", f"{fmt_size(self.memory_bytes)}, {self.vcpus} vCPU"),
            ("present pages", f"{self.present_pages} of {pages} ({fmt_size(self.present_pages * 4096)})"),
            ("stored", fmt_size(self.stored_bytes)),
            ("file", str(self._path) if self._path else "none (in memory; save and load it to restore with map)"),
            ("created", self.created_at.isoformat(timespec="seconds")),
        ]
        bar = _html.bar([(f"{self.present_pages} present pages", self.present_pages, "brand")], pages)
        title = f"Snapshot{' (closed)' if self.closed else ''}"
        return _html.box(title, bar + _html.table(rows), "kvmlab-snapshot")
