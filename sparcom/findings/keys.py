"""The findings stage's code (docs/method.md section 8).

- `FINDINGS`: the findings table and its writing (`sparcom.findings.report` and all it imports).
  Its results are keyed by their inputs on disk (`sparcom.stages.result_key`).
"""

from sparcom.core.code_version import StageCode

FINDINGS = StageCode(("sparcom.findings.report",))
