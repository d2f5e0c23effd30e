"""Helpers for the notebook and browser tests: a Jupyter kernel that imports
the kvmlab under test."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import kvmlab

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
#: The directory holding the kvmlab package under test (the source tree for an
#: editable install, site-packages otherwise).
PACKAGE_PARENT = Path(kvmlab.__file__).resolve().parent.parent


def make_jupyter_path(root: Path) -> Path:
    """Writes a ``python3`` kernelspec under ``root`` that runs this very
    interpreter with the kvmlab under test importable; returns the directory to
    put first on ``JUPYTER_PATH``."""
    spec_dir = root / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kvmlab tests)",
        "language": "python",
        "env": {"PYTHONPATH": pythonpath},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root / "jupyter"


def copy_notebooks(dest: Path) -> Path:
    """A copy of notebooks/ (notebooks write their outputs and temp files there)."""
    out = dest / "notebooks"
    shutil.copytree(NOTEBOOKS, out)
    return out


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def text_of(nb) -> str:
    parts = []
    for o in outputs(nb):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif "data" in o:
            parts.append(o["data"].get("text/plain", ""))
    return "\n".join(parts)
