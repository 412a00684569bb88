"""The HexaInst records that ship with the package (the AI-authored half, docs/method.md section 1).

- `authored_records(per_category=None)`: the shipped records, in file order per category.
- `starter_set()`: `STARTER_PER_CATEGORY` records of each category, the quick default run: half
  human-written where an installed package ships a set of the category (`packaged_sources`),
  so that the default report can group by origin too; the first shipped AI records for the rest.
- `authored_pool()`: all of them as a curation `Pool`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparcom.curation.packaged_sources import PACKAGED_SETS, packaged_records
from sparcom.curation.records import CATEGORIES, InstructionRecord, Pool, read_jsonl

AUTHORED_DIR = Path(__file__).parent / "hexainst_ai"
STARTER_PER_CATEGORY = 20


def authored_records(
    categories: tuple[str, ...] = CATEGORIES, per_category: int | None = None
) -> list[InstructionRecord]:
    records: list[InstructionRecord] = []
    for category in categories:
        records.extend(read_jsonl(AUTHORED_DIR / f"{category}.jsonl")[:per_category])
    return records


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


def authored_pool() -> Pool:
    """Shipped records are ours: any bad one is a bug, so they are always read strictly."""
    return Pool(name="hexainst-ai", description=f"AI-authored HexaInst records shipped in {AUTHORED_DIR}",
                records=authored_records())
