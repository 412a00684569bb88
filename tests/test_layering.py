"""The layers: `sparcom/` is the library and imports neither Prefect nor the orchestration
packages (`flows`, `tasks`, `cli`), at module level or inside any function; checked on the
source (every import statement) and at run time (importing every module loads no Prefect).

Inside the library the packages follow the pipeline: a package imports only packages below it
in `PACKAGE_ORDER`, and no chain of imports (function-level ones included) leads from a module
back to itself. A package's `__init__` is its docstring, naming every module it holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "sparcom"
FORBIDDEN = {"prefect", "flows", "tasks", "cli"}
# Lower first; ablation and comparison stand side by side and import neither each other; the
# findings read the outputs of identification and ablation. The top-level modules (`sparcom.config`, `sparcom.stages`) gather every stage and are imported by none.
PACKAGE_ORDER = {"core": 0, "curation": 1, "extraction": 2, "intervention": 3, "attribution": 4, "identification": 5,
                 "ablation": 6, "comparison": 6, "findings": 7}
TOP_LEVEL = 8
PACKAGES = sorted(p.parent for p in LIBRARY.glob("*/__init__.py"))


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the tree, function bodies included, and of
    `importlib.import_module("...")` / `__import__("...")` calls with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            called = ast.unparse(node.func)
            if called in ("importlib.import_module", "import_module", "__import__"):
                found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def test_the_checker_sees_imports_at_any_depth():
    source = ("def f():\n    class C:\n        def g(self):\n            from prefect import flow\n"
              "    import importlib\n    importlib.import_module('tasks.caching')\n")
    assert {name for _, name in imported_names(ast.parse(source))} >= {"prefect", "tasks"}


@pytest.mark.parametrize("module", sorted(LIBRARY.rglob("*.py")), ids=lambda p: p.relative_to(LIBRARY).as_posix())
def test_library_module_imports_no_orchestration(module):
    bad = [f"{module.name}:{line} imports {name}"
           for line, name in imported_names(ast.parse(module.read_text(encoding="utf-8")))
           if name in FORBIDDEN]
    assert not bad, bad


def test_importing_the_whole_library_loads_no_prefect():
    code = ("import pkgutil, importlib, sys, sparcom\n"
            "for m in pkgutil.walk_packages(sparcom.__path__, 'sparcom.'): importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in {'prefect', 'flows', 'tasks', 'cli'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_command_line_starts_without_prefect():
    """`sparcom extract` and `sparcom identify` call the library: no Prefect server, no Prefect import."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom cli.app import app\n"
            "for command in ('extract', 'identify'):\n"
            "    assert CliRunner().invoke(app, [command, '--help']).exit_code == 0\n"
            "print('prefect' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def library_imports() -> dict[str, set[str]]:
    """Each library module's dotted name -> the library modules it imports, anywhere in it."""
    def name_of(path: Path) -> str:
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in LIBRARY.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules} \
                    or {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        edges[name] = found - {name, "sparcom"}
    return edges


def level(module: str) -> int:
    parts = module.split(".")
    return PACKAGE_ORDER[parts[1]] if len(parts) > 2 else TOP_LEVEL


def test_packages_import_only_packages_below_them():
    upward = [f"{module} imports {imported}" for module, imports in library_imports().items()
              for imported in imports
              if len(module.split(".")) > 2 and module.split(".")[1] != imported.split(".")[1]
              and level(imported) >= level(module)]
    assert not upward, upward


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_reaches_itself_through_imports():
    assert import_cycles(library_imports()) == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_package_opens_with_a_docstring_naming_its_modules(package):
    tree = ast.parse((package / "__init__.py").read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring and len(tree.body) == 1, "the __init__ holds its docstring and nothing else"
    unnamed = [p.stem for p in package.glob("*.py") if p.stem != "__init__" and f"`{p.stem}`" not in docstring]
    assert not unnamed, f"{package.name}/__init__.py does not name {unnamed}"
