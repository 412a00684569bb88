"""Instruction records from the files users bring: JSONL, CSV, Parquet or a saved `datasets` folder.

- `read_rows(path)`: the raw rows of any of these, each named by file and line (or row).
- `read_records(path, on_error)`: validated records plus the rows set aside ("quarantine"), or
  a RecordError at the first bad row ("raise").
- `file_pool(path, on_error)`: the same as a curation `Pool`; an unreadable file becomes an
  unavailable pool when quarantining.

Every format is validated by the same schema (`sparcom.curation.records`). Missing values (CSV's short
rows, Parquet's and Arrow's nulls) count as missing fields; an optional `input` may be absent.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from sparcom.curation.records import (
    InstructionRecord,
    OnError,
    Pool,
    RawRow,
    RecordError,
    Rejection,
    jsonl_rows,
    validate_rows,
)

SUFFIXES = (".jsonl", ".csv", ".parquet")


def read_rows(path: Path) -> Iterator[RawRow]:
    path = Path(path)
    if path.is_dir():
        return _saved_dataset_rows(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file or folder")
    readers = {".jsonl": jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if path.suffix.lower() not in readers:
        raise RecordError(f"{path}: expected a {', '.join(SUFFIXES)} file or a saved dataset folder")
    return readers[path.suffix.lower()](path)


def read_records(path: Path, on_error: OnError = "raise") -> tuple[list[InstructionRecord], list[Rejection]]:
    return validate_rows(read_rows(path), on_error)


def file_pool(path: Path, on_error: OnError = "raise") -> Pool:
    pool = Pool(name=str(path), description=f"user dataset {path}")
    try:
        pool.records, pool.rejected = read_records(path, on_error)
    except RecordError as error:
        if on_error == "raise":
            raise
        pool.unavailable = str(error)
    return pool


def _csv_rows(path: Path) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes in place, so one bad row is reported, not the file.
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    start = 2
    try:
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            yield RawRow(where, _printable(row), _csv_problem(row, reader.fieldnames or []))
    except csv.Error as error:
        yield RawRow(f"{path}:{start}", None,
                     f"not valid CSV ({error}); the file may be truncated")


def _csv_problem(row: dict, header: list[str]) -> str | None:
    if None in row:
        return f"the row has {len(header) + len(row[None])} values, the header {len(header)} columns"
    short = [name for name, value in row.items() if value is None]
    if short:
        return (f"the row has {len(header) - len(short)} values, the header {len(header)} "
                f"columns (missing {', '.join(short)}; truncated?)")
    for name, value in row.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"invalid UTF-8 in column '{name}' at character {error.start}"
    return None


def _printable(row: dict) -> dict:
    return {str(k): v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if isinstance(v, str) else v for k, v in row.items()}


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for damaged files
        raise RecordError(f"{path}: not a readable Parquet file ({error}); is it truncated?") from None
    index = 0
    try:
        for batch in parquet.iter_batches():
            for data in batch.to_pylist():
                yield RawRow(f"{path} row {index}", data)
                index += 1
    except Exception as error:
        yield RawRow(f"{path} row {index}", None,
                     f"rows from here on are unreadable ({error}); is the file damaged?")


def _saved_dataset_rows(path: Path) -> Iterator[RawRow]:
    import datasets

    folder = path / "data" if (path / "data").is_dir() else path
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise RecordError(f"{path}: holds several splits ({', '.join(splits)}); pass one split's folder")
    if not (folder / "state.json").is_file():
        raise RecordError(f"{path}: not a saved dataset (no data/ folder or state.json inside)")
    try:
        table = datasets.load_from_disk(str(folder))
    except Exception as error:
        raise RecordError(f"{path}: cannot read the saved dataset ({error})") from None
    for index, data in enumerate(table):
        yield RawRow(f"{path} row {index}", data)
