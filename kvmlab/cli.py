"""The ``kvmlab`` command line: ``kvmlab doctor``, ``kvmlab demo``,
``kvmlab snapshot info PATH``.

Each subcommand is a function ``cmd_<name>(args) -> int`` registered in
:func:`build_parser`; add new ones there.

Plug-in commands: a module listed in :data:`PLUGIN_MODULES` (``kvmlab.bench``)
that exists is imported, and its ``add_parser(subparsers)`` adds its own
subcommand(s) to the ``argparse`` subparsers object, setting
``func=<handler>`` with ``set_defaults`` (``handler(args) -> int``, the exit
code). If such a module exists but fails to import, its command still
appears and reports the import error, so the other commands keep working.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Sequence

__all__ = [
    "main",
    "build_parser",
    "REQUIRED_CAPS",
    "INFO_CAPS",
    "PLUGIN_MODULES",
    "cpl_loop_image",
    "snapshot_header",
]

#: KVM capabilities kvmlab needs: (name, KVM_CAP_* number).
REQUIRED_CAPS = [
    ("IRQCHIP", 0),
    ("USER_MEMORY", 3),
    ("EXT_CPUID", 7),
    ("MP_STATE", 14),
    ("PIT2", 33),
    ("IMMEDIATE_EXIT", 136),
]
#: Capabilities shown for information (snapshot features, limits).
INFO_CAPS = [
    ("XSAVE", 55),
    ("XSAVE2", 208),
    ("XCRS", 56),
    ("VCPU_EVENTS", 41),
    ("DEBUGREGS", 50),
    ("ADJUST_CLOCK", 39),
    ("GET_TSC_KHZ", 61),
    ("MANUAL_DIRTY_LOG_PROTECT2", 168),
    ("DIRTY_LOG_RING", 192),
    ("MAX_VCPUS", 66),
    ("NR_MEMSLOTS", 10),
]

#: Loop iterations of the CPL probe (two instructions each).
CPL_PROBE_ITERATIONS = 100_000
#: CPL0/CPL3 time ratio above which CPL0 counts as emulated.
CPL_EMULATED_RATIO = 10.0


def cpl_loop_image(iterations: int) -> bytes:
    """x86_64: ``mov ecx, N; 1: dec ecx; jnz 1b; mov dx, 0x500; xor eax, eax; out dx, eax``."""
    return (
        b"\xb9" + iterations.to_bytes(4, "little")  # mov ecx, N
        + b"\xff\xc9"  # dec ecx
        + b"\x75\xfc"  # jnz -4
        + b"\x66\xba\x00\x05"  # mov dx, 0x500
        + b"\x31\xc0"  # xor eax, eax
        + b"\xef"  # out dx, eax
    )


class _Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, check: str, status: str, detail: str = "") -> None:
        self.rows.append((check, status, detail))

    def render(self) -> str:
        w0 = max(len(r[0]) for r in self.rows)
        w1 = max(len(r[1]) for r in self.rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in self.rows)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def cmd_doctor(args: argparse.Namespace) -> int:
    """Checks whether kvmlab can run here; exit code 0 when it can."""
    t = _Table()
    ok = True

    # The native core.
    try:
        from . import _ffi
    except ImportError as e:
        t.add("native core", "MISSING", str(e))
        print(t.render())
        return 1
    t.add("native core", "ok", f"{_ffi.LIBRARY_PATH} (ABI {_ffi.ABI_VERSION})")

    # /dev/kvm.
    dev = "/dev/kvm"
    if not os.path.exists(dev):
        t.add("/dev/kvm", "MISSING", "no KVM: enable virtualization (VT-x/AMD-V, nested) and load kvm_intel/kvm_amd")
        print(t.render())
        return 1
    if not os.access(dev, os.R_OK | os.W_OK):
        t.add("/dev/kvm", "NO ACCESS", "add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again)")
        print(t.render())
        return 1
    t.add("/dev/kvm", "ok", "present and accessible")

    from .errors import KvmlabError

    ffi, lib = _ffi.ffi, _ffi.lib
    info = ffi.new("kvmlab_host_info *")
    try:
        _ffi.check(lib.kvmlab_host_info_get(info))
    except KvmlabError as e:
        t.add("KVM API", "FAILED", str(e))
        print(t.render())
        return 1
    t.add("KVM API version", "ok" if info.api_version == 12 else "UNUSUAL", str(info.api_version))
    t.add("host CPUID entries", "ok", str(info.cpuid_entries))

    value = ffi.new("uint64_t *")

    def cap(number: int) -> int | None:
        try:
            _ffi.check(lib.kvmlab_host_check_extension(number, value))
        except KvmlabError:
            return None
        return int(value[0])

    for name, number in REQUIRED_CAPS:
        v = cap(number)
        if v:
            t.add(f"cap {name}", "ok", f"required ({v})")
        else:
            ok = False
            t.add(f"cap {name}", "MISSING", "required by kvmlab")
    for name, number in INFO_CAPS:
        v = cap(number)
        t.add(f"cap {name}", "yes" if v else "no", f"{v}" if v else "optional")

    # Boot a guest at CPL3 and CPL0: does kvmlab run, and is CPL0 emulated?
    from .vm import Vm

    times: dict[int, int] = {}
    for cpl in (3, 0):
        try:
            with Vm.boot(cpl_loop_image(CPL_PROBE_ITERATIONS), cpl=cpl) as vm:
                r = vm.run(timeout_s=30.0)
        except KvmlabError as e:
            t.add(f"guest at CPL{cpl}", "FAILED", str(e))
            if cpl == 3:
                ok = False
            continue
        if r.reason != "exit" or r.exit_code != 0:
            t.add(f"guest at CPL{cpl}", "FAILED", f"reason {r.reason}, exit code {r.exit_code}")
            if cpl == 3:
                ok = False
            continue
        times[cpl] = r.elapsed_ns
        t.add(f"guest at CPL{cpl}", "ok", f"{CPL_PROBE_ITERATIONS} loop iterations in {_ms(r.elapsed_ns)}")
    if 3 in times and 0 in times:
        ratio = times[0] / max(times[3], 1)
        if ratio > CPL_EMULATED_RATIO:
            t.add("CPL0 speed", "emulated", f"CPL0 emulated (ratio {ratio:.0f}x): keep CPL0 guests short; CPL3 runs natively")
        else:
            t.add("CPL0 speed", "native", f"CPL0 native (ratio {ratio:.1f}x)")

    print(t.render())
    print()
    print("kvmlab can run on this host." if ok else "kvmlab cannot run on this host: fix the rows above.")
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Boots the counter guest, runs to its checkpoint, then to the exit."""
    from .config import VmConfig
    from .errors import KvmlabError
    from .vm import Vm

    steps, at = args.steps, args.checkpoint_at
    cfg = VmConfig(memory_mib=args.memory_mib, vcpus=args.vcpus)
    try:
        with Vm.boot("counter", cfg, args={"steps": steps, "checkpoint_at": at}) as vm:
            first = vm.run(timeout_s=10.0)
            results = [first]
            if first.reason == "checkpoint":
                results.append(vm.run(timeout_s=10.0))
    except KvmlabError as e:
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        print("run `kvmlab doctor` to check this host", file=sys.stderr)
        return 1
    console = "".join(r.console for r in results)
    lines = console.splitlines()
    print(f"guest:    counter (steps={steps} checkpoint_at={at})")
    print(f"memory:   {cfg.memory_mib} MiB, vcpus: {cfg.vcpus}")
    for i, r in enumerate(results, 1):
        detail = f"tag {r.checkpoint_tag}" if r.reason == "checkpoint" else f"code {r.exit_code}"
        print(f"run {i}:    {r.reason} ({detail}) in {_ms(r.elapsed_ns)}")
    print(f"console:  {len(lines)} lines, last ones:")
    for line in lines[-args.lines:]:
        print(f"  | {line}")
    last = results[-1]
    return 0 if last.reason == "exit" and last.exit_code == 0 else 1


def snapshot_header(raw: bytes) -> dict[str, Any]:
    """Decodes a snapshot file's header (``kvmlab_snapshot_header`` of the C
    ABI, read through cffi; names of kinds and arches from its enums) for
    display. It checks nothing: call it only on a file
    :meth:`kvmlab.Snapshot.load` accepted."""
    from . import _ffi

    h = _ffi.struct_from_bytes("kvmlab_snapshot_header", raw)
    kinds = _ffi.enum_names("kvmlab_section_kind")
    arches = _ffi.enum_names("kvmlab_arch")
    packed = _ffi.enum_values("kvmlab_snapshot_flag")["packed_memory"]
    sections = []
    for i in range(min(h.section_count, len(h.sections))):
        e = h.sections[i]
        kind = kinds.get(e.kind, f"kind {e.kind}").upper()
        sections.append({"index": i, "kind": kind, "offset": e.offset, "bytes": e.bytes, "crc32c": e.crc32c})
    return {
        "magic": bytes(h.magic).decode("ascii", "replace"),
        "version": f"{h.version_major}.{h.version_minor}",
        "arch": arches.get(h.arch, f"arch {h.arch}"),
        "header_bytes": h.header_bytes,
        "memory_bytes": h.memory_bytes,
        "vcpus": h.vcpus,
        "flags": h.flags,
        "layout": "packed" if h.flags & packed else "full",
        "created_unix_ns": h.created_unix_ns,
        "total_bytes": h.total_bytes,
        "present_pages": h.present_pages,
        "header_crc32c": h.header_crc32c,
        "sections": sections,
    }


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def cmd_snapshot_info(args: argparse.Namespace) -> int:
    """Loads a snapshot file (every check, every checksum) and prints its
    header and sections; exit code 1 with the reason if it is not valid."""
    from .errors import KvmlabError
    from .snapshot import Snapshot

    path = args.path
    try:
        with Snapshot.load(path) as snap:
            info = snap.info()
            st = os.stat(path)
            with open(path, "rb") as f:
                hdr = snapshot_header(f.read(4096))
    except (KvmlabError, OSError, ValueError) as e:
        print(f"kvmlab snapshot info: {e}", file=sys.stderr)
        return 1
    # The header was read again after load() checked the file: make sure it
    # is the same file (not replaced in between) before showing its fields.
    same = (hdr["memory_bytes"], hdr["vcpus"], hdr["present_pages"], hdr["created_unix_ns"]) == (
        info["memory_bytes"], info["vcpus"], info["present_pages"], info["created_unix_ns"]
    )
    if not same:
        print(f"kvmlab snapshot info: {path} changed while it was being read; try again", file=sys.stderr)
        return 1
    pages = info["memory_bytes"] // 4096
    status = "ok"  # load() verified the header and every section checksum
    if args.json:
        out = dict(info)
        out.update(
            version=hdr["version"],
            arch=hdr["arch"],
            layout=hdr["layout"],
            file_bytes=st.st_size,
            header_crc32c=hdr["header_crc32c"],
            header_status=status,
            sections=[dict(s, status=status) for s in hdr["sections"]],
        )
        print(json.dumps(out, indent=2))
        return 0
    layout = "full (all-zero pages are holes)" if hdr["layout"] == "full" else "packed (present pages only)"
    rows = [
        ("file", str(path)),
        ("version", hdr["version"]),
        ("arch", hdr["arch"]),
        ("guest", info["guest"] or "(unnamed)"),
        ("memory", f"{info['memory_bytes'] >> 20} MiB ({info['memory_bytes']} bytes, {pages} pages)"),
        ("vcpus", str(info["vcpus"])),
        ("created", info["created_at"]),
        ("layout", layout),
        ("present pages", f"{info['present_pages']} of {pages} ({_size(info['present_pages'] * 4096)})"),
        ("stored bytes", f"{info['stored_bytes']} ({_size(info['stored_bytes'])} on disk; file size {st.st_size})"),
        ("state bytes", str(info["state_bytes"])),
        ("header crc32c", f"0x{hdr['header_crc32c']:08x} {status}"),
    ]
    w = max(len(k) for k, _ in rows) + 1
    for k, v in rows:
        print(f"{k + ':':<{w}} {v}")
    print("sections:")
    table = [("#", "kind", "offset", "bytes", "crc32c", "check")] + [
        (str(s["index"]), s["kind"], str(s["offset"]), str(s["bytes"]), f"0x{s['crc32c']:08x}", status)
        for s in hdr["sections"]
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  " + "  ".join(f"{c:<{widths[i]}}" for i, c in enumerate(r)).rstrip())
    return 0


#: Optional modules that add subcommands (see the module docstring).
PLUGIN_MODULES = ("kvmlab.bench",)


def _add_plugins(sub: Any) -> None:
    for name in PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
        except (ImportError, ValueError):
            continue
        try:
            mod = importlib.import_module(name)
            add_parser = mod.add_parser
        except Exception as e:  # noqa: BLE001 - keep the other commands usable
            command = name.rsplit(".", 1)[-1]
            msg = f"{command} is unavailable: importing {name} failed: {type(e).__name__}: {e}"

            def broken(_args: argparse.Namespace, msg: str = msg) -> int:
                print(f"kvmlab: {msg}", file=sys.stderr)
                return 1

            sp = sub.add_parser(command, help=f"(unavailable: {type(e).__name__})", description=msg)
            sp.set_defaults(func=broken)
            continue
        add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmlab", description="KVM VM snapshot/restore experiments.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    add("doctor", cmd_doctor, "check that KVM works for kvmlab on this host")
    demo = add("demo", cmd_demo, "boot the counter guest, run to a checkpoint, continue to exit")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--checkpoint-at", type=int, default=10)
    demo.add_argument("--memory-mib", type=int, default=64)
    demo.add_argument("--vcpus", type=int, default=1)
    demo.add_argument("--lines", type=int, default=5, help="console lines to show")

    snap = sub.add_parser("snapshot", help="inspect snapshot files", description="inspect snapshot files")
    snap_sub = snap.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")
    snap_sub.required = True
    info = snap_sub.add_parser(
        "info",
        help="check a snapshot file and print its header and sections",
        description="Loads a snapshot file (running every check and checksum) and prints its header "
        "and sections. Exit code 1, with the reason, when the file is not a valid snapshot.",
    )
    info.add_argument("path", metavar="PATH", help="a file written by Snapshot.save")
    info.add_argument("--json", action="store_true", help="print the fields as JSON")
    info.set_defaults(func=cmd_snapshot_info)

    _add_plugins(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
