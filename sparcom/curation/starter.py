"""The dataset a run reads: a user's file, or the starter set (docs/method.md section 1).

- `starter_set()`: `STARTER_PER_CATEGORY` records of each category, the quick default run: half
  human-written where an installed package ships a set of the category (`packaged_sources`),
  so that the default report can group by origin too; the first shipped AI records for the rest.
- `prepare_dataset(path, datasets_dir)`: a user's records, or the starter set where `path` is
  None, saved under their hash (the pipeline's curate stage).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparcom.curation.dataset import MANIFEST_NAME, load_records, save_dataset
from sparcom.curation.hexainst import authored_records
from sparcom.curation.packaged_sources import PACKAGED_SETS, packaged_records
from sparcom.curation.records import CATEGORIES, InstructionRecord, RecordError, dataset_hash

STARTER_PER_CATEGORY = 20


def starter_set() -> list[InstructionRecord]:
    records: list[InstructionRecord] = []
    for category in CATEGORIES:
        human = _starter_human(category, STARTER_PER_CATEGORY // 2)
        records += authored_records((category,), STARTER_PER_CATEGORY - len(human)) + human
    return records


def _starter_human(category: str, count: int) -> list[InstructionRecord]:
    """`count` records spread evenly over the category's packaged set, or none without one."""
    for name, packaged in PACKAGED_SETS.items():
        if packaged.spec.category == category:
            records, problem = packaged_records(name)
            if records is None:
                logging.getLogger(__name__).warning("starter set, %s: AI records only, %s", category, problem)
                return []
            count = min(count, len(records))
            return [records[i * len(records) // count] for i in range(count)]
    return []


def prepare_dataset(path: Path | None, datasets_dir: Path) -> Path:
    """Save the dataset under its content hash; an unchanged dataset is not written again."""
    records = starter_set() if path is None else load_records(path)
    if not records:
        raise RecordError(f"{path}: the dataset holds no records")
    directory = Path(datasets_dir) / dataset_hash(records)[:16]
    if not (directory / MANIFEST_NAME).is_file():
        save_dataset(records, directory, settings={"source": str(path) if path else "starter set"})
    return directory
