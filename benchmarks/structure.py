"""How the package is built: modules, import graph, function sizes, import time.

Prints one table (the figures the renovation of issue 18 is judged by):

* modules and their internal import arrows (module-level imports and imports inside functions,
  of ``opacus_dmaudit`` modules only; imports under ``if TYPE_CHECKING:`` are type hints and not
  counted), import cycles (strongly connected components),
  the longest chain of package imports without repeating a module ("floors");
* functions over 80 lines (not counting the docstring) and of cyclomatic complexity over 20
  (radon);
* the wall time of ``import opacus_dmaudit`` in a fresh interpreter (median of 5, after
  ``import opacus``) and which heavy libraries it loads.

Usage::

    python benchmarks/structure.py [--root PATH]   # PATH: a checkout (default: this one)
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
from pathlib import Path

HEAVY = ("lpips", "torchvision", "skimage", "diffusers", "matplotlib")


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


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


def import_graph(root: Path, package: str = "opacus_dmaudit") -> dict[str, set[str]]:
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(root, p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        for node in runtime_imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the longest module name that is a prefix of the target
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith(package):
                    graph[mod].add(t)
    # a package's own __init__ importing its submodules is not a dependency of the flow
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def floors(graph: dict[str, set[str]], package: str = "opacus_dmaudit") -> int:
    """Modules on the longest simple import chain (package ``__init__`` files left out)."""
    inits = {m for m in graph if m == package or any(m + "." in o for o in graph)}
    inner = {m: {t for t in ts if t not in inits} for m, ts in graph.items() if m not in inits}
    memo: dict[str, int] = {}

    def depth(v: str, seen: frozenset) -> int:
        if v in memo and not seen & {v}:
            return memo[v]
        best = 1
        for w in inner.get(v, ()):
            if w not in seen:
                best = max(best, 1 + depth(w, seen | {v}))
        memo[v] = best
        return best

    return max((depth(v, frozenset()) for v in inner), default=0)


def long_functions(root: Path, limit: int = 80) -> list[tuple[str, int]]:
    out = []
    for path in sorted((root / "opacus_dmaudit").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                body = n.body
                if (
                    body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(getattr(body[0], "value", None), ast.Constant)
                ):
                    body = body[1:]
                if body:
                    lines = n.end_lineno - body[0].lineno + 1
                    if lines > limit:
                        out.append((f"{path.relative_to(root)}:{n.name}", lines))
    return sorted(out, key=lambda x: -x[1])


def complex_functions(root: Path, limit: int = 20) -> list[tuple[str, int]]:
    from radon.complexity import cc_visit

    out = []
    for path in sorted((root / "opacus_dmaudit").rglob("*.py")):
        for block in cc_visit(path.read_text()):
            items = [block] + list(getattr(block, "methods", []) or [])
            for b in items:
                if b.complexity > limit:
                    out.append((f"{path.relative_to(root)}:{b.name}", b.complexity))
    return sorted(set(out), key=lambda x: -x[1])


def import_time(
    root: Path, statement: str = "import opacus_dmaudit", runs: int = 5
) -> tuple[float, list[str]]:
    """Median seconds of ``statement`` in a fresh interpreter after ``import opacus``, and the
    heavy libraries loaded after it."""
    code = (
        f"import time, sys; import opacus; t = time.perf_counter(); {statement}; "
        "print(time.perf_counter() - t); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    times, heavy = [], []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
        ).stdout.split("\n")
        times.append(float(out[0]))
        heavy = [h for h in out[1].split(",") if h]
    return statistics.median(times), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    root = args.root.resolve()
    graph = import_graph(root)
    arrows = sum(len(v) for v in graph.values())
    found = cycles(graph)
    longs = long_functions(root)
    complexes = complex_functions(root)
    seconds, heavy = import_time(root)
    auditor_seconds, auditor_heavy = import_time(root, "from opacus_dmaudit import DMAuditor")
    lines = sum(len(p.read_text().splitlines()) for p in (root / "opacus_dmaudit").rglob("*.py"))
    print(f"| measure | {root} |")
    print("|---|---|")
    print(f"| modules (.py files) | {len(graph)} |")
    print(f"| lines | {lines} |")
    print(f"| internal import arrows | {arrows} |")
    print(f"| import cycles | {len(found)} {found if found else ''} |")
    print(f"| longest import chain (modules) | {floors(graph)} |")
    print(f"| functions > 80 lines | {len(longs)} {longs[:5]} |")
    print(f"| functions of complexity > 20 | {len(complexes)} {complexes[:5]} |")
    print(f"| `import opacus_dmaudit` after opacus (s) | {seconds:.2f} |")
    print(f"| heavy libraries it loads | {', '.join(heavy) or 'none'} |")
    print(f"| `from opacus_dmaudit import DMAuditor` after opacus (s) | {auditor_seconds:.2f} |")
    print(f"| heavy libraries that loads | {', '.join(auditor_heavy) or 'none'} |")


if __name__ == "__main__":
    main()
