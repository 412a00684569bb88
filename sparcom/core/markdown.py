"""Markdown for the reports: one table writer for every report the pipeline writes.

- `table(header, rows, align_numbers=False)`: a pipe table; with `align_numbers`, every column
  but the first is right-aligned (counts line up).
- `put_section(report, section, first=False)`: a `## ` section into a report file, replacing an
  earlier copy of the same heading (a rerun does not repeat it): at the end, or with `first`
  before the first `## ` section (after the title and its opening lines).

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


def put_section(report: Path, section: str, first: bool = False) -> None:
    """Put `section` (its first line is its heading) into `report`, replacing an earlier copy."""
    report = Path(report)
    heading = section.splitlines()[0]
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
    opening = text.find("\n## ") if first else -1
    if opening < 0:
        report.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
    else:
        report.write_text(text[:opening].rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n" + text[opening:],
                          encoding="utf-8")
