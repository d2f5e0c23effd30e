"""Every error has a machine-readable check id, and every id is documented.

The core's ids are ONE enum (``kvmlab_check``, zigsrc/errors.zig) read from
the header; the Python layer's ids are the literals it raises with. Both must
be listed in docs/errors.md, and nothing may raise a KvmlabError without an id.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kvmlab import _ffi, errors

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
PACKAGE = ROOT / "kvmlab"
ZIGSRC = ROOT / "zigsrc"

#: The KvmlabError subclasses (names the Python code constructs).
ERROR_CLASSES = {c.__name__ for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.KvmlabError)}


def _documented(section: str) -> set[str]:
    """Ids in the first column of the tables of one part of docs/errors.md."""
    text = DOC.read_text(encoding="utf-8")
    core, _, python = text.partition("## Python-layer ids")
    return set(re.findall(r"^\| `(\w+)` \|", core if section == "core" else python, re.M))


def _core_ids() -> set[str]:
    return set(_ffi.enum_values("kvmlab_check")) - {"none"}


@pytest.mark.checkout  # reads docs/ or the sources: only in a checkout
def test_every_core_id_is_documented_and_every_documented_id_exists():
    core = _core_ids()
    doc = _documented("core")
    assert not core - doc, f"add these kvmlab_check ids to {DOC}: {sorted(core - doc)}"
    assert not doc - core, f"{DOC} documents ids the core does not have: {sorted(doc - core)}"


def test_each_core_id_is_in_the_hundred_of_its_class():
    for name, value in _ffi.enum_values("kvmlab_check").items():
        if name == "none":
            continue
        code = -(value // 100)
        assert code in _ffi.RESULTS and _ffi.RESULTS[code][1] is not None, (name, value)


def _python_ids() -> dict[str, str]:
    """``{id: where}`` for every check id literal the package raises with:
    ``check="id"`` keywords, ``bad_argument("id", ...)`` and ``check = "id"``."""
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call):
                values += [k.value for k in node.keywords if k.arg == "check"]
                fn = node.func
                if (getattr(fn, "id", None) or getattr(fn, "attr", None)) == "bad_argument" and node.args:
                    values.append(node.args[0])
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names = target.elts if isinstance(target, ast.Tuple) else [target]
                    if any(getattr(t, "id", None) == "check" or getattr(t, "attr", None) == "check" for t in names):
                        v = node.value.elts[0] if isinstance(node.value, ast.Tuple) else node.value
                        values.append(v)
            for v in values:
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    found.setdefault(v.value, f"{path.relative_to(ROOT)}:{v.lineno}")
    return found


@pytest.mark.checkout  # reads docs/ or the sources: only in a checkout
def test_every_python_id_is_documented():
    ids = _python_ids()
    assert {"argument_type", "gpa_out_of_range", "pool_closed", "snapshot_closed"} <= set(ids)  # the walk sees them
    known = _core_ids() | _documented("python")
    missing = {i: w for i, w in ids.items() if i not in known}
    assert not missing, f"document these check ids in {DOC}: {missing}"


@pytest.mark.checkout  # reads docs/ or the sources: only in a checkout
def test_no_python_raise_without_an_id():
    bare = []
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "errors.py"]
    assert len(files) > 20, f"no kvmlab sources under {PACKAGE}: the check would pass on nothing"
    for path in files:
        src = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in ERROR_CLASSES or any(k.arg == "check" for k in node.keywords):
                continue
            segment = ast.get_source_segment(src, node) or ""
            # Those that set err.check from a variable on the next line.
            nxt = src.splitlines()[node.end_lineno] if node.end_lineno < len(src.splitlines()) else ""
            if "err.check" in nxt:
                continue
            bare.append(f"{path.relative_to(ROOT)}:{node.lineno}: {segment[:80]}")
    assert not bare, "raise these with check=<id> (and document it in docs/errors.md):\n" + "\n".join(bare)


@pytest.mark.checkout  # reads docs/ or the sources: only in a checkout
def test_the_core_fails_only_through_fail():
    """A Zig error returned without errors.fail would carry no id (or a stale
    one): only allocator OutOfMemory may pass up raw (errors.finish names it)."""
    error_set = re.search(r"pub const Error = error\{(.*?)\};", (ZIGSRC / "errors.zig").read_text(), re.S)
    names = {n.strip() for n in error_set.group(1).split(",") if n.strip()} - {"OutOfMemory"}
    assert {"Config", "Incompatible", "PoolExhausted"} <= names
    raw_return = re.compile(r"return error\.(%s)\b" % "|".join(sorted(names)))
    raw = []
    for path in ZIGSRC.rglob("*.zig"):
        if path.name in ("errors.zig", "gen_header.zig", "check_exports.zig") or "guests" in path.parts:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("//")[0]
            if raw_return.search(code) or "errors.fail(error." in code:
                raw.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not raw, "fail these with errors.fail(.<check id>, ...):\n" + "\n".join(raw)


def test_a_core_refusal_carries_its_id():
    """Not only snapshot checks: a config refusal of the core, before /dev/kvm."""
    out = _ffi.ffi.new("kvmlab_vm **")
    cfg = _ffi.ffi.new("kvmlab_vm_config *", {"memory_bytes": 7 << 20, "vcpus": 1})
    with pytest.raises(errors.ConfigError) as e:
        _ffi.check(_ffi.lib.kvmlab_vm_new(cfg, out))
    assert e.value.check == "vm_memory_range"
    cfg.memory_bytes, cfg.vcpus = 9 << 20, 1
    with pytest.raises(errors.ConfigError) as e:
        _ffi.check(_ffi.lib.kvmlab_vm_new(cfg, out))
    assert e.value.check == "vm_memory_multiple"
    with pytest.raises(errors.ConfigError) as e:
        _ffi.check(_ffi.lib.kvmlab_vm_new(cfg, _ffi.ffi.NULL))
    assert e.value.check == "null_argument"
    with pytest.raises(errors.ClosedError) as e:
        _ffi.check(_ffi.lib.kvmlab_vm_run(_ffi.ffi.NULL, 0, _ffi.ffi.new("kvmlab_run_result *")))
    assert e.value.check == "null_handle"
