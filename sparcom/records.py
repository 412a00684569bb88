"""Instruction records: the HexaInst schema (SPEC section 1), validation and content hashes.

- `InstructionRecord`: one validated record.
- `read_jsonl(path)`: records from a JSONL file, with errors that name the file and line.
- `record_hash(record)`, `dataset_hash(records)`: the content hashes downstream caching keys on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

CATEGORIES: tuple[str, ...] = ("CLS", "CODE", "QA", "GEN", "MATH", "SUM")
ORIGINS: tuple[str, ...] = ("ai", "human")
RECORD_FIELDS: tuple[str, ...] = (
    "id", "category", "origin", "source", "instruction", "input", "response", "license",
)


class RecordError(ValueError):
    """A record that does not follow the schema; the message names where it came from."""


class InstructionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str
    category: Literal["CLS", "CODE", "QA", "GEN", "MATH", "SUM"]
    origin: Literal["ai", "human"]
    source: str
    instruction: str
    input: str = ""
    response: str
    license: str

    @field_validator("id", "source", "instruction", "response", "license")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def user_turn(self) -> str:
        """The user message the model is asked to answer (SPEC section 2)."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def parse_record(data: object, where: str) -> InstructionRecord:
    """Validate one raw record; `where` (file and line, say) goes into the error message."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        return InstructionRecord.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"field '{'.'.join(map(str, e['loc'])) or '?'}': {e['msg']}" for e in error.errors()
        )
        raise RecordError(f"{where} (id {data.get('id')!r}): {problems}") from None


def read_jsonl(path: Path) -> list[InstructionRecord]:
    """Read and validate every line; the first bad line raises a RecordError naming it."""
    records = []
    raw = Path(path).read_bytes()
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            data = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise RecordError(f"{where}: invalid UTF-8 at byte {error.start}") from None
        except json.JSONDecodeError as error:
            raise RecordError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        records.append(parse_record(data, where))
    check_unique_ids(records, str(path))
    return records


def check_unique_ids(records: Iterable[InstructionRecord], where: str) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise RecordError(f"{where}: duplicate id {record.id!r}")
        seen.add(record.id)


def record_hash(record: InstructionRecord) -> str:
    canonical = json.dumps(record.model_dump(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dataset_hash(records: Sequence[InstructionRecord]) -> str:
    """Hash of the ordered record hashes: any edit, addition, removal or reordering changes it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record_hash(record).encode("ascii"))
    return digest.hexdigest()
