"""The compare stage as Prefect tasks: two checkpoints' results checked and compared.

- `check_comparable(base_store, tuned_store)`: `sparcom.comparison.compare.check_stores_compatible`.
- `compare_checkpoints(base_components, tuned_components, out_dir, ...)`:
  `sparcom.comparison.report.report_comparison`, published as the `sparcom-comparison` artifact (`sparcom-<rule>-comparison` for a run's later rules).
- `add_comparison_to_report(run_report, summary)`: `sparcom.comparison.report.link_into_report`,
  cached on the report as the analyse stage wrote it (`sparcom.stages.run_report_written`).
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from sparcom.comparison.compare import check_stores_compatible
from sparcom.comparison.schema import COMPARISON_REPORT
from sparcom.extraction.store import open_store
from sparcom.stages import result_key, run_report_written
from tasks.caching import cached


@task(name="check the two stores are comparable", **cached(lambda base_store, tuned_store: (
    result_key("compare", Path(base_store), Path(tuned_store)))))
def check_comparable(base_store: Path, tuned_store: Path) -> None:
    check_stores_compatible(open_store(base_store), open_store(tuned_store))


@task(name="compare base and tuned components", **cached(
    lambda base_components, tuned_components, out_dir, focus_groups, top_movers=10, prefix="sparcom": (
        result_key("compare", Path(base_components), Path(tuned_components), str(out_dir), focus_groups,
                   top_movers, prefix))))
def compare_checkpoints(
    base_components: Path, tuned_components: Path, out_dir: Path, focus_groups: list[str], top_movers: int = 10,
    prefix: str = "sparcom",
) -> dict:
    """The comparison report, published as `<prefix>-comparison` (each rule of a run its own)."""
    # Imported when the task runs: a cached rerun does not load matplotlib.
    from sparcom.comparison.report import report_comparison

    summary = report_comparison(base_components, tuned_components, out_dir, focus_groups, top_movers)
    create_markdown_artifact(
        Path(summary["files"][COMPARISON_REPORT]).read_text(), key=f"{prefix}-comparison",
        description="Before/after: kept, gained and lost components, layer shift, frequency change")
    return summary


@task(name="add the comparison to the run report", **cached(lambda run_report, summary: (
    result_key("compare", run_report_written(run_report), str(run_report), summary))))
def add_comparison_to_report(run_report: Path, summary: dict) -> None:
    """The comparison's headline and a link to its report in a run's report.md."""
    from sparcom.comparison.report import link_into_report

    link_into_report(run_report, summary)
