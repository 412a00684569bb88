"""The HexaInst records that ship with the package (the AI-authored half, docs/method.md section 1).

- `authored_records(per_category=None)`: the shipped records, in file order per category.
- `starter_set()`: the first `STARTER_PER_CATEGORY` of each category, the quick default run.
- `authored_pool()`: all of them as a curation `Pool`.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.records import CATEGORIES, InstructionRecord, Pool, read_jsonl

AUTHORED_DIR = Path(__file__).parent / "data" / "hexainst_ai"
STARTER_PER_CATEGORY = 20


def authored_records(
    categories: tuple[str, ...] = CATEGORIES, per_category: int | None = None
) -> list[InstructionRecord]:
    records: list[InstructionRecord] = []
    for category in categories:
        records.extend(read_jsonl(AUTHORED_DIR / f"{category}.jsonl")[:per_category])
    return records


def starter_set() -> list[InstructionRecord]:
    return authored_records(per_category=STARTER_PER_CATEGORY)


def authored_pool() -> Pool:
    """Shipped records are ours: any bad one is a bug, so they are always read strictly."""
    return Pool(name="hexainst-ai", description=f"AI-authored HexaInst records shipped in {AUTHORED_DIR}",
                records=authored_records())
