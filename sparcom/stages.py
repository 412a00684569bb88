"""The pipeline's stages as the caching sees them: each stage's code, keys of results on disk,
and whether a cached result can still be used (docs/method.md section 8).

- `STAGES`: stage name -> its code (`StageCode`, declared in each stage package's `keys` module).
- `result_key(stage, *inputs)`: the key of a stage whose inputs are earlier results on disk.
- `unusable_output(result)`: why a cached result can no longer be used (a file or folder it
  names is gone, a count store it names does not verify), or None.
- `run_report_written(report)`: which write of a run's report.md by the analyse stage the later
  stages' sections go into, as a `result_key` input (the findings too: report.md and summary.json).

The keys of stages whose inputs are not results on disk live beside their stages:
`sparcom.curation.keys`, `sparcom.extraction.keys`, `sparcom.attribution.keys`, `sparcom.identification.keys`,
`sparcom.comparison.keys`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from sparcom.ablation.keys import ABLATE
from sparcom.attribution.keys import ATTRIBUTE
from sparcom.comparison.keys import COMPARE, FINETUNE
from sparcom.core.hashing import content_hash
from sparcom.curation.keys import CURATE
from sparcom.extraction.keys import EXTRACT
from sparcom.extraction.store import StoreError, verify_store
from sparcom.findings.keys import FINDINGS
from sparcom.identification.keys import ANALYSE, IDENTIFY
from sparcom.identification.schema import GENERALITY

STAGES = {"curate": CURATE, "extract": EXTRACT, "attribute": ATTRIBUTE, "identify": IDENTIFY, "analyse": ANALYSE,
          "finetune": FINETUNE, "compare": COMPARE, "ablate": ABLATE, "findings": FINDINGS}


def result_key(stage: str, *inputs: object) -> str:
    """For stages whose inputs are earlier results on disk: the folders' paths and write times
    (a rewritten input is a new input), the stage's other inputs and its code."""
    marks = [(str(i), (Path(i) / "zarr.json").stat().st_mtime_ns if (Path(i) / "zarr.json").exists() else None)
             if isinstance(i, Path) else i for i in inputs]
    return content_hash(stage, marks, STAGES[stage].version())


def run_report_written(report: Path) -> Path:
    """The analyse stage writes report.md whole, so the sections that the ablation and the
    comparison add must be added again after each of its runs, even when those stages are cache
    hits. Their keys take this path: generality.zarr, written with report.md, whose write time
    `result_key` reads (report.md's own changes with every section added)."""
    return Path(report).parent / GENERALITY


def unusable_output(result: object) -> str | None:
    """Paths in the result (Path objects, absolute path strings, inside dicts, lists and pydantic
    models) must exist, and those that are count stores must verify."""
    def paths(value: object):
        if isinstance(value, Path):
            yield value
        elif isinstance(value, str) and value.startswith("/"):
            yield Path(value)
        elif isinstance(value, BaseModel):
            yield from paths(value.model_dump())
        elif isinstance(value, dict):
            for item in value.values():
                yield from paths(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from paths(item)

    for path in paths(result):
        if not path.exists():
            return f"{path} is gone"
        if (path / "zarr.json").is_file() and (path / "progress").is_dir():  # a store written by shard
            try:
                verify_store(path)
            except StoreError as error:
                return str(error)
    return None
