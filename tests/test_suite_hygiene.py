"""The test suite's own layout (issue #22): test files share helpers only through tests/builders.py
and tests/references.py, and fixtures only through tests/conftest.py. A test file that imports
from another test file runs that file's imported tests twice and ties the two files together; one
that imports from conftest makes conftest a helper module as well."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in the file, also those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):  # relative: tests/ is not a package
            found.append((node.lineno, "." * node.level + (node.module or ""), [a.name for a in node.names]))
    return found


def offences(path: Path) -> list[str]:
    wrong = []
    for line, module, names in imported_modules(path):
        parts = module.split(".")
        where = f"{path.name}:{line}: {module}"
        if module.startswith("."):
            wrong.append(f"{where}: a relative import (tests/ is not a package)")
        elif parts[0] == "tests":
            wrong.append(f"{where}: helpers are imported by module name (`from builders import ...`), "
                         "not as tests.<module>: the same file would be imported twice")
        elif parts[0] == "conftest":
            wrong.append(f"{where}: conftest holds fixtures only; helpers are in builders or references")
        elif parts[0].startswith("test_"):
            wrong.append(f"{where}: imports another test file; shared helpers go to builders or references, "
                         "shared fixtures to conftest")
        wrong += [f"{where}: imports the test function {name}: it would run twice"
                  for name in names if name.startswith("test_")]
    return wrong


def test_no_test_file_imports_from_another_test_file_or_conftest():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 30  # the suite, not an empty folder
    wrong = [offence for path in files for offence in offences(path)]
    assert not wrong, "\n".join(wrong)


def test_helper_modules_import_no_test_file():
    helpers = [path for path in sorted(TESTS.glob("*.py")) if not path.name.startswith("test_")]
    assert {"conftest.py", "builders.py", "references.py"} <= {path.name for path in helpers}
    wrong = [offence for path in helpers for offence in offences(path)]
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_what_they_refuse(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("from conftest import make_record\nfrom tests.test_rules import naive_rule\n"
                   "def test_x():\n    from test_identify import test_y\n")
    found = offences(bad)
    assert len(found) == 4, found
    assert not offences(TESTS / "test_suite_hygiene.py")
