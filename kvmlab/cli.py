"""The ``kvmlab`` command line: ``kvmlab doctor``, ``kvmlab demo``,
``kvmlab snapshot info PATH``.

Each subcommand is a function ``cmd_<name>(args) -> int`` registered in
:func:`build_parser`; add new ones there.

Plug-in commands: a module listed in :data:`PLUGIN_MODULES` (``kvmlab.bench``, ``kvmlab.campaign``)
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

from .doctor import INFO_CAPS, REQUIRED_CAPS, cpl_loop_image  # re-exported (older imports)

__all__ = [
    "main",
    "build_parser",
    "version_text",
    "REQUIRED_CAPS",
    "INFO_CAPS",
    "PLUGIN_MODULES",
    "cpl_loop_image",
    "snapshot_header",
]


def cmd_doctor(args: argparse.Namespace) -> int:
    """Prints :func:`kvmlab.doctor` (``--json``: its ``to_dict()``); exit code 0
    when kvmlab can run here."""
    from .doctor import doctor

    report = doctor()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_text())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Runs :func:`kvmlab.demo.run_demo` and prints its report."""
    from .demo import run_demo
    from .errors import KvmlabError

    print(f"kvmlab demo: restore the service guest from a snapshot, {args.n} times per path")
    try:
        result = run_demo(n=args.n, memory_mib=args.memory_mib, pool_size=args.pool_size)
    except KvmlabError as e:
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        print("run `kvmlab doctor` to check this host", file=sys.stderr)
        return 1
    print(result.to_text())
    return 0


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


def cmd_snapshot_info(args: argparse.Namespace) -> int:
    """Loads a snapshot file (every check, every checksum) and prints its
    header and sections; exit code 1 with the reason if it is not valid."""
    from .errors import KvmlabError
    from .snapshot import Snapshot
    from .units import fmt_size

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
        ("present pages", f"{info['present_pages']} of {pages} ({fmt_size(info['present_pages'] * 4096)})"),
        ("stored bytes", f"{info['stored_bytes']} ({fmt_size(info['stored_bytes'])} on disk; file size {st.st_size})"),
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
PLUGIN_MODULES = ("kvmlab.bench", "kvmlab.campaign")


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


def version_text() -> str:
    """``kvmlab 0.1.0 (core ABI 1, built with Zig 0.17.1)``: what a bug report needs.

    Reads the ABI and Zig versions from the loaded library itself (not from
    the Python side's expectations), so a mismatched build shows.
    """
    from ._version import __version__

    try:
        from . import _ffi
    except ImportError as e:
        return f"kvmlab {__version__} (native core not loadable: {e})"
    zig = _ffi.ffi.string(_ffi.lib.kvmlab_zig_version()).decode("ascii", errors="replace")
    return f"kvmlab {__version__} (core ABI {int(_ffi.lib.kvmlab_abi_version())}, built with Zig {zig})"


class _VersionAction(argparse.Action):
    """``--version``: prints :func:`version_text` and exits (loads the core only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmlab", description="KVM VM snapshot/restore experiments.")
    p.add_argument("--version", action=_VersionAction, help="print kvmlab's, the core's ABI and Zig versions, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    doc = add("doctor", cmd_doctor, "check that KVM works for kvmlab on this host, and what limits it")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    demo = add("demo", cmd_demo, "restore the service guest from a snapshot, unpooled, pooled and prepared, and time it")
    demo.add_argument("--n", type=int, default=100, help="restores per path (default 100)")
    demo.add_argument("--memory-mib", type=int, default=64)
    demo.add_argument("--pool-size", type=int, default=8, help="warm shells in the pool (default 8)")

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
