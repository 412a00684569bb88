"""The ablation stage's code (docs/method.md section 8).

- `ABLATE`: the ablation and its report (`sparcom.ablation.ablate`, `sparcom.ablation.report` and
  all they import), with torch and transformers. Its results are keyed by their inputs on disk
  (`sparcom.stages.result_key`).
"""

from sparcom.core.code_version import MODEL_LIBRARIES, StageCode

ABLATE = StageCode(("sparcom.ablation.ablate", "sparcom.ablation.report"), MODEL_LIBRARIES)
