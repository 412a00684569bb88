"""Instruction records: the HexaInst schema (docs/method.md section 1), validation and content hashes.

- `InstructionRecord`: one validated record.
- `read_jsonl(path)`: records from a JSONL file, with errors that name the file and line.
- `jsonl_rows(path)`, `validate_rows(rows, on_error)`: the same in two steps, where bad rows
  raise a RecordError ("raise") or come back as `Rejection`s with their reasons ("quarantine").
- `Pool`: the records one input gave, what it set aside and why, or why it is unavailable.
- `record_hash(record)`, `dataset_hash(records)`: the content hashes downstream caching keys on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

Category = Literal["CLS", "CODE", "QA", "GEN", "MATH", "SUM"]
Origin = Literal["ai", "human"]
CATEGORIES: tuple[str, ...] = get_args(Category)
ORIGINS: tuple[str, ...] = get_args(Origin)
RECORD_FIELDS: tuple[str, ...] = (
    "id", "category", "origin", "source", "instruction", "input", "response", "license",
)
OnError = Literal["raise", "quarantine"]


class RecordError(ValueError):
    """A record that does not follow the schema; the message names where it came from."""


class InstructionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str
    category: Category
    origin: Origin
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
        """The user message the model is asked to answer (docs/method.md section 2)."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


@dataclass(frozen=True)
class Rejection:
    """A record set aside: where it was read, its id when known, the curation stage and why."""

    where: str
    record_id: str | None
    stage: str  # "invalid", "duplicate id", "too long", "duplicate", "near duplicate"
    reason: str
    data: object = None  # the row as read (or its raw text), kept for the quarantine file

    def message(self) -> str:
        named = f" (id {self.record_id!r})" if self.record_id is not None else ""
        return f"{self.where}{named}: {self.reason}"

    def to_json(self) -> str:
        row = {"where": self.where, "id": self.record_id, "stage": self.stage,
               "reason": self.reason, "record": self.data}
        return json.dumps(row, ensure_ascii=False, default=repr)


@dataclass(frozen=True)
class RawRow:
    """One row of an input file before validation; `problem` says why it could not be read."""

    where: str
    data: object
    problem: str | None = None


@dataclass
class Pool:
    """What one input (shipped records, a user file, a public set) offers to curation.

    `strict` inputs are the user's own: their bad records follow the error policy. Public sets
    are pools to draw from, so their unfit rows are always set aside with a reason instead.
    """

    name: str
    description: str
    records: list[InstructionRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    strict: bool = True
    unavailable: str | None = None
    group: tuple[str, str] | None = None  # (category, origin) a public set supplies, for the report

    @property
    def rows_read(self) -> int:
        return len(self.records) + len(self.rejected)


def _raw_id(data: object) -> str | None:
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def record_problem(data: object) -> tuple[InstructionRecord | None, str | None]:
    """The record, or why the raw data is not one. A null value counts as a missing field."""
    if not isinstance(data, dict):
        return None, f"expected a JSON object, got {type(data).__name__}"
    try:
        return InstructionRecord.model_validate({k: v for k, v in data.items() if v is not None}), None
    except ValidationError as error:
        return None, "; ".join(
            f"field '{'.'.join(map(str, e['loc'])) or '?'}': {e['msg']}" for e in error.errors())


def validate_rows(
    rows: Iterable[RawRow], on_error: OnError = "raise"
) -> tuple[list[InstructionRecord], list[Rejection]]:
    """Validate rows and check ids are unique; the first bad row raises unless quarantined."""
    records: list[InstructionRecord] = []
    rejected: list[Rejection] = []
    first_seen: dict[str, str] = {}
    for row in rows:
        record, problem = (None, row.problem) if row.problem else record_problem(row.data)
        if record is not None and record.id in first_seen:
            problem = f"duplicate id {record.id!r}, first seen at {first_seen[record.id]}"
            rejection = Rejection(row.where, record.id, "duplicate id", problem, row.data)
        elif record is None:
            rejection = Rejection(row.where, _raw_id(row.data), "invalid", problem, row.data)
        else:
            first_seen[record.id] = row.where
            records.append(record)
            continue
        if on_error == "raise":
            raise RecordError(rejection.message())
        rejected.append(rejection)
    return records, rejected


def jsonl_rows(path: Path) -> Iterator[RawRow]:
    """Rows of a JSONL file; undecodable lines come back with the problem, not as an exception."""
    raw = Path(path).read_bytes()
    lines = raw.splitlines()
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            yield RawRow(where, json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as error:
            yield RawRow(where, line.decode("utf-8", "backslashreplace"),
                         f"invalid UTF-8 at byte {error.start}")
        except json.JSONDecodeError as error:
            cut_short = number == len(lines) and not raw.endswith((b"\n", b"\r"))
            hint = "; the file ends in the middle of this line (truncated?)" if cut_short else ""
            yield RawRow(where, line.decode("utf-8", "backslashreplace"),
                         f"not valid JSON ({error.msg} at column {error.colno}){hint}")


def read_jsonl(path: Path) -> list[InstructionRecord]:
    """Read and validate every line; the first bad line raises a RecordError naming it."""
    return validate_rows(jsonl_rows(path), "raise")[0]


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
