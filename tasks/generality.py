"""The analyse stage as a Prefect task: generality and uniqueness of the selected components.

- `analyze_generality(components, run_dir, prefix)`: `sparcom.identification.report.report_generality`, cached on
  the components it reads, published as `<prefix>-findings` (markdown), tables and a link.
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from sparcom.core.outputs import claimed
from sparcom.identification.schema import RUN_KIND
from sparcom.stages import result_key
from tasks.caching import cached


@task(name="analyse generality and uniqueness", **cached(lambda components, run_dir, prefix="sparcom": (
    result_key("analyse", Path(components), str(run_dir), prefix))))
def analyze_generality(components: Path, run_dir: Path, prefix: str = "sparcom") -> dict:
    """The report, published as `<prefix>-findings` (markdown), tables and a link to the files."""
    # Imported when the task runs: a cached rerun does not load matplotlib.
    from sparcom.identification.report import artifact_tables, findings_markdown, report_generality

    with claimed(run_dir, RUN_KIND):  # one writer at a time in the run folder
        summary = report_generality(components, run_dir)
    create_markdown_artifact(
        findings_markdown(summary), key=f"{prefix}-findings",
        description="Instruction-specific components: set sizes, general and unique counts, Jaccard")
    for key, table in artifact_tables(summary).items():
        create_table_artifact(table["table"], key=key.replace("sparcom", prefix, 1), description=table["description"])
    create_link_artifact(Path(run_dir).resolve().as_uri(), link_text=str(Path(run_dir).resolve()),
                         key=f"{prefix}-results", description="The folder with the report, plots and data")
    return summary
