"""Markdown for the reports: one table writer for every report the pipeline writes.

- `table(header, rows, align_numbers=False)`: a pipe table; with `align_numbers`, every column
  but the first is right-aligned (counts line up).
- `put_section(report, section)`: a `## ` section into a report file, replacing an earlier copy
  of the same heading (a rerun does not repeat it).

    table(["group", "set size"], [["CODE", 12], ["MATH", 9]])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def table(header: Sequence[object], rows: Sequence[Sequence[object]], align_numbers: bool = False) -> str:
    rule = ["---"] + (["---:"] if align_numbers else ["---"]) * (len(header) - 1)
    lines = [_row(header), _row(rule)] + [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def put_section(report: Path, section: str) -> None:
    """Put `section` (its first line is its heading) into `report`, replacing an earlier copy."""
    report = Path(report)
    heading = section.splitlines()[0]
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
    report.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
