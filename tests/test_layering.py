"""The layers: `sparcom/` is the library and imports neither Prefect nor the orchestration
packages (`flows`, `tasks`, `cli`), at module level or inside any function; checked on the
source (every import statement) and at run time (importing every module loads no Prefect)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "sparcom"
FORBIDDEN = {"prefect", "flows", "tasks", "cli"}


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
            "for m in pkgutil.iter_modules(sparcom.__path__): importlib.import_module('sparcom.' + m.name)\n"
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
