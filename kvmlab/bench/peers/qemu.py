"""QEMU (``-M microvm -accel kvm``) as a peer: restore of a saved VM with
``-incoming``, timed from process start to the guest running.

The guest is a tiny PVH ELF built here in Python (no assembler needed): QEMU's
microvm firmware enters it in 32-bit protected mode, paging off, through the
``XEN_ELFNOTE_PHYS32_ENTRY`` note. It writes one non-zero dword into each of
``fill_pages`` consecutive 4 KiB pages from 2 MiB (0 for a sparse guest; 25%
of RAM for a dense one, like kvmlab's memtouch), then halts (``hlt`` with
interrupts off, looping). The machine code (GNU as, Intel syntax)::

    _start: cli
            mov  edi, 0x200000          ; bf 00 00 20 00
            mov  ecx, FILL_PAGES        ; b9 <imm32>        (offset 7)
            test ecx, ecx
            jz   halt
    fill:   mov  eax, edi
            xor  eax, 0x5a5a5a5a
            mov  [edi], eax
            add  edi, 4096
            dec  ecx
            jnz  fill
    halt:   hlt
            jmp  halt

The saved VM: boot, wait until the vCPU is halted (``info registers`` shows
``HLT=1``), QMP ``stop``, ``migrate`` to a file (``exec:cat > FILE``, the path quoted). The
restore: ``qemu-system-x86_64 <same options> -incoming fd:N`` with the file
open as fd N, QMP over stdio; time from ``Popen`` to QMP ``query-status`` ==
``running`` (the source was stopped, so the incoming VM ends paused and gets a
``cont``, counted in the time).

QEMU is not installed by kvmlab: ``apt-get install qemu-system-x86`` (Debian,
Ubuntu). Without it the rows are skipped with that message. Every QMP read
has a timeout (:data:`QMP_TIMEOUT_S`): a stuck QEMU fails its rows, it does
not hang the run.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from ..harness import DENSE_FRACTION

if TYPE_CHECKING:
    from ..harness import Progress

__all__ = ["pvh_elf", "QemuPeer", "qemu_problem", "qemu_version", "migrate_uri", "QmpChannel", "QmpError",
           "QmpTimeoutError", "INSTALL_HINT", "QMP_TIMEOUT_S"]

INSTALL_HINT = "install QEMU with: apt-get install qemu-system-x86 (Debian/Ubuntu; the package kvmlab's benchmark uses)"

FILL_START = 0x200000
LOAD_ADDR = 0x100000
_CODE = bytes.fromhex("fabf00002000b97856341285c9741289f8355a5a5a5a890781c700100000" "4975eef4ebfd")
_FILL_OFFSET = 7
XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_elf(fill_pages: int) -> bytes:
    """A 32-bit ELF executable loaded at 1 MiB with a PVH entry note."""
    if fill_pages < 0 or fill_pages >= 1 << 31:
        raise ValueError("fill_pages out of range")
    code = bytearray(_CODE)
    code[_FILL_OFFSET:_FILL_OFFSET + 4] = fill_pages.to_bytes(4, "little")
    ehdr_size, phdr_size, nph = 52, 32, 2
    code_off = ehdr_size + nph * phdr_size  # 116
    note_off = code_off + len(code)
    note_off += (-note_off) % 4
    entry = LOAD_ADDR + code_off
    note = struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack("<I", entry)
    total = note_off + len(note)
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)  # ELFCLASS32, little-endian, version 1, SysV
    ehdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, nph, 0, 0, 0)
    # PT_LOAD of the whole file at 1 MiB (R+X), PT_NOTE for the entry note.
    load = struct.pack("<IIIIIIII", 1, 0, LOAD_ADDR, LOAD_ADDR, total, total, 5, 0x1000)
    pnote = struct.pack("<IIIIIIII", 4, note_off, LOAD_ADDR + note_off, LOAD_ADDR + note_off, len(note), len(note), 4, 4)
    out = bytearray(ehdr + load + pnote + code)
    out += bytes(note_off - len(out))
    out += note
    assert len(out) == total
    return bytes(out)


def qemu_problem(binary: str = "qemu-system-x86_64") -> str | None:
    """None when ``binary`` runs, else why not (with how to install it)."""
    path = shutil.which(binary)
    if path is None:
        return f"{binary} not found; {INSTALL_HINT}"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} --version failed: {e}"
    if out.returncode != 0:
        return f"{binary} --version failed: {out.stderr.strip()[:300]}"
    return None


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


class QmpError(RuntimeError):
    """QEMU failed, exited, or answered QMP with an error."""


class QmpTimeoutError(QmpError, TimeoutError):
    """QEMU did not answer QMP in time (a stuck QEMU must not hang ``bench all``)."""


#: Longest wait for one QMP answer (s).
QMP_TIMEOUT_S = 30.0
#: Largest QMP message read (bytes): an answer longer than this is an error, not a hang.
QMP_MAX_LINE_BYTES = 1 << 20


def migrate_uri(state: Path) -> str:
    """The QMP ``migrate`` URI that writes the VM's state to ``state``: QEMU
    runs the text after ``exec:`` with ``/bin/sh -c``, so the path is quoted."""
    return f"exec:cat > {shlex.quote(str(state))}"


class QmpChannel:
    """QMP (one JSON object per line) over a readable fd and a writable file,
    every read bounded by ``timeout_s``: :class:`QmpTimeoutError` instead of
    waiting forever. ``on_eof()`` says why the other side went away."""

    def __init__(self, rfd: int, wfile: IO[bytes], timeout_s: float = QMP_TIMEOUT_S,
                 on_eof: Callable[[], str] | None = None) -> None:
        assert timeout_s > 0, timeout_s
        self.rfd, self.wfile, self.timeout_s = rfd, wfile, timeout_s
        self.on_eof = on_eof or (lambda: "QMP channel closed")
        self._buf = b""

    def _line(self) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeoutError(f"QEMU did not answer QMP within {self.timeout_s:g} s; it is stuck or too "
                                      "slow here: check that it runs (qemu-system-x86_64 -accel kvm) on this host")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.rfd, 65536)
            except OSError as e:
                raise QmpError(f"{self.on_eof()} ({e.strerror})") from None
            if not chunk:
                raise QmpError(self.on_eof())
            self._buf += chunk
            if len(self._buf) > QMP_MAX_LINE_BYTES:
                raise QmpError(f"a QMP message over {QMP_MAX_LINE_BYTES} bytes; not a QMP monitor?")
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def read(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            line = self._line().strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise QmpError(f"not a QMP message: {line[:200]!r}") from None
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **arguments: Any) -> Any:
        req = {"execute": name, "arguments": arguments} if arguments else {"execute": name}
        self.wfile.write((json.dumps(req) + "\n").encode())
        self.wfile.flush()
        msg = self.read()
        if "error" in msg:
            raise QmpError(f"QMP {name}: {msg['error'].get('desc', msg['error'])}")
        return msg.get("return")


class _Qemu:
    """A QEMU process with its QMP monitor on stdin/stdout."""

    def __init__(self, argv: list[str], pass_fds: tuple[int, ...] = (), timeout_s: float = QMP_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  bufsize=0, pass_fds=pass_fds)
        try:
            self.qmp = QmpChannel(self.p.stdout.fileno(), self.p.stdin, timeout_s, self._exited)  # type: ignore[union-attr,arg-type]
            self.greeting = self.qmp.read()
            self.qmp.cmd("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _exited(self) -> str:
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "QEMU closed its QMP channel but did not exit"
        err = self.p.stderr.read().decode(errors="replace").strip() if self.p.stderr else ""
        return f"QEMU exited (code {self.p.returncode}): {err[-800:] or 'no message'}"

    def cmd(self, name: str, **arguments: Any) -> Any:
        return self.qmp.cmd(name, **arguments)

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(b'{"execute": "quit"}\n')  # type: ignore[union-attr]
                self.p.stdin.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
            try:
                self.p.wait(timeout=min(10.0, self.timeout_s))
            except subprocess.TimeoutExpired:  # stuck: it does not get to hang the run
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                if f:
                    f.close()
            except OSError:
                pass


class QemuPeer:
    """Saved VMs of given sizes/densities and timed ``-incoming`` restores."""

    def __init__(self, work_dir: Path, binary: str = "qemu-system-x86_64", qmp_timeout_s: float = QMP_TIMEOUT_S) -> None:
        self.dir = Path(work_dir)
        self.qmp_timeout_s = qmp_timeout_s
        self.binary = shutil.which(binary) or binary
        self.version = qemu_version(self.binary)

    def argv(self, kernel: Path, memory_mib: int) -> list[str]:
        return [
            self.binary, "-M", "microvm", "-accel", "kvm", "-m", f"{memory_mib}M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-kernel", str(kernel),
            "-chardev", "stdio,id=qmp", "-mon", "chardev=qmp,mode=control",
        ]

    def save(self, memory_mib: int, fill_fraction: float, timeout_s: float = 120.0) -> dict[str, Any]:
        """Boots the guest, waits for it to halt after filling, stops it and
        migrates it to a file. Returns {"kernel", "state", "fill_pages", ...}."""
        total_pages = (memory_mib << 20) // 4096
        fill = int(total_pages * fill_fraction)
        fill = min(fill, ((memory_mib << 20) - FILL_START) // 4096)
        tag = f"{memory_mib}mib-{fill}p"
        kernel = self.dir / f"pvh-{tag}.elf"
        state = self.dir / f"qemu-{tag}.migstate"
        try:  # a failed (or interrupted) save leaves no file behind
            kernel.write_bytes(pvh_elf(fill))
            return self._save(kernel, state, memory_mib, fill, timeout_s)
        except BaseException:
            for f in (state, kernel):
                f.unlink(missing_ok=True)
            raise

    def _save(self, kernel: Path, state: Path, memory_mib: int, fill: int, timeout_s: float) -> dict[str, Any]:
        t0 = time.monotonic()
        q = _Qemu(self.argv(kernel, memory_mib), timeout_s=self.qmp_timeout_s)
        try:
            while True:
                regs = q.hmp("info registers")
                if "HLT=1" in regs:
                    break
                if time.monotonic() - t0 > timeout_s:
                    raise QmpError(f"the PVH guest did not halt within {timeout_s} s; registers: {regs[:400]}")
                time.sleep(0.02)
            boot_s = time.monotonic() - t0
            q.cmd("stop")
            q.cmd("migrate", uri=migrate_uri(state))
            while True:
                info = q.cmd("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > timeout_s:
                    raise QmpError("migration to the file did not finish")
                time.sleep(0.005)
            if info.get("status") != "completed":
                raise QmpError(f"migration to the file {info.get('status')}: {info.get('error-desc', '')}")
        finally:
            q.close()
        ram = info.get("ram", {})
        return {
            "kernel": kernel, "state": state, "fill_pages": fill, "boot_s": boot_s,
            "state_bytes": state.stat().st_size, "ram_normal_pages": ram.get("normal"),
            "ram_zero_pages": ram.get("duplicate"),
        }

    def restore_once(self, saved: dict[str, Any], memory_mib: int, check: bool = False,
                     timeout_s: float = 120.0, prestarted: bool = False) -> int:
        """One ``-incoming`` restore; nanoseconds from process start to running.
        ``prestarted``: the pooled analogue, a QEMU started (untimed) with
        ``-incoming defer``, timed from QMP ``migrate-incoming`` to running."""
        fd = os.open(saved["state"], os.O_RDONLY)
        try:
            t0 = time.perf_counter_ns()
            deadline = time.monotonic() + timeout_s
            incoming = "defer" if prestarted else f"fd:{fd}"
            q = _Qemu(self.argv(saved["kernel"], memory_mib) + ["-incoming", incoming], pass_fds=(fd,),
                      timeout_s=self.qmp_timeout_s)
            try:
                if prestarted:
                    t0 = time.perf_counter_ns()
                    q.cmd("migrate-incoming", uri=f"fd:{fd}")
                while True:
                    status = q.cmd("query-status")["status"]
                    if status == "running":
                        break
                    if time.monotonic() > deadline:
                        raise QmpTimeoutError(f"the incoming VM was still {status!r} after {timeout_s:g} s")
                    if status in ("paused", "postmigrate", "prelaunch"):
                        q.cmd("cont")
                    elif status != "inmigrate":
                        raise QmpError(f"incoming VM is in state {status!r}")
                    else:
                        time.sleep(0.0002)
                took = time.perf_counter_ns() - t0
                if check:
                    regs = q.hmp("info registers")
                    if "HLT=1" not in regs:
                        raise QmpError("the restored guest is not at its halt loop")
            finally:
                q.close()
        finally:
            os.close(fd)
        return took

    def measure(self, memory_mib: int, density: str, reps: int, progress: Progress | None = None,
                modes: tuple[str, ...] = ("cold",)) -> list[dict[str, Any]]:
        """Saves a VM of ``memory_mib`` (dense: DENSE_FRACTION of its RAM
        filled, like kvmlab's dense snapshots) and restores it ``reps`` times
        per mode (``cold``: process start to running; ``prestarted``: see
        :meth:`restore_once`), interleaved; one record per restore
        (``restore_ns``, ``mode``)."""
        saved = self.save(memory_mib, DENSE_FRACTION if density == "dense" else 0.0)  # removes its files if it fails
        try:
            if progress is not None:
                progress.update(1)
            out = []
            for i in range(reps):
                for mode in modes:
                    ns = self.restore_once(saved, memory_mib, check=(i == 0), prestarted=mode == "prestarted")
                    out.append({"i": i, "mode": mode, "restore_ns": ns, "fill_pages": saved["fill_pages"],
                                "state_bytes": saved["state_bytes"], "version": self.version})
                    if progress is not None:
                        progress.update(1)
            return out
        finally:
            for f in (saved["state"], saved["kernel"]):
                Path(f).unlink(missing_ok=True)
