from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from sparcom.report import report_generality


@task(name="analyse generality and uniqueness")
def analyze_generality(components: Path, run_dir: Path) -> dict:
    summary = report_generality(components, run_dir)
    create_markdown_artifact(
        Path(summary["files"]["report.md"]).read_text(), key="sparcom-findings",
        description="Instruction-specific neurons: set sizes, general and unique counts, Jaccard")
    return summary
