"""The findings as a Prefect task, and their artifact.

- `FINDINGS_ARTIFACT`: the key of the findings' markdown artifact, `sparcom-verdicts`.
- `add_findings(run_dirs)`: `sparcom.findings.report.write_findings` over the run folders of a
  run's rules (the findings first in each report.md, `findings` in each summary.json), cached on
  each folder's analysis write (`sparcom.stages.run_report_written`) and ablation summary.
- `publish_findings(findings)`: the markdown artifact. Called from the flow itself, not from a
  task: the Prefect UI lists a flow run's own artifacts above its task runs' (and those in no
  fixed order), so the findings show first; and they show on every run, cache hit or not.
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from sparcom.ablation.schema import ABLATION_SUMMARY
from sparcom.core.hashing import input_fingerprint
from sparcom.findings.report import findings_markdown, write_findings
from sparcom.identification.schema import REPORT
from sparcom.stages import result_key, run_report_written
from tasks.caching import cached

FINDINGS_ARTIFACT = "sparcom-verdicts"


def _key(run_dirs: list[Path]) -> str:
    inputs = []
    for run_dir in map(Path, run_dirs):
        ablation = run_dir / ABLATION_SUMMARY
        inputs += [run_report_written(run_dir / REPORT), str(run_dir),
                   input_fingerprint(ablation) if ablation.exists() else None]
    return result_key("findings", *inputs)


@task(name="write the findings first in each report", **cached(_key))
def add_findings(run_dirs: list[Path]) -> dict:
    """The findings of every rule of the run, in each rule's report.md and summary.json."""
    return write_findings(run_dirs)


def publish_findings(findings: dict) -> None:
    create_markdown_artifact(findings_markdown(findings), key=FINDINGS_ARTIFACT,
                             description="Findings: per rule and group, reproducible, causal, specific")
