"""What a run of a VM returns: :class:`RunResult` (one ``run()``),
:class:`LoopResult` (one iteration of ``reset_loop()``) and :class:`ResetTiming`
(one ``reset()``), with the run reasons' names read from the header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _ffi

__all__ = ["RunResult", "ResetTiming", "LoopResult", "REASONS"]

#: ``kvmlab_run_result.reason`` -> name (``kvmlab_run_reason``, read from the header).
REASONS = _ffi.enum_names("kvmlab_run_reason")


@dataclass(frozen=True)
class ResetTiming:
    """One reset: pages put back and integer nanoseconds per phase."""

    dirty_pages: int
    log_ns: int
    memory_ns: int
    vcpu_ns: int
    devices_ns: int
    total_ns: int

    def _repr_html_(self) -> str:
        from . import _html
        from .plot import RESET_PHASES, RESET_PHASE_COLORS

        values = {p: getattr(self, f"{p}_ns") for p in RESET_PHASES}
        note = f", {self.dirty_pages} dirty pages put back"
        return _html.phases("ResetTiming", values, RESET_PHASE_COLORS, self.total_ns, note, "kvmlab-reset-timing")


@dataclass(frozen=True)
class LoopResult:
    """One iteration of :meth:`reset_loop`."""

    reason: str
    exit_code: int
    checkpoint_tag: int
    crashed: bool
    run_ns: int
    reset_ns: int
    dirty_pages: int
    console_bytes: int


@dataclass(frozen=True)
class RunResult:
    """Why and how a :meth:`Vm.run` call ended.

    ``reason`` is ``"exit"`` (every vCPU wrote the exit port; ``exit_code`` is
    vCPU 0's code), ``"checkpoint"`` (every vCPU is at exit or checkpoint;
    ``checkpoint_tag`` is the first checkpointing vCPU's tag: the next
    ``run()`` resumes), ``"halt"`` (the vCPUs executed ``hlt``) or
    ``"timeout"`` (the deadline passed; the next ``run()`` resumes).
    ``console`` is the guest's output since the previous ``run()`` (UTF-8,
    undecodable bytes replaced); ``console_dropped`` counts bytes beyond the
    1 MiB kept per run. ``elapsed_ns`` is the run's wall time in nanoseconds.
    """

    reason: str
    exit_code: int
    checkpoint_tag: int
    console: str
    console_dropped: int
    elapsed_ns: int

    @property
    def lines(self) -> list[str]:
        """``console`` split into lines."""
        return self.console.splitlines()

    def __repr__(self) -> str:
        # The console stays out (it can be 1 MiB): its size only.
        from .units import fmt_time

        what = {"exit": f", exit_code={self.exit_code}", "checkpoint": f", checkpoint_tag={self.checkpoint_tag:#x}"}
        lines = self.console.count("\n") + (not self.console.endswith("\n") if self.console else 0)
        dropped = f", {self.console_dropped} dropped" if self.console_dropped else ""
        return (
            f"RunResult(reason={self.reason!r}{what.get(self.reason, '')}, elapsed={fmt_time(self.elapsed_ns)}, "
            f"console=<{lines} lines, {len(self.console)} chars{dropped}>)"
        )

    def _repr_html_(self, last_lines: int = 12) -> str:
        """The result, with the console folded to its last ``last_lines`` lines."""
        from . import _html
        from .units import fmt_time

        rows: list[tuple[str, object]] = [("reason", self.reason), ("elapsed", fmt_time(self.elapsed_ns))]
        if self.reason == "exit":
            rows.append(("exit code", self.exit_code))
        if self.reason == "checkpoint":
            rows.append(("checkpoint tag", f"{self.checkpoint_tag:#x}"))
        if self.console_dropped:
            rows.append(("console dropped", f"{self.console_dropped} bytes beyond the 1 MiB kept"))
        lines = self.lines
        folded = len(lines) - last_lines
        note = f"console: {len(lines)} lines" + (f", the last {last_lines} shown ({folded} folded)" if folded > 0 else "")
        body = _html.table(rows) + f"<div>{_html.escape(note)}</div>" + (_html.pre("\n".join(lines[-last_lines:])) if lines else "")
        return _html.box("RunResult", body, "kvmlab-run-result")


def _loop_result(r: Any) -> LoopResult:
    """One ``kvmlab_loop_result`` as a :class:`LoopResult`."""
    d: dict[str, Any] = _ffi.as_dict(r, "kvmlab_loop_result")
    return LoopResult(**{**d, "reason": REASONS.get(d["reason"], "?"), "crashed": bool(d["crashed"])})
