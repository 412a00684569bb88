"""Which code made a result: the code version a stage's cache keys end in (docs/method.md section 8).

- `modules_version(entries, libraries)`: a hash of the code of every `sparcom` module that
  `entries` import, transitively, function-level imports too, read as syntax trees without
  comments and docstrings, and of the installed versions of `libraries` (for the stages that run
  a model: torch and transformers, whose kernels and model code compute the numbers). A comment
  edit keeps every result; a code edit in any module a stage reaches changes its key. A module
  that cannot be found is an error, never skipped.
- `module_closure(entries)`: those modules' names.
- `StageCode(entries, libraries)`: one stage's code, as each stage's `keys` module declares it;
  `MODEL_LIBRARIES`, the libraries of the stages that run a model.
- `package_version()`: the installed release of sparcom, recorded beside results but in no key:
  the code versions cover every change a release brings, so a release alone recounts nothing.

A package's `__init__` holds only its docstring (tests/test_layering.py), so importing a module
of a package adds no code but that module's.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

PACKAGE = "sparcom"
# The libraries whose kernels and model code compute the numbers of the stages that run a model.
MODEL_LIBRARIES = ("torch", "transformers")


@dataclass(frozen=True)
class StageCode:
    """The modules a stage's work starts from, and the libraries whose versions its results depend on."""
    entries: tuple[str, ...]
    libraries: tuple[str, ...] = ()

    def version(self) -> str:
        return modules_version(self.entries, self.libraries)

    def modules(self) -> list[str]:
        return module_closure(self.entries)


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def modules_version(entries: Iterable[str], libraries: Iterable[str] = (), package: str = PACKAGE) -> str:
    """sha256 over the versions of `libraries` and the comment- and docstring-free syntax trees of
    `entries` and every module of `package` they import, at any depth."""
    digest = hashlib.sha256()
    for library in libraries:
        digest.update(f"{library}=={importlib.metadata.version(library)}\n".encode())
    for name in module_closure(entries, package):
        digest.update(f"{name}\n{_module_facts(name, package).tree}\n".encode())
    return digest.hexdigest()


def module_closure(entries: Iterable[str], package: str = PACKAGE) -> list[str]:
    """The modules of `package` reachable from `entries` through import statements, sorted."""
    seen: set[str] = set()
    pending = [(name, "the stage") for name in entries]
    while pending:
        name, importer = pending.pop()
        if name in seen:
            continue
        if _source_file(name) is None:
            raise ModuleNotFoundError(f"code version: {name} (imported by {importer}) is not found; "
                                      "a stage's code must be complete to be versioned")
        seen.add(name)
        pending += [(imported, name) for imported in _module_facts(name, package).imports]
    return sorted(seen)


def _source_file(name: str) -> Path | None:
    """The file of module `name`, found from its package's folder: nothing is imported, so
    versioning `sparcom.extraction.extract` does not load torch."""
    top, *parts = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    candidates = [folder.joinpath(*parts, "__init__.py")]
    if parts:
        candidates.append(folder.joinpath(*parts[:-1], f"{parts[-1]}.py"))
    return next((c for c in candidates if c.is_file()), None)


class _ModuleFacts(NamedTuple):
    tree: str  # the syntax tree without docstrings, dumped
    imports: frozenset[str]  # the modules of the package it imports


def _module_facts(name: str, package: str) -> _ModuleFacts:
    return _facts_of_source(_source_file(name).read_text(encoding="utf-8"), package)


# A stage asks for its code version once per shard, and parsing every module each time cost a
# third of a second per shard; reading the files again is cheap and sees every edit.
@functools.lru_cache(maxsize=512)
def _facts_of_source(source: str, package: str) -> _ModuleFacts:
    tree = ast.parse(source)
    imports = _imported_modules(tree, package)
    return _ModuleFacts(ast.dump(_without_docstrings(tree)), imports)


def _imported_modules(tree: ast.Module, package: str) -> frozenset[str]:
    def ours(module: str) -> bool:
        return module == package or module.startswith(f"{package}.")

    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if ours(alias.name)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and ours(node.module):
            found.add(node.module)
            # `from sparcom import extract` names a module; `from sparcom import __version__` does not
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if _source_file(f"{node.module}.{alias.name}") is not None}
    return frozenset(found)


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree
