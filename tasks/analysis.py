from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sparcom.provenance import result_key
from sparcom.report import artifact_tables, report_generality
from tasks.caching import cached


@task(name="analyse generality and uniqueness", **cached(lambda components, run_dir: (
    result_key("analyse", Path(components), str(run_dir)))))
def analyze_generality(components: Path, run_dir: Path) -> dict:
    summary = report_generality(components, run_dir)
    create_markdown_artifact(
        Path(summary["files"]["report.md"]).read_text(), key="sparcom-findings",
        description="Instruction-specific components: set sizes, general and unique counts, Jaccard")
    for key, table in artifact_tables(summary).items():
        create_table_artifact(table["table"], key=key, description=table["description"])
    return summary
