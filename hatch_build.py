"""Hatchling build hook: compile the Zig core and put it into the package.

Runs ``<python> -m ziglang build -Dcpu=baseline --release=safe --prefix <tmp>``
(``ziglang==0.17.1`` comes from ``[build-system] requires``) and then

* for a regular wheel: force-includes the fresh artifacts as
  ``kvmlab/_native/libkvmlab.so``, ``kvmlab/_native/kvmlab.h`` and
  ``kvmlab/_native/guests/<name>.bin`` and tags the wheel
  ``py3-none-<platform>`` (no CPython extension: cffi ABI mode);
* for an editable install (``pip install -e .``): replaces
  ``kvmlab/_native/`` in the source tree (git-ignored) with them.

Environment knobs:
  KVMLAB_ZIG_ARGS    extra arguments for ``zig build`` (split on whitespace),
                     e.g. ``-Dcpu=native`` for a local experiment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NATIVE = "kvmlab/_native"
LIBRARY = "libkvmlab.so"
HEADER = "kvmlab.h"
TESTING_HEADER = "kvmlab_testing.h"  # the testing export group (kvmlab bench, fault tests)


def _platform_tag() -> str:
    # e.g. "linux-x86_64" -> "linux_x86_64"
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


class ZigBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        self._tmp = Path(tempfile.mkdtemp(prefix="kvmlab-zig-"))
        prefix = self._tmp / "prefix"
        artifacts = self._zig_build(root, prefix)

        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-{_platform_tag()}"

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
        sdk = [(root / "zigsrc" / "guests" / n, f"guest_sdk/{n}") for n in ("rt.zig", "guest.ld")]
        return [(lib, LIBRARY), (header, HEADER), (testing_header, TESTING_HEADER)] + [(g, f"guests/{g.name}") for g in guests] + sdk
