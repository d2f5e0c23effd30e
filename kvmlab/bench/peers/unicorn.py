"""unicorn as a peer: its restore of a kvmlab snapshot (``context_restore`` +
``mem_write`` of the present pages) and the run+reset cycle of raw x86-64
code. Needs ``pip install unicorn`` (``kvmlab[bench]``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..stats import median

if TYPE_CHECKING:
    from ..harness import Progress

__all__ = ["unicorn_available", "UnicornCycle", "unicorn_restore", "INSTALL_HINT"]

INSTALL_HINT = "pip install unicorn (or pip install 'kvmlab[bench]')"
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rip")


def unicorn_available() -> str | None:
    """None when the ``unicorn`` package imports, else why not (and how to install it)."""
    try:
        import unicorn  # noqa: F401
    except ImportError as e:
        return f"unicorn is not installed ({e}); {INSTALL_HINT}"
    return None


class UnicornCycle:
    """``code`` in unicorn (UC_MODE_64), driven from Python: loaded at
    ``base`` in ``memory_mib`` mapped at 0, run from ``base`` until ``end``
    (``emu_start``); reset = ``context_restore`` + ``mem_write`` of each of the
    ``pages`` pages at ``data`` from a golden copy (unicorn has no dirty log:
    the pages are known). The input (8 bytes) goes to ``input_gpa``."""

    def __init__(self, code: bytes, pages: int, memory_mib: int, base: int, end: int, stack: int, data: int,
                 input_gpa: int) -> None:
        import unicorn
        from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
        from unicorn.x86_const import UC_X86_REG_RFLAGS, UC_X86_REG_RIP, UC_X86_REG_RSP

        self.version = unicorn.__version__
        self.pages, self.base, self.end, self.data, self.input_gpa = pages, base, end, data, input_gpa
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map(0, memory_mib << 20)
        self.uc.mem_write(base, code)
        self.uc.reg_write(UC_X86_REG_RIP, base)
        self.uc.reg_write(UC_X86_REG_RSP, stack)
        self.uc.reg_write(UC_X86_REG_RFLAGS, 0x3002)
        self.ctx = self.uc.context_save()
        self.golden = [(data + p * 4096, bytes(self.uc.mem_read(data + p * 4096, 4096))) for p in range(pages)]

    def run(self, inp: bytes) -> None:
        self.uc.mem_write(self.input_gpa, inp)
        self.uc.emu_start(self.base, self.end)

    def reset(self) -> None:
        self.uc.context_restore(self.ctx)
        for addr, data in self.golden:
            self.uc.mem_write(addr, data)

    def words(self, iterations: int | None = None) -> list[int]:
        """The qword at offset 0 of each page; with ``iterations``: after one
        run with that input (then reset)."""
        if iterations is not None:
            self.run(iterations.to_bytes(8, "little"))
        out = [int.from_bytes(self.uc.mem_read(self.data + p * 4096, 8), "little") for p in range(self.pages)]
        if iterations is not None:
            self.reset()
        return out

    def batch(self, inp: bytes, count: int) -> dict[str, Any]:
        """``count`` run+reset cycles, each timed in Python."""
        uc, ctx, golden, base, end, gpa = self.uc, self.ctx, self.golden, self.base, self.end, self.input_gpa
        clock = time.perf_counter_ns
        each, run_ns, reset_ns = [], [], []
        t0 = clock()
        for _ in range(count):
            c0 = clock()
            uc.mem_write(gpa, inp)
            uc.emu_start(base, end)
            c1 = clock()
            uc.context_restore(ctx)
            for addr, data in golden:
                uc.mem_write(addr, data)
            c2 = clock()
            each.append(c2 - c0)
            run_ns.append(c1 - c0)
            reset_ns.append(c2 - c1)
        wall = clock() - t0
        return {"cycles": count, "wall_ns": wall, "each": sorted(each), "run_ns": median(run_ns),
                "reset_ns": median(reset_ns)}


def unicorn_restore(snap_path: Path, n: int, progress: Progress | None = None) -> list[dict[str, Any]]:
    """unicorn's restore of the same snapshot: a ``Uc`` (UC_MODE_64) with the
    snapshot's memory size mapped; each restore is ``context_restore`` plus
    ``mem_write`` of the snapshot's present (non-zero) pages, contiguous runs
    written with one call each, from Python (buffers prepared beforehand,
    untimed). Returns one record per restore (``restore_ns``, ``pages``, ``writes``)."""
    import numpy as np
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as X

    from ... import Snapshot, Vm

    with Snapshot.load(snap_path) as snap:
        size = snap.memory_bytes
        mem = np.frombuffer(snap.memory, dtype=np.uint64).reshape(-1, 512)
        present = np.flatnonzero(mem.any(axis=1))
        runs: list[tuple[int, bytes]] = []
        if len(present):
            breaks = np.flatnonzero(np.diff(present) != 1) + 1
            for chunk in np.split(present, breaks):
                a, b = int(chunk[0]), int(chunk[-1]) + 1
                runs.append((a * 4096, bytes(snap.memory[a * 4096:b * 4096])))
        del mem
        with Vm.restore(snap, "map") as vm:
            regs = vm.registers()
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, size)
    for name in _GPRS:
        uc.reg_write(getattr(X, f"UC_X86_REG_{name.upper()}"), regs[name])
    ctx = uc.context_save()
    for addr, data in runs:  # fault the host memory in once, like a warm kvmlab shell
        uc.mem_write(addr, data)
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        uc.context_restore(ctx)
        for addr, data in runs:
            uc.mem_write(addr, data)
        out.append({"i": i, "restore_ns": time.perf_counter_ns() - t0, "pages": int(len(present)), "writes": len(runs)})
        if progress is not None:
            progress.update(1)
    return out
