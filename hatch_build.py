"""Hatchling build hook: compile the Zig core and put it into the package.

Runs ``<python> -m ziglang build -Dtarget=x86_64-linux-gnu.2.28 -Dcpu=baseline
--release=safe --prefix <tmp>`` (``ziglang==0.17.1`` comes from
``[build-system] requires``) and then

* for a regular wheel: force-includes the fresh artifacts as
  ``kvmlab/_native/libkvmlab.so``, ``kvmlab/_native/kvmlab.h`` and
  ``kvmlab/_native/guests/<name>.bin`` and tags the wheel
  ``py3-none-manylinux_2_28_x86_64`` (no CPython extension: cffi ABI mode);
* for an editable install (``pip install -e .``): replaces
  ``kvmlab/_native/`` in the source tree (git-ignored) with them.

The target is explicit so the wheel runs on every glibc >= 2.28 distribution
(Debian 10+/11, Ubuntu 20.04+, RHEL 8+), whatever the build machine's glibc:
Zig links against its own glibc 2.28 symbol stubs, and Zig's std uses no newer
libc function when told the target glibc is 2.28 (with 2.36 it calls
``arc4random_buf``). ``-Dcpu=baseline``: no instruction beyond x86-64 v1.
The core is x86_64 KVM code (ioctl numbers, register layouts), so a build on
any other machine or OS is refused here, before Zig starts.

Environment knobs:
  KVMLAB_ZIG_ARGS    extra arguments for ``zig build`` (split on whitespace),
                     e.g. ``-Dcpu=native`` for a local experiment (such a wheel
                     keeps its manylinux tag but runs only on CPUs like this one:
                     never publish it).
"""

from __future__ import annotations

import ast
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NATIVE = "kvmlab/_native"
LIBRARY = "libkvmlab.so"
HEADER = "kvmlab.h"
TESTING_HEADER = "kvmlab_testing.h"  # the testing export group (kvmlab bench, fault tests)


#: The oldest glibc the library links against; the wheel tag says the same.
GLIBC = (2, 28)
ZIG_TARGET = f"x86_64-linux-gnu.{GLIBC[0]}.{GLIBC[1]}"
WHEEL_TAG = f"py3-none-manylinux_{GLIBC[0]}_{GLIBC[1]}_x86_64"


def _guest_sdk_files(root: Path) -> tuple[str, ...]:
    """kvmlab.guests.GUEST_SDK_FILES, read from its source (the package is
    not importable while it is being built)."""
    tree = ast.parse((root / "kvmlab" / "guests.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "GUEST_SDK_FILES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("kvmlab: GUEST_SDK_FILES not found in kvmlab/guests.py")


def _refuse_foreign_machine() -> None:
    """kvmlab's core drives x86_64 KVM: stop early, with the reason, elsewhere."""
    machine = platform.machine()
    if sys.platform != "linux" or machine not in ("x86_64", "AMD64"):
        raise RuntimeError(
            f"kvmlab: cannot build on {sys.platform}/{machine}: kvmlab's core drives x86_64 KVM "
            f"and is built only on x86_64 Linux (it needs /dev/kvm of an x86_64 host at run time too). "
            f"Install the manylinux x86_64 wheel on an x86_64 Linux machine instead."
        )


class ZigBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        _refuse_foreign_machine()
        root = Path(self.root)
        self._tmp = Path(tempfile.mkdtemp(prefix="kvmlab-zig-"))
        prefix = self._tmp / "prefix"
        artifacts = self._zig_build(root, prefix)

        build_data["pure_python"] = False
        build_data["tag"] = WHEEL_TAG

        if version == "editable":
            dest = root / NATIVE
            if dest.exists():
                shutil.rmtree(dest)
            for src, rel in artifacts:
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
            self.app.display_info(f"kvmlab: copied {len(artifacts)} native artifacts to {dest}")
        else:
            for src, rel in artifacts:
                build_data["force_include"][str(src)] = f"{NATIVE}/{rel}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _zig_build(self, root: Path, prefix: Path) -> list[tuple[Path, str]]:
        """Runs zig build; returns (built file, path under kvmlab/_native)."""
        extra = os.environ.get("KVMLAB_ZIG_ARGS", "").split()
        cmd = [
            sys.executable, "-m", "ziglang", "build",
            f"-Dtarget={ZIG_TARGET}",
            "-Dcpu=baseline",
            "--release=safe",
            "--prefix", str(prefix),
            *extra,
        ]
        self.app.display_info("kvmlab: " + " ".join(cmd))
        self.app.display_info("kvmlab: compiling the Zig core (a cold build takes ~2 minutes)")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout)
            raise RuntimeError(
                f"kvmlab: `{' '.join(cmd)}` failed with exit code {proc.returncode} "
                f"(output above); needs ziglang==0.17.1"
            )
        self.app.display_info(f"kvmlab: zig build finished in {time.monotonic() - t0:.1f} s")

        lib = prefix / "lib" / LIBRARY
        header = prefix / "include" / HEADER
        testing_header = prefix / "include" / TESTING_HEADER
        guests = sorted((prefix / "guests").glob("*.bin"))
        missing = [str(p) for p in (lib, header, testing_header) if not p.is_file()]
        if missing:
            raise RuntimeError(f"kvmlab: zig build did not produce {', '.join(missing)}")
        if not guests and "-Dguests=false" not in extra:
            raise RuntimeError(f"kvmlab: zig build produced no guest images in {prefix / 'guests'}")
        # The guest SDK (runtime + linker script) lets kvmlab.guests.build_zig
        # compile user guests from an installed wheel.
        sdk = [(root / "zigsrc" / "guests" / n, f"guest_sdk/{n}") for n in _guest_sdk_files(root)]
        return [(lib, LIBRARY), (header, HEADER), (testing_header, TESTING_HEADER)] + [(g, f"guests/{g.name}") for g in guests] + sdk
