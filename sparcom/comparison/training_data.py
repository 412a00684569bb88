"""What a fine-tune trains on (docs/method.md section 5).

- `training_records(settings, held_out)`: the shipped HexaInst records or a user dataset,
  restricted to the chosen categories, minus held-out records (the ones measured).
"""

from __future__ import annotations

from collections.abc import Collection

from sparcom.comparison.settings import FinetuneSettings
from sparcom.curation.dataset import load_records
from sparcom.curation.hexainst import authored_records
from sparcom.curation.records import CATEGORIES, InstructionRecord, RecordError


def training_records(
    settings: FinetuneSettings, held_out: Collection[str] = frozenset()
) -> list[InstructionRecord]:
    """Records of the chosen categories (all when none are chosen), without the held-out ids."""
    categories = tuple(settings.categories) or CATEGORIES
    if settings.dataset is None:
        records, where = authored_records(categories), "the shipped HexaInst records"
    else:
        records, where = load_records(settings.dataset), str(settings.dataset)
        records = [r for r in records if r.category in categories]
    records = [r for r in records if r.id not in held_out]
    if not records:
        raise RecordError(
            f"{where}: no training records of categories {', '.join(categories)} "
            f"left after holding out {len(held_out)} measured records")
    return records
