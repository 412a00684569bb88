"""The HexaInst records that ship with the package (the AI-authored half, docs/method.md section 1).

- `AUTHORED_DIR`: their folder, one JSONL file per category.
- `authored_records(categories, per_category)`: the shipped records, in file order per category.
- `authored_pool()`: all of them as a curation `Pool`.
"""

from __future__ import annotations

from pathlib import Path

from sparcom.curation.records import CATEGORIES, InstructionRecord, Pool, read_jsonl

AUTHORED_DIR = Path(__file__).parent / "hexainst_ai"


def authored_records(
    categories: tuple[str, ...] = CATEGORIES, per_category: int | None = None
) -> list[InstructionRecord]:
    records: list[InstructionRecord] = []
    for category in categories:
        records.extend(read_jsonl(AUTHORED_DIR / f"{category}.jsonl")[:per_category])
    return records


def authored_pool() -> Pool:
    """Shipped records are ours: any bad one is a bug, so they are always read strictly."""
    return Pool(name="hexainst-ai", description=f"AI-authored HexaInst records shipped in {AUTHORED_DIR}",
                records=authored_records())
