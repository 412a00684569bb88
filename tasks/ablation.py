"""Ablation tasks: the held-out split and the measured ablation with its artifacts.

- `hold_out(dataset_dir, fraction, seed, work_dir)`: a dataset split in identification and
  evaluation records, per category, by record hash.
- `measure_ablation(...)`: `sparcom.ablation.ablate.run_ablation` and its report, published as the
  `<prefix>-ablation` markdown artifact with a progress artifact; content-cached like every stage.
- `add_ablation_to_report(run_report, summary, baseline)`: `sparcom.ablation.report.link_into_report`,
  cached on the report as the analyse stage wrote it (`sparcom.stages.run_report_written`).
"""

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from sparcom.ablation.ablate import run_ablation, split_dataset
from sparcom.ablation.report import ablation_markdown, link_into_report, report_ablation
from sparcom.ablation.settings import AblationSettings
from sparcom.core.hashing import input_fingerprint
from sparcom.core.settings import DaskSettings
from sparcom.curation.hexainst import AUTHORED_DIR
from sparcom.extraction.settings import ExtractionSettings, ModelSettings
from sparcom.stages import result_key, run_report_written
from tasks.caching import cached


def _key(components, store, settings, extraction, cache_dir, out_dir, prefix="sparcom", model=None, dask=None,
         passes_dir=None) -> str:
    """Where the passes run (`dask`), how the model loads (`model`: a device map) and where
    finished passes are kept (`passes_dir`, content-addressed) change no number."""
    evaluation = input_fingerprint(settings.eval_dataset or AUTHORED_DIR)
    return result_key("ablate", Path(components), Path(store), settings, extraction, evaluation, str(out_dir),
                      prefix)


def _report_key(run_report, summary, baseline=None) -> str:
    base = input_fingerprint(baseline) if baseline is not None and Path(baseline).exists() else None
    return result_key("ablate", run_report_written(run_report), str(run_report), summary, base)


@task(name="hold out evaluation records", **cached(lambda dataset_dir, fraction, seed, work_dir: (
    input_fingerprint(dataset_dir), fraction, seed, str(Path(work_dir).resolve()))))
def hold_out(dataset_dir: Path, fraction: float, seed: int, work_dir: Path) -> tuple[Path, Path]:
    """(identification dataset, evaluation dataset): per category `fraction` of the records held out."""
    return split_dataset(dataset_dir, fraction, seed, Path(work_dir) / "datasets")


@task(name="measure the ablation", **cached(_key))
def measure_ablation(components: Path, store: Path, settings: AblationSettings, extraction: ExtractionSettings,
                     cache_dir: Path, out_dir: Path, prefix: str = "sparcom", model: ModelSettings | None = None,
                     dask: DaskSettings | None = None, passes_dir: Path | None = None) -> dict:
    """ablation.zarr and its report in `out_dir`, published as `<prefix>-ablation`; the progress
    artifact counts the passes finished, on every worker of the cluster. Finished passes are kept
    in `passes_dir` (default `out_dir/passes`)."""
    artifact = create_progress_artifact(0.0, description="Ablation: passes over the held-out records, finished")

    def report(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / total)

    path = run_ablation(components, store, settings, extraction, cache_dir, out_dir, on_progress=report, model=model,
                        dask=dask, passes_dir=passes_dir)
    update_progress_artifact(artifact, 100.0)
    summary = report_ablation(path, out_dir)
    create_markdown_artifact(
        ablation_markdown(summary, plot=None), key=f"{prefix}-ablation",
        description="Ablation: NLL change per group switched off and records evaluated, against controls")
    return summary


@task(name="add the ablation to the run report", **cached(_report_key))
def add_ablation_to_report(run_report: Path, summary: dict, baseline: Path | None = None) -> None:
    """The ablation's section in a run's report.md; with `baseline` (another ablation.json, of the
    model before fine-tuning), whether the components became more or less critical."""
    link_into_report(run_report, summary, baseline)
