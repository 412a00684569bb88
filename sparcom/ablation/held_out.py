"""Held out by content: an evaluation record is held out when the model never read its text
while the components were found, whatever its id or other fields (docs/method.md section 6).

- `identification_texts(store_path)`: what identification read (`IdentificationTexts`): the
  store's record hashes and, where the records themselves are found, their texts. A count store
  keeps only record hashes; the records are looked for in the dataset the store names
  (`dataset_path`, written by extraction) and, for a store of a work dir
  (`<work>/stores/*.zarr`), in the saved datasets beside it (`<work>/datasets/*`); a candidate is
  taken only when its dataset hash is the store's.
- `IdentificationTexts.holds(record)`: the record was read: the same record hash, or the same
  text the model reads (instruction and input, normalised as curation's exact-duplicate rule:
  `sparcom.curation.dedup.canonical_text`).
- `IdentificationTexts.near_duplicates(records)`: how many of `records` are near duplicates of an
  identification record by curation's own rule (word-shingle Jaccard at or above the curation
  settings' `near_duplicate_threshold`), not counting those it `holds`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sparcom.curation.dataset import MANIFEST_NAME, load_records
from sparcom.curation.dedup import canonical_text, near_duplicate_pairs
from sparcom.curation.records import InstructionRecord, dataset_hash, record_hash
from sparcom.curation.settings import CurationSettings
from sparcom.extraction.store import open_store, store_attrs


@dataclass(frozen=True)
class IdentificationTexts:
    hashes: frozenset[str]
    texts: tuple[str, ...]      # the records' user turns; empty where the records were not found
    found_in: str | None        # the dataset they were read from, or None

    def holds(self, record: InstructionRecord) -> bool:
        return record_hash(record) in self.hashes or canonical_text(record.user_turn()) in self._canonical

    @property
    def _canonical(self) -> frozenset[str]:
        return frozenset(canonical_text(text) for text in self.texts)

    def near_duplicates(self, records: Sequence[InstructionRecord]) -> int:
        if not self.texts or not records:
            return 0
        rule = CurationSettings()
        candidates = [r for r in records if not self.holds(r)]
        pairs = near_duplicate_pairs([*self.texts, *(r.user_turn() for r in candidates)],
                                     rule.near_duplicate_threshold, rule.shingle_words)
        first = len(self.texts)
        return len({b for a, b, _ in pairs if a < first <= b})


def _candidates(store_path: Path, attrs: dict) -> list[Path]:
    named = [Path(attrs["dataset_path"])] if attrs.get("dataset_path") else []
    store = Path(store_path).resolve()
    beside = sorted((store.parent.parent / "datasets").glob("*")) if store.parent.name == "stores" else []
    return [p for p in named + beside if p.exists()]


def _dataset_hash_of(path: Path) -> str | None:
    manifest = path / MANIFEST_NAME
    try:
        if manifest.is_file():  # a saved dataset: its manifest names its hash
            return json.loads(manifest.read_text(encoding="utf-8")).get("dataset_hash")
        return dataset_hash(load_records(path))
    except (OSError, ValueError):
        return None


def identification_texts(store_path: Path) -> IdentificationTexts:
    attrs = store_attrs(store_path)
    hashes = frozenset(str(h) for h in open_store(store_path).record_hash.values)
    for candidate in _candidates(store_path, attrs):
        if _dataset_hash_of(candidate) == attrs.get("dataset_hash"):
            records = load_records(candidate)
            return IdentificationTexts(hashes, tuple(r.user_turn() for r in records), str(candidate))
    return IdentificationTexts(hashes, (), None)
