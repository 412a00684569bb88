"""The comparison's output files (docs/method.md section 5).

- `COMPARISON`, `COMPARISON_REPORT`, `COMPARISON_SUMMARY`: the data, markdown and JSON of a comparison.
"""

COMPARISON = "comparison.zarr"
COMPARISON_REPORT = "comparison.md"
COMPARISON_SUMMARY = "comparison.json"
