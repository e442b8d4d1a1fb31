"""The package's shape: no import cycle, short import chains, small functions, light import.

The import graph is read from the source (every ``import`` and ``from ... import`` of an
``opacus_dmaudit`` module, at module level or inside functions): an arrow A -> B when module A
imports module B at run time (imports under ``if TYPE_CHECKING:`` are type hints, not arrows;
``from .capture import hooks`` points at ``capture.hooks``; a name that is not
a module points at the module that defines it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = "opacus_dmaudit"
MAX_CHAIN = 8  # modules on the longest chain of package imports
MAX_LINES = 80  # lines of a function, not counting its docstring
MAX_COMPLEXITY = 20  # cyclomatic complexity (radon)
HEAVY = ("lpips", "torchvision", "skimage", "diffusers", "matplotlib")


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.AST) -> list[str]:
    """The dotted names an import statement of ``module`` may refer to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def runtime_imports(tree: ast.AST):
    """Every import statement of ``tree`` except those under ``if TYPE_CHECKING:`` (type-only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        ):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(name, path, node):
                while target and target not in modules:  # the module that defines the name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` (Tarjan), singletons included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def longest_chain(graph: dict[str, set[str]]) -> tuple[int, list[str]]:
    """Modules on the longest chain of imports between the package's modules (its packages'
    ``__init__`` files left out, as a package importing its own parts is no step of the flow).

    Exact when there is no cycle; a cycle counts all of its modules.
    """
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    inner = {
        m: {t for t in ts if t not in packages} for m, ts in graph.items() if m not in packages
    }
    components = strongly_connected(inner)
    home = {m: i for i, component in enumerate(components) for m in component}
    best: dict[int, tuple[int, list[str]]] = {}

    def chain(i: int) -> tuple[int, list[str]]:
        if i not in best:
            below = {home[t] for m in components[i] for t in inner[m]} - {i}
            length, path = max((chain(j) for j in below), default=(0, []))
            best[i] = (len(components[i]) + length, [min(components[i]), *path])
        return best[i]

    return max((chain(i) for i in range(len(components))), default=(0, []))


def _functions():
    """``(where, node)`` for every function and method of the package."""
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{path.relative_to(REPO)}:{node.lineno}:{node.name}", node


def _lines_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return node.end_lineno - body[0].lineno + 1 if body else 0


def test_the_graph_reader_sees_the_packages_imports():
    """The reader itself, on the package's own modules (so that the rules below can fail)."""
    graph = import_graph()
    assert len(graph) > 30
    assert f"{PACKAGE}.config" in graph[f"{PACKAGE}.auditor"]  # from .config import AuditConfig
    assert f"{PACKAGE}.score.scoring" in graph[f"{PACKAGE}.pipeline"]  # from .score.scoring ...
    assert all(t.startswith(PACKAGE) for ts in graph.values() for t in ts)
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert sorted(map(sorted, strongly_connected(toy))) == [["a", "b", "c"], ["d"], ["e"]]


def test_no_import_cycle():
    cycles = [sorted(c) for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, f"modules that import each other (directly or around a loop): {cycles}"


def test_no_chain_of_package_imports_longer_than_8_modules():
    length, chain = longest_chain(import_graph())
    assert length <= MAX_CHAIN, f"{length} modules: {' -> '.join(chain)}"


def test_no_function_longer_than_80_lines_without_its_docstring():
    lines = {where: _lines_without_docstring(node) for where, node in _functions()}
    too_long = {where: n for where, n in lines.items() if n > MAX_LINES}
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"


def test_no_function_of_cyclomatic_complexity_over_20():
    complexity = pytest.importorskip(
        "radon.complexity", reason="radon is not installed (pip install radon)"
    )
    too_complex = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        blocks = list(complexity.cc_visit(path.read_text()))
        while blocks:  # functions, methods of (inner) classes, and functions inside functions
            block = blocks.pop()
            if hasattr(block, "methods"):  # a class
                blocks += [*block.methods, *block.inner_classes]
                continue
            blocks += block.closures
            if block.complexity > MAX_COMPLEXITY:
                where = f"{path.relative_to(REPO)}:{block.lineno}:{block.fullname}"
                too_complex[where] = block.complexity
    assert not too_complex, f"complexity over {MAX_COMPLEXITY}: {too_complex}"


def test_importing_the_package_and_its_main_names_loads_no_heavy_library():
    code = (
        "import sys\n"
        f"heavy = {HEAVY!r}\n"
        "import opacus_dmaudit\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
        "from opacus_dmaudit import DMAuditor, ImprintBlock, AuditConfig, DiffusionPrior\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    after_import, after_names = result.stdout.split("\n")[:2]
    assert after_import == "", f"import opacus_dmaudit loads {after_import}"
    assert after_names == "", f"importing the main names loads {after_names}"
