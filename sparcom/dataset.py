"""Dataset artifacts on disk: a Hugging Face `datasets` directory plus a manifest (SPEC section 1).

- `save_dataset(records, directory)`: writes `data/` (Arrow), `records.jsonl` and `manifest.json`.
- `load_records(path)`: records from a saved dataset directory or a JSONL file.
- `prepare_dataset(path, datasets_dir)`: the records (or the starter set) saved under their hash.
- `Manifest`: per-record content hashes, the dataset hash, counts per category x origin.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
from pydantic import BaseModel

from sparcom.hexainst import starter_set
from sparcom.records import (
    RECORD_FIELDS, InstructionRecord, RecordError, check_unique_ids, dataset_hash, parse_record,
    read_jsonl, record_hash,
)

MANIFEST_NAME = "manifest.json"


class Manifest(BaseModel):
    dataset_hash: str
    record_count: int
    counts: dict[str, dict[str, int]]
    sources: dict[str, int]
    licenses: dict[str, int]
    record_hashes: dict[str, str]
    settings: dict = {}


def build_manifest(records: Sequence[InstructionRecord], settings: dict | None = None) -> Manifest:
    counts: dict[str, dict[str, int]] = {}
    for (category, origin), n in sorted(Counter((r.category, r.origin) for r in records).items()):
        counts.setdefault(category, {})[origin] = n
    return Manifest(
        dataset_hash=dataset_hash(records),
        record_count=len(records),
        counts=counts,
        sources=dict(sorted(Counter(r.source for r in records).items())),
        licenses=dict(sorted(Counter(r.license for r in records).items())),
        record_hashes={r.id: record_hash(r) for r in records},
        settings=settings or {},
    )


def save_dataset(
    records: Sequence[InstructionRecord], directory: Path, settings: dict | None = None
) -> Manifest:
    """Write the dataset atomically: a reader never sees a half-written directory."""
    check_unique_ids(records, str(directory))
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rows = [r.model_dump() for r in records]
    table = datasets.Dataset.from_list(rows, features=datasets.Features(
        {name: datasets.Value("string") for name in RECORD_FIELDS}))
    table.save_to_disk(str(partial / "data"))
    with open(partial / "records.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    manifest = build_manifest(records, settings)
    (partial / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return manifest


def load_records(path: Path) -> list[InstructionRecord]:
    path = Path(path)
    if path.is_dir():
        if not (path / "data").is_dir():
            raise RecordError(f"{path}: not a saved dataset (no data/ folder inside)")
        table = datasets.load_from_disk(str(path / "data"))
        records = [parse_record(row, f"{path} row {i}") for i, row in enumerate(table)]
        check_unique_ids(records, str(path))
        return records
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    raise RecordError(f"{path}: expected a .jsonl file or a saved dataset directory")


def prepare_dataset(path: Path | None, datasets_dir: Path) -> Path:
    """Save the dataset under its content hash; an unchanged dataset is not written again."""
    records = starter_set() if path is None else load_records(path)
    directory = Path(datasets_dir) / dataset_hash(records)[:16]
    if not (directory / MANIFEST_NAME).is_file():
        save_dataset(records, directory, settings={"source": str(path) if path else "starter set"})
    return directory
