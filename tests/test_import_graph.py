"""No import cycles in src/: the import graph of every module, read from the ASTs, has no strongly connected
component of more than one module.

What counts as an edge from module A to module B: every `import B`, `from B import name` or `from pkg import B`
(B a module of pkg) in A, at module level AND inside functions. A lazy import that closes a cycle still couples
the two modules (each needs the other to work) and only moves the failure from import time to the first call; the
engine has no reason to import lazily from a module that imports it back. The pytest plugin's lazy imports of the
engine are one-way (moeoffload never imports moebench), so counting them costs nothing.

What does not count: imports under `if TYPE_CHECKING:` (they never run), and the implicit import of a package's
`__init__` that Python performs before any of its modules (counted, every package whose `__init__` re-exports its
modules would be a cycle). So a module that must not depend on a package's whole surface imports the module that
defines the name (`moeoffload.predictors.registry`), not the package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _targets(node: ast.ImportFrom, module: str, package: bool, known: dict) -> list[str]:
    if node.level:
        base = module.split(".") if package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(module: str, path: Path, package: bool, known: dict) -> set[str]:
    """The modules of `known` that `module` imports, at any depth of its code but under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            for child in node.orelse:  # type: ignore[attr-defined]
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_targets(node, module, package, known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in known and m != module}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    known = modules(src)
    return {name: imports_of(name, path, package, known) for name, (path, package) in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)
    return f"cycle of {len(component)} modules: {edges}"


def test_src_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40, f"only {len(graph)} modules found under {SRC}"
    found = cycles(graph)
    assert not found, "import cycles in src/ (move the shared piece to a module both import):\n" + "\n".join(
        describe(c, graph) for c in found)


def test_the_checker_sees_a_cycle_through_a_lazy_import_and_a_package(tmp_path):
    """The checker itself: a cycle closed inside a function and through `from pkg import sub` is found; one under
    TYPE_CHECKING is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("from pkg.a import x\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import y\n")
    (pkg / "e.py").write_text("from .d import z\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.e" not in graph["pkg.d"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    """The graph ignores a package's __init__ running before its modules; this catches what that leaves: a module
    that fails when it is the first one of the project imported (a half-initialised module met at import time)."""
    names = [n for n in modules() if not n.endswith("triton_kernels")]  # needs triton, which a CPU box may lack
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('moeoffload', 'moebench')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip(), "modules that fail when imported first:\n" + done.stdout
