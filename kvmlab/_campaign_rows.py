"""A campaign's result rows (kvmlab.distributed): what a worker sends back per
batch, and the DataFrame the client builds once from all of them.

A batch comes back as numpy records and the few cells that are text or
registers, not as a DataFrame: building a frame per batch, Dask sizing it for
its memory accounting, pickling, unpickling and concatenating the frames cost
the workers and the client more CPU than the batch's own Python work, CPU
that the workers' VMs need when the client shares their machine.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd

from . import _ffi
from .run import REASONS

#: ``reason`` values of a result row.
RESULT_REASONS = ("exit", "checkpoint", "crash", "timeout", "error")
#: Registers of vCPU 0 kept for crash rows, as columns ``crash_<name>``.
CRASH_REGISTERS = ("rip", "rsp", "rbp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rflags", "cr2")
#: Columns of a result frame, in order.
COLUMNS = (
    "input_index", "reason", "exit_code", "checkpoint_tag", "console", "run_ns", "dirty_pages", "worker",
    "message", *(f"crash_{r}" for r in CRASH_REGISTERS),
)
#: Console bytes kept per input (the rest is counted, not kept).
CONSOLE_BYTES = 256
# The core's run reasons -> result reasons. A halt (hlt with interrupts off)
# never ends on its own: a hang like a timeout. An interrupted run was stopped
# by a signal to the worker, not by the guest: an error.
_REASON_OF_RUN = {"exit": "exit", "checkpoint": "checkpoint", "halt": "timeout", "timeout": "timeout",
                  "interrupted": "error"}
_CRASH = RESULT_REASONS.index("crash")
_ERROR = RESULT_REASONS.index("error")
#: Core reason code -> result reason code (an unknown code is an error).
_REASON_TABLE = np.array([RESULT_REASONS.index(_REASON_OF_RUN.get(REASONS.get(c, ""), "error"))
                          for c in range(max(REASONS) + 1)] + [_ERROR], dtype=np.int8)


@functools.cache
def _record_dtype() -> np.dtype:
    """numpy's view of ``kvmlab_loop_result`` (unsigned fields), from the header."""
    ffi = _ffi.ffi
    t = ffi.typeof("kvmlab_loop_result")
    return np.dtype({
        "names": [name for name, _ in t.fields],
        "formats": [f"<u{ffi.sizeof(f.type)}" for _, f in t.fields],
        "offsets": [f.offset for _, f in t.fields],
        "itemsize": ffi.sizeof(t),
    })


def _records(out: Any, n: int) -> np.ndarray:
    """The first ``n`` native loop records as a numpy array (a copy)."""
    dtype = _record_dtype()
    return np.frombuffer(_ffi.ffi.buffer(out, n * dtype.itemsize), dtype=dtype).copy()


class _Rows(NamedTuple):
    """A batch's rows as a worker sends them back: numpy records
    (:data:`_ROW_DTYPE`) and the few cells that are text or registers. The
    client joins the batches and builds the frame once (:func:`_frame`)."""

    first: int  #: input index of row 0
    worker: str
    table: np.ndarray  #: one :data:`_ROW_DTYPE` record per input
    console: dict[int, str]  #: row -> console text, rows that printed
    message: dict[int, str]  #: row -> message, rows that have one
    crashes: dict[int, tuple[int, ...]]  #: row -> crash registers (:data:`CRASH_REGISTERS` order)


#: The numeric columns of a batch's rows. ``exit_code``/``checkpoint_tag``
#: count only where ``reason`` says exit/checkpoint.
_ROW_DTYPE = np.dtype([("reason", "i1"), ("exit_code", "<i8"), ("checkpoint_tag", "<i8"), ("run_ns", "<i8"),
                       ("dirty_pages", "<i8")])


def _rows(first: int, n: int, worker: str, loop: np.ndarray | None = None, console: bytes | bytearray = b"",
          crashes: dict[int, dict[str, Any]] | None = None, message: str = "") -> _Rows:
    """The rows of a batch of ``n`` inputs: the first ``len(loop)`` from the
    native loop's records (and ``console``, ``CONSOLE_BYTES`` per input), the
    rest error rows saying ``message``; ``crashes``: row -> its crash fields."""
    table = np.zeros(n, dtype=_ROW_DTYPE)
    table["reason"] = _ERROR
    texts: dict[int, str] = {}
    messages = dict.fromkeys(range(n), message) if message else {}
    if loop is not None:
        done = len(loop)
        codes = _REASON_TABLE[np.minimum(loop["reason"], len(_REASON_TABLE) - 1)]
        codes[loop["crashed"] != 0] = _CRASH
        table["reason"][:done] = codes
        for col in ("exit_code", "checkpoint_tag", "run_ns", "dirty_pages"):
            table[col][:done] = loop[col]
        for i in np.flatnonzero(loop["console_bytes"]).tolist():
            k = min(int(loop["console_bytes"][i]), CONSOLE_BYTES)
            texts[i] = console[i * CONSOLE_BYTES:i * CONSOLE_BYTES + k].decode("utf-8", "replace")
        messages.update(dict.fromkeys(np.flatnonzero(codes == _ERROR).tolist(),
                                      "the run was interrupted by a signal to the worker"))
        messages.update(dict.fromkeys(range(done, n), "not run: the loop was stopped (interrupt or close) "
                                                      "before this input"))
    registers = {}
    for at, row in (crashes or {}).items():
        messages[at] = row["message"]
        if "crash_rip" in row:
            registers[at] = tuple(int(row[f"crash_{r}"]) for r in CRASH_REGISTERS)
    return _Rows(first, worker, table, texts, messages, registers)


def _strings(codes: np.ndarray, texts: list[str]) -> Any:
    """A text column: row i is ``texts[codes[i]]``. Built from the codes in
    Arrow when pandas keeps text in Arrow (pandas 3 with pyarrow): making it
    from a Python string per row cost ~4 ms per 20,000 rows."""
    dtype = pd.Series([""], dtype=object).infer_objects().dtype  # what a column of str becomes here
    if getattr(dtype, "storage", None) == "pyarrow":
        import pyarrow as pa  # type: ignore[import-untyped]

        arrow = pa.DictionaryArray.from_arrays(pa.array(codes, type=pa.int32()), pa.array(texts, type=pa.large_string()))
        return pd.array(arrow.cast(pa.large_string()), dtype=dtype)
    return np.array(texts, dtype=object)[codes]


def _cells(n: int, batches: Sequence[_Rows], sizes: list[int], column: str) -> Any:
    """A text column of ``n`` rows, "" but for the batches' cells of ``column``."""
    codes = np.zeros(n, dtype=np.int32)
    texts = {"": 0}
    at = 0
    for b, size in zip(batches, sizes):
        for i, text in getattr(b, column).items():
            codes[at + i] = texts.setdefault(text, len(texts))
        at += size
    return _strings(codes, list(texts))


def _frame(batches: Sequence[_Rows]) -> pd.DataFrame:
    """One frame of :data:`COLUMNS` from the batches' rows, in their order."""
    table = np.concatenate([b.table for b in batches]) if batches else np.zeros(0, dtype=_ROW_DTYPE)
    n = len(table)
    sizes = [len(b.table) for b in batches]
    regs = np.zeros((len(CRASH_REGISTERS), n), dtype=np.uint64)
    crashed = np.zeros(n, dtype=bool)
    for at, b in zip(np.cumsum([0, *sizes]).tolist(), batches):
        for i, values in b.crashes.items():
            crashed[at + i] = True
            regs[:, at + i] = values
    reason = np.ascontiguousarray(table["reason"])

    def known_if(col: str, what: str) -> pd.arrays.IntegerArray:
        return pd.arrays.IntegerArray(np.ascontiguousarray(table[col]), reason != RESULT_REASONS.index(what))

    index = [np.arange(b.first, b.first + size, dtype=np.int64) for b, size in zip(batches, sizes)]
    cols: dict[str, Any] = {
        "input_index": np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
        "reason": pd.Categorical.from_codes(reason, categories=list(RESULT_REASONS)),
        "exit_code": known_if("exit_code", "exit"),
        "checkpoint_tag": known_if("checkpoint_tag", "checkpoint"),
        "console": _cells(n, batches, sizes, "console"),
        "run_ns": np.ascontiguousarray(table["run_ns"]),
        "dirty_pages": np.ascontiguousarray(table["dirty_pages"]),
        "worker": _strings(np.repeat(np.arange(len(batches), dtype=np.int32), sizes), [b.worker for b in batches]),
        "message": _cells(n, batches, sizes, "message"),
        **{f"crash_{r}": pd.arrays.IntegerArray(regs[k], ~crashed) for k, r in enumerate(CRASH_REGISTERS)},
    }
    return pd.DataFrame(cols, columns=list(COLUMNS), copy=False)  # the arrays are new: no copy
