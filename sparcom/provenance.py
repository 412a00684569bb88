"""Content keys: what each stage's result depends on, for caching and for naming outputs.

Every key formula of the pipeline lives here, one per stage, each ending in the stage's code
version; the hashing under them is `sparcom.core.hashing`.

- `code_version(stage)`: a hash of the code of every `sparcom` module the stage runs (found from
  its imports, transitively, function-level ones too), read as syntax trees without comments and
  docstrings: a comment edit keeps every store, a code edit in `config.py` invalidates extraction.
  A module that cannot be found is an error, never skipped.
- `stage_modules(stage)`: those modules' names.
- `curation_key(source)`, `extraction_key(fingerprint, data_hash, settings, dtype)`,
  `counts_key(fingerprint, span, dtype)` (rows of stores with equal keys are interchangeable),
  `identification_key(store, settings)`, `finetune_key(fingerprint, data_hash, settings)`,
  `result_key(stage, *inputs)` (stages whose inputs are earlier results on disk).
- `planned_extraction_key(model, dataset_dir, settings, cache_dir)` and
  `planned_finetune_key(model, settings, held_out_dataset, cache_dir)`: the same keys computed
  before the stage runs (from the weights' fingerprint, not the loaded model), for the caching.
- `results_dir(work_dir, store, settings)`: the content-addressed folder of a run's findings.
- `unusable_output(result)`: why a cached result can no longer be used (a file or folder it
  names is gone, a count store it names does not verify), or None.

This module imports the stage modules only inside the planned keys, and is itself left out of
every code version: a stage's code is what computes its result, not the keys that name it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

from sparcom import __version__
from sparcom.core.hashing import content_hash, input_fingerprint

PACKAGE = "sparcom"
# The module each stage's task calls into; code_version follows their imports from there.
STAGE_ENTRY_MODULES: dict[str, tuple[str, ...]] = {
    "curate": ("sparcom.curation.dataset",),
    "extract": ("sparcom.extraction.extract",),
    "identify": ("sparcom.identification.identify",),
    "analyse": ("sparcom.identification.report",),
    "finetune": ("sparcom.comparison.finetune",),
    "compare": ("sparcom.comparison.compare", "sparcom.comparison.report"),
    "ablate": ("sparcom.ablation.ablate", "sparcom.ablation.report"),
}
NOT_STAGE_CODE = frozenset({__name__})
# Settings that change where training runs but not what it computes; kept out of the key.
FINETUNE_PLACEMENT_FIELDS = {"device"}


# --- code versions -----------------------------------------------------------------------------

def code_version(stage: str) -> str:
    return modules_version(STAGE_ENTRY_MODULES[stage])


def stage_modules(stage: str) -> list[str]:
    return module_closure(STAGE_ENTRY_MODULES[stage])


def modules_version(entries: Iterable[str], package: str = PACKAGE) -> str:
    """sha256 over the comment- and docstring-free syntax trees of `entries` and every module of
    `package` they import, at any depth."""
    digest = hashlib.sha256(__version__.encode())
    for name in module_closure(entries, package):
        digest.update(f"{name}\n{_module_facts(name, package).tree}\n".encode())
    return digest.hexdigest()


def module_closure(entries: Iterable[str], package: str = PACKAGE) -> list[str]:
    """The modules of `package` reachable from `entries` through import statements, sorted."""
    seen: set[str] = set()
    pending = [(name, "the stage") for name in entries]
    while pending:
        name, importer = pending.pop()
        if name in seen or name in NOT_STAGE_CODE:
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


# --- one key per stage -----------------------------------------------------------------------------

def curation_key(source: Path | None) -> str:
    from sparcom.curation.hexainst import AUTHORED_DIR
    from sparcom.curation.packaged_sources import installed_versions

    if source is None:  # the starter set: shipped records and the installed packaged sets
        return content_hash("curate", input_fingerprint(AUTHORED_DIR), installed_versions(), code_version("curate"))
    return content_hash("curate", input_fingerprint(source), code_version("curate"))


def extraction_key(fingerprint: str, data_hash: str, settings: BaseModel, dtype: object) -> str:
    """What the counts depend on. Batching and device only move float rounding (docs/method.md section 7)."""
    return content_hash({
        "fingerprint": fingerprint, "dataset_hash": data_hash, "span": settings.span,
        "dtype": str(dtype), "shard_size": settings.shard_size, "layer_chunk": settings.layer_chunk,
        "code": code_version("extract"),
    })


def counts_key(fingerprint: str, span: str, dtype: object) -> str:
    """What one instruction's counts depend on: rows of stores with equal keys are interchangeable."""
    return content_hash({"fingerprint": fingerprint, "span": span, "dtype": str(dtype),
                         "code": code_version("extract")})


def planned_extraction_key(model: BaseModel, dataset_dir: Path, settings: BaseModel, cache_dir: Path) -> str:
    from sparcom.curation.dataset import MANIFEST_NAME
    from sparcom.extraction.models import model_fingerprint, resolve_device, resolve_dtype, resolve_model

    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    manifest = json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text())
    dtype = resolve_dtype(settings.dtype, resolve_device(settings.device))
    return extraction_key(model_fingerprint(source, cache_dir), manifest["dataset_hash"], settings, dtype)


def identification_key(store: Path, settings: BaseModel) -> str:
    from sparcom.extraction.store import store_attrs

    return content_hash("identify", store_attrs(store)["extraction_key"], settings, code_version("identify"))


def finetune_key(base_fingerprint: str, data_hash: str, settings: BaseModel) -> str:
    """What a checkpoint depends on: the base weights, the records trained on, the training settings."""
    training = settings.model_dump(mode="json", exclude=FINETUNE_PLACEMENT_FIELDS | {"dataset", "categories"})
    return content_hash({"base_fingerprint": base_fingerprint, "dataset_hash": data_hash, "settings": training,
                         "code": code_version("finetune")})


def planned_finetune_key(model: BaseModel, settings: BaseModel, held_out_dataset: Path | None,
                         cache_dir: Path) -> str:
    from sparcom.curation.dataset import load_records
    from sparcom.comparison.finetune import training_records
    from sparcom.extraction.models import model_fingerprint, resolve_model
    from sparcom.curation.records import dataset_hash

    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    held_out = {r.id for r in load_records(held_out_dataset)} if held_out_dataset else frozenset()
    data_hash = dataset_hash(training_records(settings, held_out))
    return finetune_key(model_fingerprint(source, cache_dir), data_hash, settings)


def result_key(stage: str, *inputs: object) -> str:
    """For stages whose inputs are earlier results on disk: the folders' paths and write times
    (a rewritten input is a new input), the stage's other inputs and its code."""
    marks = [(str(i), (Path(i) / "zarr.json").stat().st_mtime_ns if (Path(i) / "zarr.json").exists() else None)
             if isinstance(i, Path) else i for i in inputs]
    return content_hash(stage, marks, code_version(stage))


def results_dir(work_dir: Path, store: Path, settings: BaseModel) -> Path:
    """Same counts and identification settings, same folder: a cached rerun points at real files."""
    return Path(work_dir).resolve() / "runs" / f"{Path(store).stem}-{identification_key(store, settings)[:12]}"


def unusable_output(result: object) -> str | None:
    """Paths in the result (Path objects, absolute path strings, inside dicts, lists and pydantic
    models) must exist, and those that are count stores must verify."""
    from sparcom.extraction.store import StoreError, verify_store

    def paths(value: object):
        if isinstance(value, Path):
            yield value
        elif isinstance(value, str) and value.startswith("/"):
            yield Path(value)
        elif isinstance(value, BaseModel):
            yield from paths(value.model_dump())
        elif isinstance(value, dict):
            for item in value.values():
                yield from paths(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from paths(item)

    for path in paths(result):
        if not path.exists():
            return f"{path} is gone"
        if (path / "zarr.json").is_file() and (path / "progress").is_dir():  # a count store
            try:
                verify_store(path)
            except StoreError as error:
                return str(error)
    return None
