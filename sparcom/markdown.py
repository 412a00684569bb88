"""Markdown for the reports: one table writer for every report the pipeline writes.

- `table(header, rows, align_numbers=False)`: a pipe table; with `align_numbers`, every column
  but the first is right-aligned (counts line up).

    table(["group", "set size"], [["CODE", 12], ["MATH", 9]])
"""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[object], rows: Sequence[Sequence[object]], align_numbers: bool = False) -> str:
    rule = ["---"] + (["---:"] if align_numbers else ["---"]) * (len(header) - 1)
    lines = [_row(header), _row(rule)] + [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
