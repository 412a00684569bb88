"""Content keys: what each stage's result depends on, for caching and for naming outputs.

- `content_hash(*parts)`: the sha256 of parts (settings models, strings, numbers) as sorted JSON.
- `file_sha256(path)`: a file's sha256, read in blocks.
- `code_version(stage)`: a hash of the source of the modules a stage runs, so editing the
  extraction code invalidates extractions and nothing else.
- `input_fingerprint(path)`: a hash of a file's or a directory tree's content.
- `curation_key`, `extraction_cache_key`, `identification_key`, `finetune_cache_key`,
  `result_key`: one key per stage, computed without running the stage (extraction's needs the
  weights' fingerprint, not the model).
- `results_dir(work_dir, store, settings)`: the content-addressed folder of a run's findings.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from pydantic import BaseModel

from sparcom import __version__

STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "curate": ("records", "hexainst", "dataset", "curation", "sources", "record_files", "dedup"),
    "extract": ("models", "prompts", "architectures", "counting", "extract", "store"),
    "identify": ("identify", "store", "cluster"),
    "analyse": ("analysis", "report"),
    "finetune": ("finetune", "models"),
    "compare": ("compare", "compare_report"),
    "ablate": ("ablation", "ablation_hooks", "response_nll", "ablation_controls", "ablation_figures",
               "ablation_report", "prompts", "architectures"),
}


def content_hash(*parts: object) -> str:
    text = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def code_version(stage: str) -> str:
    digest = hashlib.sha256(__version__.encode())
    for name in STAGE_MODULES[stage]:
        try:
            module = importlib.import_module(f"sparcom.{name}")
        except ModuleNotFoundError:
            continue
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def input_fingerprint(path: Path) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def curation_key(source: Path | None) -> str:
    from sparcom.hexainst import AUTHORED_DIR

    content = input_fingerprint(AUTHORED_DIR if source is None else source)
    return content_hash("curate", content, code_version("curate"))


def extraction_cache_key(model: BaseModel, dataset_dir: Path, settings: BaseModel, cache_dir: Path) -> str:
    from sparcom.dataset import MANIFEST_NAME
    from sparcom.models import model_fingerprint, resolve_model

    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    manifest = json.loads((Path(dataset_dir) / MANIFEST_NAME).read_text())
    return content_hash("extract", model_fingerprint(source, cache_dir), manifest["dataset_hash"], settings,
                   code_version("extract"))


def identification_key(store: Path, settings: BaseModel) -> str:
    from sparcom.store import store_attrs

    return content_hash("identify", store_attrs(store)["extraction_key"], settings, code_version("identify"))


def finetune_cache_key(model: BaseModel, settings: BaseModel, held_out_dataset: Path | None,
                       cache_dir: Path) -> str:
    from sparcom.dataset import MANIFEST_NAME
    from sparcom.models import model_fingerprint, resolve_model

    source = resolve_model(model.name, model.revision, model.trust_remote_code)
    held_out = (json.loads((Path(held_out_dataset) / MANIFEST_NAME).read_text())["dataset_hash"]
                if held_out_dataset else None)
    return content_hash("finetune", model_fingerprint(source, cache_dir), settings, held_out,
                   code_version("finetune"))


def result_key(stage: str, *inputs: object) -> str:
    """For stages whose inputs are earlier results on disk: the folders' paths and write times
    (a rewritten input is a new input), the stage's other inputs and its code."""
    marks = [(str(i), (Path(i) / "zarr.json").stat().st_mtime_ns if (Path(i) / "zarr.json").exists() else None)
             if isinstance(i, Path) else i for i in inputs]
    return content_hash(stage, marks, code_version(stage))


def results_dir(work_dir: Path, store: Path, settings: BaseModel) -> Path:
    """Same counts and identification settings, same folder: a cached rerun points at real files."""
    return Path(work_dir).resolve() / "runs" / f"{Path(store).stem}-{identification_key(store, settings)[:12]}"
