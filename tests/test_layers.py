"""The package's shape (issue 12, "Done when"), read from the source: no KVM.

- kvmlab's Python import graph has no cycle;
- zigsrc/'s import graph has no cycle (the layer order, the 800-line limit of
  core files and the ioctl rule are in tests/test_architecture.py, whose graph
  this file reuses);
- no Python module of kvmlab is over 700 lines;
- no int -> name table is written by hand in kvmlab: enum names come from the
  generated header (``_ffi.enum_names``).

Every import that runs counts, at module level or in a function alike: a
function-level import is still a dependency (it only runs later), and a cycle
hidden that way breaks as soon as someone moves the import up. Imports under
``if TYPE_CHECKING:`` never run (annotations only: a helper module naming its
owner's types, kvmlab._prepared -> kvmlab.pool) and are left out. ``importlib.import_module`` of cli's plugin slots is not an
import statement: the registry is dynamic by design and the plugins import cli,
not the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_architecture import _core_files
from test_architecture import _imports as _zig_imports

pytestmark = pytest.mark.checkout

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvmlab"
MAX_PYTHON_LINES = 700


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{"kvmlab.vm": (path, is_package), ...}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    assert "kvmlab.vm" in out and "kvmlab.pool" in out, f"no kvmlab sources under {PACKAGE}: every check here would pass on nothing"
    return out


def _known(name: str, modules: dict) -> str | None:
    """The innermost module of kvmlab that ``name`` (a dotted name) is or is in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    """The kvmlab modules an import statement of ``module`` loads. ``from . import x``
    is an import of the submodule ``kvmlab.x`` when there is one, else of the package."""
    if isinstance(node, ast.Import):
        return {m for a in node.names if (m := _known(a.name, modules))}
    if node.level:
        base = module.split(".")[: None if is_package else -1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = set()
    for a in node.names:
        m = f"{source}.{a.name}" if f"{source}.{a.name}" in modules else _known(source, modules)
        if m:
            out.add(m)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for stmt in node.orelse for n in ast.walk(stmt))
            continue
        yield node
        yield from _runtime_nodes(node)


def python_graph() -> dict[str, set[str]]:
    """Module -> the kvmlab modules it imports (anywhere in its body)."""
    modules = _modules()
    graph = {}
    for module, (path, is_package) in modules.items():
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, module, is_package, modules)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> list[str] | None:
        if state.get(n) == 1:
            return path[path.index(n) :] + [n]
        if state.get(n) == 2:
            return None
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if found := visit(m, path + [n]):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if found := visit(n, []):
            return found
    return None


def test_find_cycle_finds_one():
    # The checker itself: a cycle through a package's __init__ is found, a DAG passes.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_submodules():
    graph = python_graph()
    # kvmlab/__init__.py: `from . import errors, guests` imports the submodules.
    assert {"kvmlab.errors", "kvmlab.guests", "kvmlab.vm"} <= graph["kvmlab"]
    # A function-level import counts (vm.py imports snapshot inside Vm.restore).
    assert "kvmlab.snapshot" in graph["kvmlab.vm"]
    # One under `if TYPE_CHECKING:` does not (never run): _prepared names pool's types.
    assert "kvmlab.pool" not in graph["kvmlab._prepared"] and "kvmlab._prepared" in graph["kvmlab.pool"]


def test_python_import_graph_has_no_cycle():
    cycle = find_cycle(python_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_zig_import_graph_has_no_cycle():
    cycle = find_cycle({name: _zig_imports(name) for name in _core_files()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_python_modules_are_short():
    sizes = {m: len(p.read_text().splitlines()) for m, (p, _) in _modules().items()}
    over = {m: n for m, n in sizes.items() if n > MAX_PYTHON_LINES}
    assert not over, f"modules over {MAX_PYTHON_LINES} lines (split them by responsibility): {over}"


def _int_key(node: ast.expr | None) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def _str_value(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) or (
        isinstance(node, ast.Tuple) and bool(node.elts) and _str_value(node.elts[0])
    )


def _name_tables(tree: ast.AST) -> list[int]:
    """Lines of hand-written int -> name tables: dict literals with int keys
    and string values (or tuples starting with one), and dicts built by
    enumerating a literal sequence of strings."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and any(_int_key(k) and _str_value(v) for k, v in zip(node.keys, node.values)):
            lines.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "enumerate"
                and node.args and isinstance(node.args[0], (ast.Tuple, ast.List))
                and all(_str_value(e) for e in node.args[0].elts)):  # fmt: skip
            lines.append(node.lineno)
    return lines


def test_name_table_check_sees_one():
    # The checker itself, on the shapes it must refuse and one it must let pass.
    src = 'A = {0: "exit", 1: "checkpoint"}\nB = dict(enumerate(("copy", "map")))\nC = {"echo": 1}\n'
    assert _name_tables(ast.parse(src)) == [1, 2]


def test_no_int_to_name_tables():
    # Enum names are read from the header (_ffi.enum_names); a second table by hand drifts.
    found = {
        f"{path.relative_to(ROOT)}:{line}"
        for path, _ in _modules().values()
        for line in _name_tables(ast.parse(path.read_text()))
    }
    assert not found, f"int -> name tables written by hand (read them with _ffi.enum_names): {sorted(found)}"
